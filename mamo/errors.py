"""The one exception type users see: a sentence naming the bad input and the fix."""


class MamoError(Exception):
    """A user-facing error. The message is one sentence that names the bad input and says how to fix it.

    The CLI prints it without a traceback and exits with status 2.
    """
