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


def user_error_behind(exc: BaseException) -> UserError | None:
    """The user error behind an exception raised far from it (a Ray Train worker's, a Ray Data actor's, wrapped by
    Ray in its own errors), as one line; None when there is none. Follows Ray's ``cause``, a failed run's
    ``worker_failures`` and Python's ``__cause__`` / ``__context__`` chains."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, UserError):
            cause = getattr(error, "cause", None)  # Ray's task error wraps the raiser's own exception
            if isinstance(cause, UserError):
                return cause
            lines = str(error).strip().splitlines()
            return error if len(lines) <= 1 else UserError(lines[-1])
        pending.extend(getattr(error, "worker_failures", {}).values())
        pending.extend(e for e in (error.__cause__, error.__context__, getattr(error, "cause", None))
                       if isinstance(e, BaseException))
    return None
