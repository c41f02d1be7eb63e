"""The one exception type for mistakes the user can fix (bad path, unknown name, bad value)."""


class UserError(Exception):
    """Bad input from the user. The CLI prints its message as one line on stderr and exits 2."""


# Exit code after Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT = 130


def user_message(err: BaseException) -> str:
    """The one line a UserError shows. torch's DataLoader re-raises an error of one of its worker
    processes with that worker's traceback as the message; the last line of it is the error's own."""
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1].strip()
    name, _, rest = last.partition(": ")
    return rest if rest and name.endswith(type(err).__name__) else last


def require(condition: bool, message: str) -> None:
    """Raise a UserError (one line, exit 2) unless `condition` holds."""
    if not condition:
        raise UserError(message)
