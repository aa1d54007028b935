"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in a flag, a config file, a dataset or a bundle; the message names the culprit."""


class ConfigError(UserError):
    """An impossible or inconsistent configuration value."""


class DataError(UserError):
    """A dataset file that is missing, empty, binary, not UTF-8 or malformed."""


class BundleError(UserError):
    """A brain bundle or checkpoint that is missing, truncated or corrupt."""


class RegistryError(UserError):
    """An expert registry that is corrupt or not ours, an invalid expert id, or an unknown expert."""


class GoalsError(UserError):
    """A goals DB that is corrupt or not ours, an unknown goal id, or a link to an expert not in the registry."""
