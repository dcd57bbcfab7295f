"""The one exception type for mistakes a user can cause (bad file, key, value or option)."""


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the file/key/value and the fix.

    The command line prints it without a traceback and exits with status 2.
    """
