"""Errors a user can cause. The CLI prints these as one line, never as a traceback."""


class UserError(Exception):
    """Bad flags, bad files, bad environment: something the operator can fix."""

    exit_code = 2
