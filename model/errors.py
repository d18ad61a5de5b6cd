"""The error of a model that cannot be built as the spec asks (shared by the factory and exchange)."""

from __future__ import annotations

from fedtrain.errors import INVALID_SPEC, PermanentError


class ModelError(ValueError, PermanentError):
    """The spec names a model that cannot be built as asked; the message says how to fix it.

    A PermanentError too: where a driver meets it (the aggregator building the initial model) the
    training fails at once with reason InvalidSpec and this message, as for any spec it cannot act on.
    """

    def __init__(self, message: str) -> None:
        PermanentError.__init__(self, message, reason=INVALID_SPEC)
