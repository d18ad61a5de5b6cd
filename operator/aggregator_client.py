"""The operator's side of the aggregator's HTTP API (`python -m fedtrain.aggregator serve`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from fedtrain.api import RejectedUpdate
from fedtrain.errors import INVALID_SPEC, PermanentError, TemporaryError
from fedtrain.messages import (
    MergeRequest,
    ModelReply,
    RetentionReply,
    RetentionRequest,
    RoundManifest,
    SecureAggregationReply,
    SecureAggregationRequest,
    UpdateVerdict,
)

#: How soon to ask again when the aggregator is not reachable yet (a pod starting, an image pull).
AGGREGATOR_RETRY_SECONDS = 2.0


class AggregatorUnavailableError(TemporaryError):
    """Not reachable, not ready, or answered 5xx: try again later (it may be starting or restarting).

    A wait of this kind that outlasts its bound fails the training with reason AggregatorUnavailable.
    """

    reason = "AggregatorUnavailable"

    def __init__(self, message: str, delay: float = AGGREGATOR_RETRY_SECONDS) -> None:
        super().__init__(message, delay)


#: The condition reason of a refusal, by the service's error code: the aggregator classified the
#: error where it was raised, and its code says whose fault it is. Any other code: AggregatorError.
REFUSAL_REASONS = {"invalid-spec": INVALID_SPEC}


class AggregatorRefusedError(PermanentError):
    """The aggregator refused the request for good (e.g. a round it cannot close): fail the training.

    With reason InvalidSpec where the spec does not fit the model (code invalid-spec), else
    AggregatorError.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, reason=REFUSAL_REASONS.get(code, "AggregatorError"))
        self.code = code


class AggregatorClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str, timeout: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            # A pooled connection the server had just closed: send once more on a fresh one (every
            # call is idempotent, so a request that was carried out after all is answered the same).
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(aiohttp.ServerDisconnectedError),
                stop=stop_after_attempt(2),
                reraise=True,
            ):
                with attempt:
                    return await self._post_once(path, body)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise AggregatorUnavailableError(f"POST {path}: {type(error).__name__}: {error}") from error
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _post_once(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        async with self.session.post(url, json=body, headers=self.headers, timeout=self.timeout) as reply:
            payload = await _json(reply)
            if reply.status < 300:
                return payload
            error: dict[str, Any] = payload["error"] if isinstance(payload.get("error"), dict) else {}
            code = str(error.get("code") or reply.status)
            message = str(error.get("message") or payload.get("message") or reply.reason)
            # The service says which errors are permanent (409: the request can never succeed) and
            # which pass with time (503 with Retry-After; 401 while a replaced token Secret reaches
            # the pod; a 5xx of a proxy in between): the engine bounds how long those are waited for.
            if reply.status == 409:
                raise AggregatorRefusedError(code, message)
            raise AggregatorUnavailableError(
                f"POST {path}: HTTP {reply.status} {code}: {message}", _retry_after(reply)
            )

    async def initialize(self) -> str:
        return str((await self._post("/v1/initialize"))["model_uri"])

    async def submit(self, round_index: int, site: str) -> UpdateVerdict:
        return UpdateVerdict.model_validate(
            await self._post(f"/v1/rounds/{round_index}/updates", {"site": site})
        )

    async def close(
        self, round_index: int, participants: list[str], rejected: list[RejectedUpdate]
    ) -> RoundManifest:
        body = {
            "participants": participants,
            "rejected": [item.model_dump(mode="json") for item in rejected],
        }
        return RoundManifest.model_validate(await self._post(f"/v1/rounds/{round_index}/close", body))

    async def advance_secure(
        self, round_index: int, live: list[str], started_at: datetime, now: datetime
    ) -> SecureAggregationReply:
        body = SecureAggregationRequest(live=live, started_at=started_at, now=now).model_dump(mode="json")
        return SecureAggregationReply.model_validate(
            await self._post(f"/v1/rounds/{round_index}/secagg", body)
        )

    async def apply_retention(self, round_index: int, updates: bool, models: list[int]) -> int:
        body = RetentionRequest(updates=updates, models=models).model_dump(mode="json")
        reply = RetentionReply.model_validate(await self._post(f"/v1/rounds/{round_index}/retention", body))
        return reply.deleted

    async def merge(self, round_index: int, best_round: int | None) -> ModelReply:
        body = MergeRequest(round=round_index, best_round=best_round).model_dump(mode="json")
        return ModelReply.model_validate(await self._post("/v1/merge", body))


async def _json(reply: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        payload = await reply.json(content_type=None)
    except ValueError:
        return {"message": (await reply.text())[:300]}
    return payload if isinstance(payload, dict) else {"message": str(payload)[:300]}


def _retry_after(reply: aiohttp.ClientResponse) -> float:
    try:
        return max(0.1, float(reply.headers.get("Retry-After", AGGREGATOR_RETRY_SECONDS)))
    except ValueError:
        return AGGREGATOR_RETRY_SECONDS
