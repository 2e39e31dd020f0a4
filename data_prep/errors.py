"""Errors caused by the user's data or input: the CLI turns them into one line and exit code 2."""


class DataError(ValueError):
    """Bad or missing data. The message names the file or folder and how to fix it."""
