"""The one exception type users see: a message that says what was wrong and how to fix it."""


class HeadscopeError(ValueError):
    """Bad input or an unsupported model; the message names the fix.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
