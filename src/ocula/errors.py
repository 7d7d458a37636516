"""The one exception type users see: a single sentence naming the file and the problem."""


class OculaError(Exception):
    """Bad input or a failed operation, described in one line; the CLI prints it without a traceback."""

    def __init__(self, message: str, path=None):
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)
