"""The full round history of a training: JSON lines in the bucket (the status keeps the last few)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from fedtrain.api import FederatedTrainingStatus, RoundRecord
from fedtrain.store import ObjectNotFound, ObjectStore


def append_record(store: ObjectStore, key: str, record: RoundRecord) -> str:
    """Add a closed round to the history at `key`, replacing an earlier line of the same round and
    kind (a driver that repeats a step writes it again); returns the whole history text."""
    try:
        lines = store.get_bytes(key).decode().splitlines()
    except ObjectNotFound:
        lines = []
    kept = [line for line in lines if line.strip() and _round_key(line) != (record.round, record.kind)]
    text = "\n".join([*kept, record.model_dump_json(by_alias=True)]) + "\n"
    store.put_bytes(key, text.encode())
    return text


def _round_key(line: str) -> tuple[object, object]:
    record = json.loads(line)
    return record.get("round"), record.get("kind")


class StoreHistory:
    """The `HistoryPort` of a driver whose store is opened on demand (the operator's, per training)."""

    def __init__(self, store: Callable[[], Awaitable[ObjectStore]], key: str) -> None:
        self.store = store
        self.key = key

    async def record(self, record: RoundRecord, status: FederatedTrainingStatus) -> None:
        await asyncio.to_thread(append_record, await self.store(), self.key, record)
