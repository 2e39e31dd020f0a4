"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from data_prep.errors import DataError


class UsageError(ValueError):
    """Bad config, preset, option or environment. The message says what is wrong and the fix."""


USER_ERRORS = (UsageError, DataError)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc``: itself, its causes, or what a Ray worker raised."""
    from model.backbones import BackboneInitError

    seen, stack = set(), [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, USER_ERRORS + (BackboneInitError,)):
            return error
        stack += [getattr(error, "cause", None), error.__cause__, error.__context__]
        stack += list(getattr(error, "worker_failures", {}).values())  # ray.train.WorkerGroupError
    return None
