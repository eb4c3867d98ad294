"""The one exception type for mistakes a user can make (bad flags, files, data)."""


class UserError(ValueError):
    """A problem the user can fix. The message names the problem and the fix, on one line.

    The CLI prints it as one line on stderr and exits with code 2; anything else is a bug.
    """
