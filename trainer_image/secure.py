"""A site's side of secure aggregation (privacy.secureAggregation), through the object store only.

The Job waits through the phases, so its secrets (X25519 private keys, self-mask seed) live in this
process's memory and nowhere else: the aggregator, which reads the bucket, never holds them.

1. `SecureSession.begin` advertises the site's public keys, before the data is even loaded;
2. after training, `SecureSession.mask` waits for the aggregator's roster, uploads the site's key
   shares (AES-GCM to each neighbour), waits for its inbox, and returns its masked input: the clipped
   update times its weight in 32-bit fixed point, with the weight as one more element, plus masks;
3. the caller uploads that as the site's update; `SecureSession.reveal` waits for the unmask
   request and uploads the shares it asks for (never both secrets of one peer).

Every wait polls the aggregator's object until the round's deadline. A site the roster or the
request leaves out (it came too late) fails with `SecureAggregationError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import numpy as np
import torch
from numpy.typing import NDArray

from fedtrain.codec import UpdateTensor
from fedtrain.dp import secure_gaussian
from fedtrain.job import SecureAggregationUrls, TrainerJob
from fedtrain.secagg import (
    Inbox,
    Roster,
    SecAggError,
    SiteSecrets,
    UnmaskRequest,
    advertise,
    mask_input,
    new_site_secrets,
    reveal_shares,
    share_keys,
)
from fedtrain.secagg_round import fixed_point, flatten, round_noise_std, site_weight
from fedtrain.store import ObjectNotFound, read_url, write_url

log = logging.getLogger("fedtrain.trainer")


def _within(vector: NDArray[np.float64], bound: float) -> NDArray[np.float64]:
    """`vector` scaled down to an L2 norm of at most `bound` (the fixed-point code refuses more)."""
    norm = float(np.linalg.norm(vector))
    return vector * (bound / norm) if norm > bound else vector


#: How often a waiting site looks for the aggregator's next object.
POLL_SECONDS = 0.5
#: How long a site waits for a phase when its job names no deadline.
DEFAULT_WAIT = timedelta(minutes=10)


class SecureAggregationError(RuntimeError):
    """This site cannot take part in the round's secure aggregation (left out, or out of time)."""


class SecureSession:
    """One site's round of the protocol; holds its secrets in memory only."""

    def __init__(self, job: TrainerJob, urls: SecureAggregationUrls, secrets: SiteSecrets) -> None:
        self.job, self.urls, self.secrets = job, urls, secrets
        self.roster: Roster | None = None
        self.inbox: Inbox | None = None

    @classmethod
    def begin(cls, job: TrainerJob) -> SecureSession:
        """Make this round's keys and advertise them (AdvertiseKeys)."""
        urls = job.secure_aggregation
        if urls is None:
            raise ValueError("the job carries no secure-aggregation URLs")
        secrets = new_site_secrets(job.training, job.round, job.site)
        write_url(urls.advert_put_url, advertise(secrets).to_bytes(), deadline=job.transfer_deadline)
        log.info("secure aggregation: keys advertised")
        return cls(job, urls, secrets)

    def mask(self, delta: Mapping[str, UpdateTensor], samples: int) -> NDArray[np.uint32]:
        """ShareKeys and MaskedInputCollection: the masked input of this site's clipped update."""
        vector = self._clipped(delta)
        self.roster = Roster.from_bytes(self._wait(self.urls.roster_get_url, "the roster"), *self._context())
        if self.job.site not in self.roster.sites:
            raise SecureAggregationError(
                f"the round's roster leaves {self.job.site} out: its keys arrived after the aggregator "
                "closed the key phase (secureAggregation.phaseTimeoutSeconds)"
            )
        encoded = self._encode(vector, samples, self.roster.threshold)
        try:
            bundle = share_keys(self.secrets, self.roster)
            write_url(self.urls.shares_put_url, bundle.to_bytes(), deadline=self.job.transfer_deadline)
            log.info("secure aggregation: key shares sent to %d sites", len(bundle.ciphertexts))
            self.inbox = Inbox.from_bytes(self._wait(self.urls.inbox_get_url, "its inbox"), *self._context())
            masked = mask_input(self.secrets, self.roster, self.inbox, encoded)
        except SecAggError as error:  # another attempt's keys in the roster, too few peers, a bad inbox
            raise SecureAggregationError(f"secure aggregation: {error}") from None
        log.info("secure aggregation: input masked with %d peers", len(self.inbox.ciphertexts) - 1)
        return masked.vector

    def _clipped(self, delta: Mapping[str, UpdateTensor]) -> NDArray[np.float64]:
        """The shared tensors in name order as one vector, within privacy.clipNorm (rounding to the
        transfer dtype may have crossed it)."""
        clip = self.job.spec.privacy.clip_norm
        if clip is None:
            raise ValueError("privacy.secureAggregation needs privacy.clipNorm")
        dense = {name: tensor for name, tensor in delta.items() if isinstance(tensor, torch.Tensor)}
        if len(dense) != len(delta):
            raise ValueError("secure aggregation masks whole tensors: exchange policy sparse is refused")
        vector = flatten(
            {name: tensor.detach().to(torch.float64).numpy() for name, tensor in dense.items()},
            {name: tuple(tensor.shape) for name, tensor in dense.items()},
        )
        return _within(vector, clip)

    def _encode(self, vector: NDArray[np.float64], samples: int, threshold: int) -> NDArray[np.uint32]:
        """The site's input in the ring: under privacy.dp with its share of the noise added first."""
        privacy = self.job.spec.privacy
        secure, clip = privacy.secure_aggregation, privacy.clip_norm
        if secure is None or clip is None:
            raise ValueError("privacy.secureAggregation needs privacy.clipNorm")
        noise = round_noise_std(privacy, threshold)
        if noise > 0:  # privacy.dp: this site's share of the noise on the sum
            vector = vector + secure_gaussian(vector.size, noise)
        code = fixed_point(secure, clip, self.urls.sites, self.urls.weighting, noise, vector.size)
        weight = site_weight(secure, self.urls.weighting, samples)
        return code.encode(_within(vector, code.clip_norm), weight)

    def reveal(self) -> None:
        """Unmasking: the shares the aggregator's request asks of this survivor."""
        if self.roster is None or self.inbox is None:
            raise ValueError("mask() first")
        request = UnmaskRequest.from_bytes(
            self._wait(self.urls.request_get_url, "the unmask request"), *self._context()
        )
        try:
            response = reveal_shares(self.secrets, self.roster, self.inbox, request)
        except SecAggError as error:
            raise SecureAggregationError(f"the unmask request is refused: {error}") from None
        write_url(self.urls.reveal_put_url, response.to_bytes(), deadline=self.job.transfer_deadline)
        log.info(
            "secure aggregation: revealed %d self-mask and %d key shares",
            len(response.self_mask_shares),
            len(response.key_shares),
        )

    def _context(self) -> tuple[str, int]:
        return self.job.training, self.job.round

    def _wait(self, url: str, what: str) -> bytes:
        """The object at `url` once the aggregator wrote it; SecureAggregationError past the deadline."""
        deadline = self.job.transfer_deadline or datetime.now(UTC) + DEFAULT_WAIT
        log.info("secure aggregation: waiting for %s", what)
        while True:
            try:
                return read_url(url, deadline=deadline)
            except ObjectNotFound:
                if datetime.now(UTC) >= deadline:
                    raise SecureAggregationError(
                        f"secure aggregation: {what} did not come by {deadline.isoformat()}"
                    ) from None
                time.sleep(POLL_SECONDS)
