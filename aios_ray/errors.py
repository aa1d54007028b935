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
            return _one_line(cause if isinstance(cause, UserError) else error)
        pending.extend(getattr(error, "worker_failures", {}).values())
        pending.extend(e for e in (error.__cause__, error.__context__, getattr(error, "cause", None))
                       if isinstance(e, BaseException))
    return None


# Ray Data appends its retry advice to the exception a failed read or map raised ("Failed to apply UDF transform
# after 1/1 attempts ..." and how to configure retries): not the user's line.
_RAY_DATA_ADVICE = "Failed to apply "


def _one_line(error: UserError) -> UserError:
    if len(str(error).strip().splitlines()) <= 1:
        return error
    line = _own_lines(str(error))[-1]
    try:  # the same kind of error, with its one line
        return type(error)(line)
    except TypeError:  # Ray's dual-class wrapper (RayTaskError(DataError)) takes other arguments
        return UserError(line)


def _own_lines(message: str) -> list[str]:
    """A wrapped user error's message without what Ray added: the traceback before it stays (its line is the
    last), the advice Ray Data appends after it goes."""
    lines = message.strip().splitlines()
    advice = next((i for i, line in enumerate(lines) if line.startswith(_RAY_DATA_ADVICE)), len(lines))
    return lines[:advice] or lines
