"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from data_prep.errors import DataError


class UsageError(ValueError):
    """Bad config, preset, option or environment. The message says what is wrong and the fix."""


USER_ERRORS = (UsageError, DataError)
