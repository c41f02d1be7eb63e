"""The one exception type for mistakes the user can fix (bad path, unknown name, bad value)."""


class UserError(Exception):
    """Bad input from the user. The CLI prints its message as one line on stderr and exits 2."""


# Exit code after Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT = 130


def require(condition: bool, message: str) -> None:
    """Raise a UserError (one line, exit 2) unless `condition` holds."""
    if not condition:
        raise UserError(message)
