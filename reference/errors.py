"""The one exception type users see.

Every problem with user input (a checkpoint, a prompt, a parameter) is raised
as :class:`OracleError` with a message that names the cause and the fix. The
CLI prints such errors as one line and exits with status 2, never a traceback.
"""


class OracleError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
