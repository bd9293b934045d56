"""User-facing errors: one sentence that says what is wrong and how to fix it."""


class ProxyVError(Exception):
    """A failure the user can fix. The CLI prints the message on one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
