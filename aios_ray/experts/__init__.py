"""Subbrains: the expert registry (``registry.py``), the goals DB (``goals.py``) and their CLI (``cli.py``).

No torch, ray or training-loop imports here (tests/test_layering.py): training, routing and the CLI all
build on these.
"""
