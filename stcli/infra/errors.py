"""The one exception type that means "the user asked for something wrong"."""


class UserError(Exception):
    """A problem with the user's input: reported as one clear message, exit code 2."""


def plain_message(err: Exception) -> str:
    """The message of `err` without the traceback text a DataLoader worker wraps it in."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(("stcli.", "UserError")) else last


class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM stopped training after writing a checkpoint; it can be resumed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
