"""Stop: the error that ends a commissioning run, carrying the message
that tells the electrician what to do about it and the exit code. Raised
by the CLI, the gateway client, the site sheet and every step."""
from __future__ import annotations


class Stop(Exception):
    """The commissioning cannot go on; the message says what to do."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code
