"""Errors that are the user's to fix: the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """A problem with input, environment or privileges that the user can fix.

    The message names the cause and, where there is one, the fix.
    """

    exit_code = 2
