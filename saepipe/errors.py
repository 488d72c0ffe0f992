"""The one exception type for mistakes a user can make.

Raised anywhere, caught once at the CLI edge (`saepipe.cli.main`) and printed as one line with exit
code 2. Bugs stay ordinary exceptions with tracebacks.
"""


class SaepipeError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
