"""Pipelines of Ray tasks whose steps are cached by the content hash of their inputs (``aios-ray flow``)."""
