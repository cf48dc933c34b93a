"""The one exception type that means "the user gave us something we cannot use".

The CLI prints `error: <message>` on one line and exits 2 for these; every other exception is a bug
and keeps its traceback. Messages say what is wrong *and* what to do about it.
"""


class UserError(Exception):
    """Bad input (config, files, environment). The message is one line naming the fix."""
