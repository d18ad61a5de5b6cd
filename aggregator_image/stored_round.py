"""A closed round's accepted updates read again, one tensor at a time, for the robust strategies.

Each update was checked when it arrived; reading it again, each tensor's stored bytes are hashed
once more, so an object replaced in the store since it was accepted is found (`replaced`) and left
out rather than trusted.
"""

from __future__ import annotations

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

    @property
    def sites(self) -> list[str]:
        return sorted(self._payloads)

    def stack(self, name: str) -> tuple[list[str], torch.Tensor]:
        """The sites that sent tensor `name` and their changes of it in one (N, *shape) fp32 stack."""
        shape = self._signature.shapes[name]
        senders = [site for site in self.sites if name in self._sent[site]]
        stacked = torch.empty((len(senders), *shape), dtype=torch.float32)
        for row, site in enumerate(senders):
            tensor, lines = read_update_tensor(self._payloads[site], self._signature, name, site)
            self._lines[site][name] = lines
            stacked[row] = tensor.dense() if isinstance(tensor, SparseDelta) else tensor
        return senders, stacked

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
