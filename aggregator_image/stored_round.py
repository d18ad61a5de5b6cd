"""A closed round's accepted updates read again, one tensor at a time, for the robust strategies.

Each update was checked when it arrived; reading it again, each tensor's stored bytes are hashed
once more, so an object replaced in the store since it was accepted is found (`replaced`) and left
out rather than trusted.

Every stack is a view of one fp32 buffer of (sites x the largest tensor) elements, allocated at the
first read and refilled for each tensor: the close's peak is bounded by that buffer, not by how the
allocator reuses a fresh N x tensor block freed for every tensor (glibc kept such blocks resident,
which broke the memory target of benchmarks/aggregate.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from fedtrain.codec import Payload, Signature, SparseDelta
from fedtrain.updates import read_update_tensor, sent_tensors, update_digest


class StoredRound:
    """The participants' updates of a round (lazily read payloads), as `StoredUpdates`."""

    def __init__(self, payloads: dict[str, Payload], signature: Signature) -> None:
        self._payloads = payloads
        self._signature = signature
        self._sent = {site: set(sent_tensors(payload)) for site, payload in payloads.items()}
        self._lines: dict[str, dict[str, list[str]]] = {site: {} for site in payloads}
        self._buffer: torch.Tensor | None = None

    @property
    def sites(self) -> list[str]:
        return sorted(self._payloads)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._signature.shapes[name])

    def stack(
        self, name: str, among: Collection[str] | None = None, zeros: bool = False
    ) -> tuple[list[str], torch.Tensor]:
        """The sites (of `among`, default all) that sent tensor `name` and their changes of it in one
        (N, *shape) fp32 stack; with `zeros`, one row per site of `among`, zeros where it sent none.
        The stack is a view of the round's buffer: valid until the next call, and the caller's to
        overwrite."""
        wanted = self.sites if among is None else [site for site in self.sites if site in among]
        senders = [site for site in wanted if name in self._sent[site]]
        rows = wanted if zeros else senders
        stacked = self._rows(len(rows), self.shape(name))
        for row, site in enumerate(rows):
            if site not in senders:
                stacked[row].zero_()
                continue
            tensor, lines = read_update_tensor(self._payloads[site], self._signature, name, site)
            self._lines[site][name] = lines
            stacked[row] = tensor.dense() if isinstance(tensor, SparseDelta) else tensor
            del tensor  # one update's tensor at a time beside the buffer
        return senders, stacked

    def _rows(self, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A (count, *shape) view of the buffer, allocated at the first call for every site and the
        largest tensor of the signature."""
        if self._buffer is None:
            largest = max((math.prod(size) for size in self._signature.shapes.values()), default=0)
            self._buffer = torch.empty(len(self._payloads) * largest, dtype=torch.float32)
        return self._buffer[: count * math.prod(shape)].view(count, *shape)

    def replaced(self) -> list[str]:
        """Sites whose tensors, as read here, do not hash to the checksum their update declares (and
        was accepted with): changed in the store since. Only once every tensor sent was read."""
        changed = []
        for site, payload in self._payloads.items():
            if set(self._lines[site]) != self._sent[site]:
                continue  # not every tensor was read: nothing to compare
            lines = (line for lines in self._lines[site].values() for line in lines)
            if update_digest(lines) != payload.meta.tensors_sha256:
                changed.append(site)
        return sorted(changed)
