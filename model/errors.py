"""The error of a model that cannot be built as the spec asks (shared by the factory and exchange)."""


class ModelError(ValueError):
    """The spec names a model that cannot be built as asked; the message says how to fix it."""
