"""The one exception type that means "the user asked for something wrong"."""


class UserError(Exception):
    """A problem with the user's input: reported as one clear message, exit code 2."""


class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM stopped training after writing a checkpoint; it can be resumed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
