"""Every error a driver can meet is classified once, where it is raised: temporary or permanent.

The two classes play the part of kopf's `TemporaryError` and `PermanentError`, in the contracts
package so that the store, the aggregator, its HTTP client and both drivers share them:

- a `TemporaryError` passes with time (a service starting, a network outage, a Secret not created
  yet): the driver retries after `delay` seconds and the engine records a `Waiting` condition; a
  wait that outlasts `aggregation.waitTimeoutSeconds` fails the training;
- a `PermanentError` does not (a round that cannot be closed, a model missing from the store): the
  training fails at once with a condition whose reason is `reason` and whose message says what to do.
  Reason `INVALID_SPEC` says the user's spec is at fault, also where only the model shows it (an
  exchange pattern that matches no trainable tensor): the training is then marked Invalid too, and
  the aggregator's HTTP API carries that reason across to the operator as its own error code.
"""

from __future__ import annotations

#: How soon a driver looks again after a temporary error that names no delay of its own.
DEFAULT_RETRY_SECONDS = 2.0

#: The reason of a permanent error the user's spec causes (the condition reason the operator uses for
#: a spec it refuses itself).
INVALID_SPEC = "InvalidSpec"


class TemporaryError(RuntimeError):
    """Try again after `delay` seconds; the engine bounds how long."""

    def __init__(self, message: str, delay: float = DEFAULT_RETRY_SECONDS) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(RuntimeError):
    """Retrying cannot help: the training fails with a condition of reason `reason`."""

    def __init__(self, message: str, reason: str = "AggregatorError") -> None:
        super().__init__(message)
        self.reason = reason


class CodecError(ValueError):
    """A payload that cannot be used. `reason` is a short stable code (a metrics label).

    Defined here, with no torch behind it, so that torch-free modules (fedtrain.sealing, used by the
    operator for the data key) share it with fedtrain.codec, which re-exports it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
