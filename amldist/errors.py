"""The one exception type for mistakes the user can fix (bad path, unknown name, bad value)."""


class UserError(Exception):
    """Bad input from the user. The CLI prints its message as one line on stderr and exits 2."""
