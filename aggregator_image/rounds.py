"""The aggregator library: validate each site's update as it arrives, fold it, close the round.

Each round keeps one running sum, so memory stays near two models whatever the number of sites.
Every call is idempotent: submitting an update twice returns the first verdict, closing a closed
round returns its manifest, and a restarted aggregator rebuilds an open round from the updates
in the store when the round is closed with the participants the engine recorded.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fedtrain.api import (
    CLIP_BELOW_METRIC,
    CLIP_CONFIG_KEY,
    EvalMetrics,
    FederatedTrainingSpec,
    LoraAggregation,
    RejectedUpdate,
    SiteSpec,
    TransferDtype,
    UncertaintyMethod,
)
from fedtrain.codec import (
    MODEL_TRANSFER_DTYPES,
    CodecError,
    Metadata,
    Payload,
    PayloadKind,
    Signature,
    UpdateTensor,
    decode,
    decode_header,
    encode,
    encode_file,
    header_length,
    parse_json,
    squared_norm,
)
from fedtrain.dp import (
    adaptive_clip_next,
    central_noise_std,
    clip_factor,
    effective_noise_multiplier,
    noised_below_fraction,
)
from fedtrain.errors import PermanentError
from fedtrain.evaluation import check_reported
from fedtrain.layout import TrainingLayout
from fedtrain.lora_ranks import config_scale, shapes_at_rank
from fedtrain.messages import (
    ModelReply,
    Participant,
    RoundManifest,
    SecureAggregationRecord,
    UpdateVerdict,
)
from fedtrain.retention import model_keys, oldest_kept_model, update_keys
from fedtrain.sealed_store import SealedStore
from fedtrain.sealing import DataKey
from fedtrain.secagg_round import element_count, unflatten
from fedtrain.store import ObjectNotFound, ObjectStore
from fedtrain.swag import DIGEST_KEY as SWAG_DIGEST_KEY
from fedtrain.updates import (
    check_base_model,
    check_update,
    check_update_header,
    read_update_tensor,
    sent_tensors,
)

from .lora_strategy import LoraProduct, LoraProductMean
from .noisy_mean import NoisyMean, scaled
from .robust_strategies import RobustOutcome, RobustStrategy
from .secure_rounds import (
    SecAggProgress,
    SecureAggregationFailed,
    SecureRounds,
    masked_input_problem,
    masked_vector,
)
from .stored_round import StoredRound
from .strategies import Accumulator, WeightedMean, make_strategy, site_weight
from .swag_rounds import SwagRounds

log = logging.getLogger(__name__)

#: The most samples a site whose data size the spec does not state (npz, imageFolder) may report: its
#: weight under `weighting: samples`. Synthetic sites are bounded by the maps they generate.
MAX_SITE_SAMPLES = 10_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A rejection's message is cut here: it ends in the round's manifest and the resource's status.
MAX_MESSAGE_CHARS = 1000
#: The first read of an update on S3: its whole header, for a LoRA update of a few hundred tensors.
HEAD_BYTES = 64 * 1024
#: Scalars a trainer reports (train_loss, samples_per_second...); the rest of its metrics is ignored.
MAX_TRAIN_METRICS = 64


class AggregationError(PermanentError):
    """A round that cannot be closed as asked (no accepted update, a participant missing)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="AggregatorError")


class UnknownRoundError(LookupError):
    """A request about a round whose global model cannot exist yet (its previous round is not closed)."""


class MissingModelError(AggregationError):
    """A round's global model is not in the store: it was written before the round began, so it was
    deleted (or the store reset) since. No retry brings it back."""


class _TooLarge(Exception):  # noqa: N818 (a verdict: the update's norm is above the bound)
    def __init__(self, norm: float, message: str) -> None:
        super().__init__(message)
        self.norm = norm


class _Judged(Exception):  # noqa: N818 (not an error: a verdict given early)
    """A verdict the header gave: raised out of the download it spares."""

    def __init__(self, verdict: UpdateVerdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


@dataclass
class _OpenRound:
    accumulator: Accumulator
    verdicts: dict[str, UpdateVerdict] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # of the updates in the sum
    # The checksum each accepted update had when it was accepted, also kept in the store (pins_key):
    # an object replaced since is refused, also by an aggregator restarted in between.
    pins: dict[str, str] = field(default_factory=dict)
    dirty: bool = False  # part of the update being folded is in the sum
    # Part of a rejected update is in the sum: it is rebuilt once, when the round closes, so a
    # rejection costs the reading of one update, never the re-reading of every accepted one.
    tainted: bool = False
    # A robust strategy's result: who its aggregate left out (set when the round closes).
    outcome: RobustOutcome | None = None
    # SCAFFOLD: the sum of the accepted updates' control changes (unweighted).
    control: WeightedMean | None = None
    # lora.aggregation product: the energy each adapted layer's truncation kept, and for each site
    # rank below the global one what the truncation to that rank keeps (set at close).
    lora_energy: dict[str, float] = field(default_factory=dict)
    lora_energy_by_rank: dict[str, dict[str, float]] = field(default_factory=dict)
    # Adaptive clipping: how many of the folded updates were within the round's clip.
    clip_below: int = 0
    # evaluation.uncertainty swag: the moments each folded update names (its metadata's digest).
    swag_digests: dict[str, str] = field(default_factory=dict)


class RoundAggregator:
    """One training's rounds: updates checked and folded as they arrive, rounds closed into models.

    It assumes it is the only writer of its training's round manifests (the aggregator Deployment
    runs one replica and is replaced with Recreate; the local runner has one in-process): a round it
    holds open or has seen closed is known without reading the store again.
    """

    def __init__(
        self,
        store: ObjectStore,
        layout: TrainingLayout,
        spec: FederatedTrainingSpec,
        pretrained_weights: Path | bytes | None = None,
        max_site_samples: int = MAX_SITE_SAMPLES,
        data_key: DataKey | None = None,
    ) -> None:
        """`data_key`: the training's key, which privacy.encryptAtRest needs (its tensor objects are
        then sealed and opened on the way through `store`)."""
        if spec.privacy.encrypt_at_rest:
            if data_key is None:
                raise AggregationError(
                    "privacy.encryptAtRest is on but the aggregator was given no data key "
                    "(FEDTRAIN_AGGREGATOR_DATA_KEY_FILE): it cannot read or write the training's objects"
                )
            store = SealedStore(store, data_key, layout.name)
        self.store = store
        self.secure = (
            SecureRounds(store, layout, spec) if spec.privacy.secure_aggregation is not None else None
        )
        self.max_site_samples = max_site_samples
        self.layout = layout
        self.spec = spec
        self.strategy = (
            LoraProduct(spec.lora.alpha, [site.lora_rank for site in spec.sites if site.lora_rank])
            if spec.lora.aggregation is LoraAggregation.PRODUCT
            else make_strategy(spec.aggregation.strategy, spec.aggregation)
        )
        self._pretrained_weights = pretrained_weights
        self.swag = (
            SwagRounds(store, layout, spec)
            if spec.evaluation.uncertainty.method is UncertaintyMethod.SWAG
            else None
        )
        self._open: dict[int, _OpenRound] = {}
        self._manifests: dict[int, RoundManifest] = {}  # closed rounds as read or written
        # The current round's global model signature and metadata; checked once per round.
        self._signatures: dict[int, tuple[Signature, Metadata]] = {}

    # ---------------------------------------------------------------------------------------------
    # reading

    @contextmanager
    def _opened(
        self, key: str, verify: bool, judge: Callable[[tuple[Payload, int]], None] | None = None
    ) -> Iterator[tuple[Payload, int]]:
        """An object decoded for reading tensor by tensor, and its size in bytes.

        A local store's file is read in place; an S3 object is first downloaded to a temporary
        file, so neither needs memory for more than the tensors being worked on. `judge` sees an S3
        object's header (one or two ranged reads) before the download, and raises to refuse it.
        """
        path = self.store.local_path(key)
        if path is not None:
            if not path.exists():
                raise ObjectNotFound(self.store.uri(key))
            yield decode(path, name=key, verify=verify), path.stat().st_size
            return
        if judge is not None and not isinstance(self.store, SealedStore):  # a sealed object is read whole
            judge(self._remote_header(key))
        with tempfile.TemporaryDirectory(prefix="fedtrain-aggregator-") as scratch:
            local = Path(scratch) / "object.safetensors"
            self.store.get_file(key, local)
            yield decode(local, name=key, verify=verify), local.stat().st_size

    @property
    def model_dtype(self) -> TransferDtype:
        """The dtype of the global models sent to the sites: the transfer dtype (bf16 with int8)."""
        return MODEL_TRANSFER_DTYPES[self.spec.training.transfer_dtype]

    @contextmanager
    def _exact_model(self, round_index: int, verify: bool) -> Iterator[tuple[Payload, int]]:
        """The global model in full precision: the fp32 copy, or the sites' model when it is fp32 (or
        when the copy is missing, for a training started before models were sent in lower precision)."""
        key = self.layout.exact_global_model(round_index)
        if self.model_dtype is not TransferDtype.FP32 and self.store.exists(key):
            with self._opened(key, verify=verify) as opened:
                yield opened
            return
        if self.model_dtype is not TransferDtype.FP32:
            log.warning("round %d: no fp32 copy of the global model; the sites' copy is used", round_index)
        with self._global_model(round_index, verify) as opened:
            yield opened

    def _put_model(
        self, tensors: dict[str, torch.Tensor], meta: Metadata, round_index: int
    ) -> tuple[Metadata, str]:
        """Write a global model: the fp32 copy first when the sites get a lower precision, then the
        sites' model (whose key the trainers are given). Returns the sites' metadata and file sha256."""
        with tempfile.TemporaryDirectory(prefix="fedtrain-aggregator-") as scratch:
            staged = Path(scratch) / "global.safetensors"
            if self.model_dtype is not TransferDtype.FP32:
                exact = meta.model_copy(update={"transfer_dtype": TransferDtype.FP32})
                encode_file(tensors, exact, staged)
                self.store.put_file(self.layout.exact_global_model(round_index), staged)
            written, file_sha256 = encode_file(
                tensors, meta.model_copy(update={"transfer_dtype": self.model_dtype}), staged
            )
            self.store.put_file(self.layout.global_model(round_index), staged)
        return written, file_sha256

    @contextmanager
    def _global_model(self, round_index: int, verify: bool) -> Iterator[tuple[Payload, int]]:
        try:
            with self._opened(self.layout.global_model(round_index), verify=verify) as opened:
                yield opened
        except ObjectNotFound as error:
            raise MissingModelError(
                f"the global model of round {round_index} is missing from the store ({error}): it was "
                "deleted or the bucket was reset; start the training again under a new name"
            ) from None

    def signature(self, round_index: int) -> Signature:
        """Names, shapes and base fingerprint of round `round_index`'s global model (checked once)."""
        if round_index not in self._signatures:
            with self._global_model(round_index, verify=True) as (payload, _):
                self._signatures = {round_index: (Signature.of(payload), payload.meta)}
        return self._signatures[round_index][0]

    def site_signature(self, round_index: int, site: str) -> Signature:
        """What `site`'s update must match: the global model's signature, with each adapted layer's
        factors at the site's own rank where sites[].loraRank sets one below the global rank."""
        signature = self.signature(round_index)
        rank = self.spec.site(site).lora_rank
        global_rank = self._signatures[round_index][1].config.get("rank")
        if rank is None or not isinstance(global_rank, int) or rank >= global_rank:
            return signature
        return Signature(shapes_at_rank(signature.shapes, rank), signature.base_fingerprint)

    def manifest(self, round_index: int) -> RoundManifest | None:
        """The round's manifest if it is closed; None while it is open."""
        if round_index in self._manifests:
            return self._manifests[round_index]
        if round_index in self._open:
            return None  # open here, and no one else closes it
        try:
            manifest = RoundManifest.model_validate_json(
                self.store.get_bytes(self.layout.manifest(round_index))
            )
        except ObjectNotFound:
            return None
        self._manifests[round_index] = manifest
        return manifest

    def open_verdicts(self, round_index: int) -> dict[str, UpdateVerdict]:
        """The verdicts given in an open round since this aggregator started (none after a restart)."""
        open_round = self._open.get(round_index)
        return dict(open_round.verdicts) if open_round is not None else {}

    @classmethod
    def verdicts_from_manifest(cls, manifest: RoundManifest) -> dict[str, UpdateVerdict]:
        """The verdict a closed round gives each site its manifest names, as submit() would."""
        sites = [p.site for p in manifest.participants] + [r.site for r in manifest.rejected]
        return {site: cls._verdict_from_manifest(manifest, site) for site in sites}

    # ---------------------------------------------------------------------------------------------
    # round 0

    def initialize(self) -> str:
        """Write the initial global model (round 0) unless it exists; return its URI."""
        from fedtrain.model import build_model  # timm and peft only where a model is built

        key = self.layout.global_model(0)
        if not self.store.exists(key):
            model = build_model(self.spec, self._pretrained_weights)
            meta = Metadata(
                kind=PayloadKind.MODEL,
                training=self.layout.name,
                round=0,
                base_fingerprint=model.base_fingerprint,
                config={"rank": model.rank, "alpha": model.alpha, "parameters": model.parameter_count},
            )
            self._put_model(model.exchanged_state(), meta, 0)
            log.info("initial global model written to %s", self.store.uri(key))
        control = self.layout.server_control(0)
        if self.spec.aggregation.scaffold and not self.store.exists(control):
            with self._global_model(0, verify=False) as (initial, _):
                zeros = {name: torch.zeros(shape) for name, shape in initial.shapes.items()}
            state = Metadata(kind=PayloadKind.STATE, training=self.layout.name, round=0)
            self.store.put_bytes(control, encode(zeros, state))
        return self.store.uri(key)

    # ---------------------------------------------------------------------------------------------
    # updates

    def _round(self, round_index: int) -> _OpenRound:
        if round_index not in self._open:
            self._open[round_index] = self._new_round(round_index)
        return self._open[round_index]

    def _new_round(self, round_index: int) -> _OpenRound:
        shapes = self.signature(round_index).shapes
        open_round = _OpenRound(self._accumulator(round_index, shapes))
        if self.spec.aggregation.scaffold:
            open_round.control = WeightedMean(shapes)
        open_round.pins = self._read_pins(round_index)
        return open_round

    def _accumulator(self, round_index: int, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        """The strategy's running sum; under privacy.dp, DP-FedAvg's noised fixed-denominator mean
        (with adaptive clipping, noised with the share of the budget the count of sites within the
        clip leaves, Andrew et al.)."""
        privacy = self.spec.privacy
        dp, clip = privacy.dp, self._round_clip(round_index)
        if dp is None or clip is None:
            return self.strategy.accumulator(shapes)
        expected = self.spec.aggregation.sites_per_round(len(self.spec.sites))
        sigma = dp.noise_multiplier
        if privacy.adaptive_clipping is not None:
            sigma = effective_noise_multiplier(sigma, privacy.bit_noise_std(expected))
        return NoisyMean(shapes, central_noise_std(sigma, clip), expected)

    def _round_clip(self, round_index: int) -> float | None:
        """The clip of round `round_index`: in its global model's metadata when adaptive, else clipNorm."""
        self.signature(round_index)
        return self.spec.privacy.round_clip(self._signatures[round_index][1].config)

    def _next_clip(self, round_index: int, open_round: _OpenRound) -> float | None:
        """Adaptive clipping: the next round's clip from the share of this round's folded updates that
        were within its clip (noised under dp); None without adaptive clipping."""
        adaptive, clip = self.spec.privacy.adaptive_clipping, self._round_clip(round_index)
        if adaptive is None or clip is None or not open_round.weights:
            return None if adaptive is None else clip
        expected = self.spec.aggregation.sites_per_round(len(self.spec.sites))
        below = noised_below_fraction(
            open_round.clip_below,
            len(open_round.weights),
            expected,
            self.spec.privacy.bit_noise_std(expected),
        )
        return adaptive_clip_next(clip, below, adaptive.target_quantile, adaptive.learning_rate)

    def _read_pins(self, round_index: int) -> dict[str, str]:
        try:
            raw = parse_json(
                self.store.get_bytes(self.layout.accepted_updates(round_index)), "accepted-updates.json"
            )
        except ObjectNotFound:
            return {}
        except CodecError as error:  # written only by the aggregator: a broken one is not a site's doing
            raise AggregationError(
                f"round {round_index}: the record of accepted updates is corrupt: {error}"
            ) from None
        return {str(site): str(sha) for site, sha in raw.items()} if isinstance(raw, dict) else {}

    def _pin(self, round_index: int, open_round: _OpenRound, verdict: UpdateVerdict) -> None:
        """Record the accepted update's checksum in the store before the verdict is given."""
        if verdict.sha256 is None or open_round.pins.get(verdict.site) == verdict.sha256:
            return
        pins = {**open_round.pins, verdict.site: verdict.sha256}
        self.store.put_bytes(
            self.layout.accepted_updates(round_index), json.dumps(pins, sort_keys=True).encode()
        )
        open_round.pins = pins

    def submit(self, round_index: int, site: str) -> UpdateVerdict:
        """Validate a site's uploaded update and fold it into the round; return the verdict."""
        manifest = self.manifest(round_index)
        if manifest is not None:
            return self._verdict_from_manifest(manifest, site)
        open_round = self._round(round_index)
        if site in open_round.verdicts:
            return open_round.verdicts[site]
        verdict = self._fold(round_index, site, open_round)
        if verdict.accepted:
            self._pin(round_index, open_round, verdict)
        open_round.verdicts[site] = verdict
        if not verdict.accepted and open_round.dirty:
            open_round.tainted, open_round.dirty = True, False
        level = logging.INFO if verdict.accepted else logging.WARNING
        log.log(level, "round %d site %s: %s", round_index, site, verdict.reason or "accepted")
        return verdict

    def _reject(
        self, round_index: int, site: str, reason: str, message: str, **extra: object
    ) -> UpdateVerdict:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        return UpdateVerdict(
            round=round_index, site=site, accepted=False, reason=reason, message=message, **extra
        )

    def _fold(self, round_index: int, site: str, open_round: _OpenRound) -> UpdateVerdict:
        """Check an update and fold it in the same single read of each tensor.

        Tensors are added as they pass their own checks; if the update is then rejected as a
        whole (checksum, a later tensor, the norm bound), `open_round.dirty` is set: the round is
        then tainted, and its close rebuilds the sum from the accepted updates, once however many
        updates were rejected. Reading every update once instead of twice is what keeps aggregation
        near memory speed; a rejection costs the reading of that update alone.
        """
        key = self.layout.update(round_index, site)

        def judge(opened: tuple[Payload, int]) -> None:
            verdict = self._judge_header(round_index, site, key, opened, open_round)
            if verdict is not None:
                raise _Judged(verdict)

        try:
            with self._opened(key, verify=False, judge=judge) as opened:
                return self._fold_payload(round_index, site, key, opened, open_round)
        except _Judged as judged:
            return judged.verdict
        except ObjectNotFound:
            return self._reject(round_index, site, "missing", f"no update at {self.store.uri(key)}")
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error))

    def _remote_header(self, key: str) -> tuple[Payload, int]:
        """An object's header and size, from one or two ranged reads: never more than the header."""
        head, total = self.store.get_range(key, 0, HEAD_BYTES)
        end = 8 + header_length(head, total, key)
        if end > len(head):
            head += self.store.get_range(key, len(head), end - len(head))[0]
        return decode_header(head, total, key), total

    def _judge_header(
        self, round_index: int, site: str, key: str, opened: tuple[Payload, int], open_round: _OpenRound
    ) -> UpdateVerdict | None:
        """The verdict the header alone gives (a rejection, or an evaluation report's); None: read on."""
        payload, size = opened
        meta = payload.meta
        if (meta.training, meta.round, meta.site) != (self.layout.name, round_index, site):
            return self._reject(
                round_index,
                site,
                "mismatch",
                f"{key} is the update of training {meta.training} round {meta.round} site {meta.site}",
            )
        try:
            common = _common(meta, size, self.spec.model.class_count, [s.name for s in self.spec.sites])
        except ValueError as error:
            return self._reject(round_index, site, "metadata", f"{key} has unusable metrics: {error}")
        site_spec = next((s for s in self.spec.sites if s.name == site), None)
        if site_spec is None:
            return self._reject(round_index, site, "unknown-site", f"{site} is not a site of this training")
        pinned = open_round.pins.get(site)
        if pinned is not None and pinned != meta.tensors_sha256:
            message = f"{key} was replaced after it was accepted (checksum {pinned[:12]}...)"
            return self._reject(round_index, site, "replaced", message, **common)
        if problem := self._samples_problem(site_spec, meta):
            return self._reject(round_index, site, "samples", f"{key} reports {problem}", **common)
        if meta.kind is PayloadKind.REPORT:
            return self._report_verdict(round_index, site, key, meta, common)
        if self.secure is not None:
            return self._masked_verdict(round_index, site, key, payload, common)
        if (sent := meta.transfer_dtype) is not (expected := self.spec.training.transfer_dtype):
            message = f"{key} was sent in {sent.value}; this training's transferDtype is {expected.value}"
            return self._reject(round_index, site, "dtype", message, **common)
        try:
            check_update_header(
                payload,
                self.site_signature(round_index, site),
                name=key,
                exchange=self.spec.exchange,
                control=self.spec.aggregation.scaffold,
            )
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error), **common)
        return None

    def _masked_verdict(
        self, round_index: int, site: str, key: str, payload: Payload, common: dict[str, Any]
    ) -> UpdateVerdict:
        """privacy.secureAggregation: a site's update is its masked input, of the model's length,
        of the round's unmasking set (U3), and of this training's base model; nothing is folded
        until the round closes (only the sum can be unmasked)."""
        assert self.secure is not None
        problem = masked_input_problem(payload, self.signature(round_index).shapes)
        if problem is None and site not in self.secure.masked_sites(round_index):
            problem = "the site is not among the masked inputs of the round's unmask request"
        if problem is not None:
            return self._reject(round_index, site, "secagg", f"{key}: {problem}", **common)
        try:
            check_base_model(payload.meta, self.signature(round_index), name=key)
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error), **common)
        return UpdateVerdict(round=round_index, site=site, accepted=True, **common)

    def advance_secure(
        self, round_index: int, live: list[str], started_at: datetime, now: datetime
    ) -> SecAggProgress:
        """privacy.secureAggregation: end the round's current protocol phase if it may end."""
        if self.secure is None:
            raise AggregationError("this training does not use privacy.secureAggregation")
        if self.manifest(round_index) is not None:
            return SecAggProgress("closed")
        self.signature(round_index)  # the round's global model exists: the round has begun
        return self.secure.advance(round_index, live, started_at, now)

    def _samples_problem(self, site_spec: SiteSpec, meta: Metadata) -> str | None:
        """Why the sample counts (the update's weight, the evaluation's) cannot be the site's, if so."""
        synthetic = site_spec.data.synthetic
        limit = synthetic.samples if synthetic is not None else self.max_site_samples
        evaluated = [
            (key, figures.get("samples"))
            for key in ("evaluation", "test")
            if isinstance(figures := meta.metrics.get(key), dict)
        ]
        for what, count in (("training", meta.samples), *evaluated):
            if isinstance(count, int) and count > limit:
                return f"{count} {what} samples; the site's data holds at most {limit}"
        return None

    def _is_training_round(self, round_index: int) -> bool:
        """Whether the round surely trains: only early stopping makes an earlier round the evaluation."""
        return round_index < self.spec.training.rounds and self.spec.evaluation.patience is None

    def _fold_payload(
        self, round_index: int, site: str, key: str, opened: tuple[Payload, int], open_round: _OpenRound
    ) -> UpdateVerdict:
        verdict = self._judge_header(round_index, site, key, opened, open_round)
        if verdict is not None:
            return verdict
        payload, size = opened
        meta = payload.meta
        common = _common(meta, size, self.spec.model.class_count, [s.name for s in self.spec.sites])
        try:
            weight = site_weight(self.spec.aggregation.weighting, meta.samples, self.spec.site(site).weight)
        except ValueError as error:
            return self._reject(round_index, site, "samples", str(error), **common)
        below = meta.metrics.get(CLIP_BELOW_METRIC)
        if self.spec.privacy.adaptive_clipping is not None and below not in (0.0, 1.0):
            message = f"{key} reports {CLIP_BELOW_METRIC} {below!r}; adaptive clipping needs 0 or 1"
            return self._reject(round_index, site, "metadata", message, **common)

        signature, clip = self.site_signature(round_index, site), self._round_clip(round_index)
        swag_problem, swag_bytes = self._swag_problem(round_index, site, signature, meta)
        if swag_problem is not None:
            return self._reject(round_index, site, "swag", swag_problem, **common)
        common["update_bytes"] += swag_bytes
        try:
            norm = self._check_and_fold(payload, key, signature, weight, open_round, clip)
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error), **common)
        except _TooLarge as error:
            return self._reject(round_index, site, "norm", str(error), norm=error.norm, **common)
        open_round.accumulator.count(weight)
        if open_round.control is not None:
            open_round.control.count(1.0)
        open_round.dirty = False
        open_round.weights[site] = weight
        if isinstance(digest := meta.config.get(SWAG_DIGEST_KEY), str):
            open_round.swag_digests[site] = digest
        open_round.clip_below += 1 if below == 1.0 else 0
        return UpdateVerdict(round=round_index, site=site, accepted=True, norm=norm, **common)

    def _swag_problem(
        self, round_index: int, site: str, signature: Signature, meta: Metadata
    ) -> tuple[str | None, int]:
        """evaluation.uncertainty swag: why the site's moments of a SWAG round cannot be accepted, and
        their size (counted with the update's: both left the site)."""
        if self.swag is None or not self.swag.collects(round_index):
            return None, 0
        return self.swag.problem(round_index, site, signature.shapes, meta.config.get(SWAG_DIGEST_KEY))

    def _check_and_fold(
        self,
        payload: Payload,
        key: str,
        signature: Signature,
        weight: float,
        open_round: _OpenRound,
        clip: float | None,
    ) -> float:
        """Check an update and fold it in with `weight`; its L2 norm. Each tensor is folded as soon as
        it passes its own checks, in the same read; under privacy.clipNorm the whole update is checked
        first (its norm is needed) and its tensors are then read again, scaled down to the clip."""
        accumulator, control = open_round.accumulator, open_round.control

        def fold(name: str, tensor: UpdateTensor) -> None:
            open_round.dirty = True
            accumulator.add_tensor(name, tensor, weight)

        def fold_control(name: str, tensor: torch.Tensor) -> None:
            open_round.dirty = True
            if control is not None:
                control.add_tensor(name, tensor, 1.0)

        norm = check_update(
            payload,
            signature,
            name=key,
            on_tensor=fold if clip is None else None,
            exchange=self.spec.exchange,
            on_control=fold_control if control is not None else None,
        )
        bound = self.spec.aggregation.max_update_norm
        if bound is not None and norm > bound:
            raise _TooLarge(norm, f"update norm {norm:.4g} exceeds aggregation.maxUpdateNorm {bound:.4g}")
        if clip is not None:
            factor = clip_factor(norm, clip)  # rounding to the transfer dtype may have crossed the clip
            for name in sent_tensors(payload):
                fold(name, scaled(read_update_tensor(payload, signature, name, key)[0], factor))
        return norm

    def _report_verdict(
        self, round_index: int, site: str, key: str, meta: Metadata, common: dict[str, Any]
    ) -> UpdateVerdict:
        """An evaluation-only report: nothing to fold, but it must be of this training's base model,
        and of the evaluation round (a training round needs an update)."""
        if self._is_training_round(round_index):
            message = f"{key} is an evaluation report, but round {round_index} is a training round"
            return self._reject(round_index, site, "report", message, **common)
        try:
            check_base_model(meta, self.signature(round_index), name=key)
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error), **common)
        site_model_uri = None
        if self.spec.publishes_site_models:
            # The trainer writes its own merged model before its report (trainer_image/train.py).
            site_model = self.layout.site_merged_model(site)
            if not self.store.exists(site_model):
                message = f"{key} arrived without the site's own merged model at {self.store.uri(site_model)}"
                return self._reject(round_index, site, "missing", message, **common)
            site_model_uri = self.store.uri(site_model)
        return UpdateVerdict(
            round=round_index, site=site, accepted=True, site_model_uri=site_model_uri, **common
        )

    def _rebuild(self, round_index: int, sites: list[str]) -> _OpenRound:
        """A fresh sum of exactly `sites`' updates, read again from the store; other verdicts kept.

        Used when a round closes after a rejected update left part of itself in the sum, after a
        restart (the sum is gone), and when the engine closes a round without an update the
        aggregator had folded.
        """
        previous = self._open.get(round_index)
        rebuilt = self._open[round_index] = self._new_round(round_index)
        if previous is not None:
            rebuilt.verdicts = {
                site: verdict for site, verdict in previous.verdicts.items() if site not in sites
            }
        changed = []
        for site in sites:
            rebuilt.verdicts[site] = self._fold(round_index, site, rebuilt)
            if rebuilt.dirty:  # the object changed in the store since it was accepted
                changed.append(site)
                rebuilt.dirty = False
        if changed:  # one more pass without all of them, whatever their number
            return self._rebuild(round_index, [site for site in sites if site not in changed])
        return rebuilt

    @staticmethod
    def _verdict_from_manifest(manifest: RoundManifest, site: str) -> UpdateVerdict:
        for participant in manifest.participants:
            if participant.site == site:
                return UpdateVerdict(
                    round=manifest.round,
                    site=site,
                    accepted=True,
                    samples=participant.samples,
                    norm=participant.norm,
                    sha256=participant.sha256,
                )
        reason = next((r.reason for r in manifest.rejected if r.site == site), "round closed without it")
        return UpdateVerdict(round=manifest.round, site=site, accepted=False, reason="closed", message=reason)

    # ---------------------------------------------------------------------------------------------
    # closing

    def close(
        self, round_index: int, participants: list[str], rejected: list[RejectedUpdate] | None = None
    ) -> RoundManifest:
        """Write the next global model and then the manifest; a closed round returns its manifest."""
        existing = self.manifest(round_index)
        if existing is not None:
            return existing
        participants = list(dict.fromkeys(participants))  # a site listed twice is still one update
        if not participants:
            raise AggregationError(f"round {round_index} has no accepted update to aggregate")
        secure = None
        if self.secure is not None:
            open_round, secure = self._secure_sum(round_index)
        else:
            open_round = self._sum_of(round_index, participants)
        meta = self._next_model_meta(round_index)
        clip = self._round_clip(round_index)  # before the next model replaces this round's signature
        next_clip = self._next_clip(round_index, open_round)
        if next_clip is not None:  # the next round's trainers and aggregator read it there
            meta.config = {**meta.config, CLIP_CONFIG_KEY: next_clip}
        model_key = self.layout.global_model(round_index + 1)
        try:
            model_sha256 = self._write_next_model(round_index, open_round, meta)
        finally:
            # The sum was turned into the next model in place: whatever happened, a retry must
            # rebuild it from the updates in the store.
            del self._open[round_index]
        # After the model: a robust strategy may leave out an update replaced since it was accepted.
        folded = [site for site in participants if site in open_round.weights]
        self._write_evaluation_inputs(round_index, folded, open_round)
        manifest = RoundManifest(
            training=self.layout.name,
            round=round_index,
            strategy=self.strategy.name.value,
            strategy_parameters=self.strategy.parameters(),
            not_selected=open_round.outcome.not_selected if open_round.outcome else [],
            trimmed_share=open_round.outcome.trimmed_share if open_round.outcome else {},
            lora_energy=open_round.lora_energy,
            lora_energy_by_rank=open_round.lora_energy_by_rank,
            clip_norm=clip,
            next_clip_norm=next_clip,
            server_state_key=self.layout.server_state(round_index) if self.strategy.keeps_state else None,
            weighting=self.spec.aggregation.weighting.value,
            secure_aggregation=secure,
            participants=(
                _manifest_participants(open_round, folded)
                if secure is None
                else _secure_participants(open_round, secure)
            ),
            rejected=_manifest_rejections(open_round, rejected or []),
            model_key=model_key,
            model_uri=self.store.uri(model_key),
            model_sha256=model_sha256,
        )
        # The manifest is written last: its presence is what says the round is closed.
        self.store.put_bytes(self.layout.manifest(round_index), manifest.model_dump_json(indent=2).encode())
        self._manifests[round_index] = manifest
        return manifest

    def _write_evaluation_inputs(self, round_index: int, folded: list[str], open_round: _OpenRound) -> None:
        """Before the manifest, what the final evaluation scores beside the global model: the sites'
        local models (evaluation.crossSite) and the window's SWAG (evaluation.uncertainty swag)."""
        if self.spec.evaluation.cross_site:
            self._write_local_models(round_index, folded)
        if self.swag is not None and self.swag.collects(round_index):
            weights = {site: open_round.weights[site] for site in folded}
            shapes = self.signature(round_index).shapes
            self.swag.close(round_index, weights, open_round.swag_digests, shapes)

    def _write_local_models(self, round_index: int, sites: list[str]) -> None:
        """evaluation.crossSite: each folded site's local model after the round, the global model plus
        its update (exchange policy all: every exchanged tensor), for the final evaluation's matrix;
        the previous round's are deleted. Written before the manifest, so a close that is repeated
        writes them again."""
        signature = self.signature(round_index)
        with self._exact_model(round_index, verify=False) as (current, _):
            base = {name: tensor.float() for name, tensor in current.tensors.items()}
            meta = current.meta.model_copy(update={"transfer_dtype": TransferDtype.FP32})
        for site in sites:
            key = self.layout.update(round_index, site)
            with self._opened(key, verify=True) as (payload, _):
                local = dict(base)
                for name in sent_tensors(payload):
                    delta = read_update_tensor(payload, signature, name, key)[0]
                    if not isinstance(delta, torch.Tensor):  # sparse: refused with crossSite
                        raise AggregationError(f"{key}: {name} is sparse; crossSite needs policy all")
                    local[name] = base[name] + delta.float()
            with tempfile.TemporaryDirectory(prefix="fedtrain-aggregator-") as scratch:
                staged = Path(scratch) / "local.safetensors"
                encode_file(local, meta.model_copy(update={"site": site}), staged)
                self.store.put_file(self.layout.local_model(round_index, site), staged)
        # Only the last training round's local models are scored: the previous round's may go.
        for earlier in self.spec.sites if round_index > 0 else ():
            self.store.delete(self.layout.local_model(round_index - 1, earlier.name))

    def _sum_of(self, round_index: int, participants: list[str]) -> _OpenRound:
        """The open round summing the participants' accepted updates.

        A participant the aggregator cannot fold (rejected, replaced in the store since it was
        accepted, an evaluation report) is left out and listed among the round's rejections: one
        site's file never fails a round. With none left, the next global model is the current one.
        """
        open_round = self._round(round_index)
        if open_round.tainted or set(open_round.weights) != set(participants):
            # After a restart the sum is empty; or an update arrived after the engine decided to
            # close without it: sum exactly the participants, as the engine recorded them.
            open_round = self._rebuild(round_index, participants)
        for site in participants:
            verdict = open_round.verdicts[site]
            if verdict.accepted and site not in open_round.weights:  # a report: nothing was folded
                message = "an evaluation report cannot be a participant of a training round"
                open_round.verdicts[site] = self._reject(round_index, site, "report", message)
            if not open_round.verdicts[site].accepted:
                log.warning(
                    "round %d: participant %s left out: %s",
                    round_index,
                    site,
                    open_round.verdicts[site].message,
                )
        return open_round

    def _secure_sum(self, round_index: int) -> tuple[_OpenRound, SecureAggregationRecord]:
        """privacy.secureAggregation: the open round holding the unmasked weighted mean of the
        masked inputs of U3 (sites that dropped after masking included: their input is in the sum)."""
        assert self.secure is not None
        shapes = self.signature(round_index).shapes
        # The verdicts and pins given so far (none after a restart: the pins are in the store); the
        # strategy's sum of a plain round would be a model-sized buffer left unused, so none is made.
        previous = self._open.get(round_index)
        verdicts = previous.verdicts if previous is not None else {}
        pins = previous.pins if previous is not None else self._read_pins(round_index)

        def masked_input(site: str) -> NDArray[np.uint32]:
            key = self.layout.update(round_index, site)
            try:
                with self._opened(key, verify=True) as (payload, _):
                    problem = masked_input_problem(payload, shapes)
                    pinned = pins.get(site)
                    if problem is None and pinned is not None and pinned != payload.meta.tensors_sha256:
                        problem = "it was replaced after it was accepted"
                    if problem is None:
                        return masked_vector(payload)
            except (ObjectNotFound, CodecError) as error:
                problem = str(error)
            raise SecureAggregationFailed(
                f"round {round_index}: the masked input of {site} cannot be added: {problem}",
                reason="SecAggBadInput",
            )

        mean, record = self.secure.masked_mean(round_index, element_count(shapes) - 1, masked_input)
        # The strategy's own mean: under privacy.dp the sites added the noise, and the fixed
        # denominator is already applied (not the NoisyMean of central DP).
        summed = _OpenRound(self.strategy.accumulator(shapes), verdicts, pins=pins)
        for name, array in unflatten(mean, shapes).items():
            summed.accumulator.add_tensor(name, torch.from_numpy(array.astype(np.float32)), 1.0)
        summed.accumulator.count(1.0)
        summed.weights = dict.fromkeys(record.masked, 1.0)
        self._open[round_index] = summed
        return summed, record

    def _next_model_meta(self, round_index: int) -> Metadata:
        """The metadata of round `round_index + 1`'s global model: the current one's base and config."""
        self.signature(round_index)
        current_meta = self._signatures[round_index][1]
        return Metadata(
            kind=PayloadKind.MODEL,
            training=self.layout.name,
            round=round_index + 1,
            transfer_dtype=self.model_dtype,
            base_fingerprint=current_meta.base_fingerprint,
            config=current_meta.config,
        )

    def _write_next_model(self, round_index: int, open_round: _OpenRound, meta: Metadata) -> str:
        """Apply the aggregate to the global model and upload the result; returns its file sha256."""
        with self._exact_model(round_index, verify=False) as (current, _):
            state: dict[str, torch.Tensor] = {}
            aggregate = self._aggregate(round_index, open_round)
            if open_round.weights:
                next_tensors, state = self.strategy.step(
                    current.tensors, aggregate, self._server_state(round_index - 1)
                )
                if isinstance(open_round.accumulator, LoraProductMean):
                    open_round.lora_energy, open_round.lora_energy_by_rank = (
                        open_round.accumulator.refactorise(
                            current.tensors, next_tensors, self._lora_scale(round_index)
                        )
                    )
            else:  # every participant was left out: the round changes nothing
                next_tensors = dict(current.tensors)
                state = dict(self._server_state(round_index - 1))
            # A finite sum of squares means every value is finite (a norm is cheaper than isfinite).
            broken = sorted(name for name, t in next_tensors.items() if not math.isfinite(squared_norm(t)))
            if broken:
                # Each update was finite, but their weighted sum overflowed fp32: publish nothing.
                raise AggregationError(
                    f"round {round_index}: the aggregate is not finite in {', '.join(broken[:3])}; "
                    "set aggregation.maxUpdateNorm to reject runaway updates"
                )
            written, file_sha256 = self._put_model(next_tensors, meta, round_index + 1)
            if self.strategy.keeps_state:  # before the manifest: a closed round has its state
                state_meta = Metadata(kind=PayloadKind.STATE, training=self.layout.name, round=round_index)
                self.store.put_bytes(self.layout.server_state(round_index), encode(state, state_meta))
            if open_round.control is not None:
                self._write_control(round_index, open_round.control)
            shapes = {name: tuple(tensor.shape) for name, tensor in next_tensors.items()}
            del next_tensors, state
        # The next round starts from this model: its signature is known without reading it back.
        self._signatures = {round_index + 1: (Signature(shapes, written.base_fingerprint), written)}
        return file_sha256

    def _lora_scale(self, round_index: int) -> float:
        """peft's scaling alpha / r of the adapters, from the global model's metadata (1.0 without)."""
        self.signature(round_index)
        scale = config_scale(self._signatures[round_index][1].config)
        return scale if scale is not None else 1.0

    def _write_control(self, round_index: int, control: WeightedMean) -> None:
        """SCAFFOLD: c of the next round = c + (|S| / N) x the mean control change of the |S| accepted
        updates, N the sites of the training; written before the manifest."""
        with self._opened(self.layout.server_control(round_index), verify=True) as (current, _):
            server = {name: current.tensors[name].to(torch.float32) for name in current.tensors}
        if control.updates:
            share = control.updates / len(self.spec.sites)
            for name, mean in control.result().items():
                server[name] = server[name] + share * mean
        meta = Metadata(kind=PayloadKind.STATE, training=self.layout.name, round=round_index + 1)
        self.store.put_bytes(self.layout.server_control(round_index + 1), encode(server, meta))

    def _aggregate(self, round_index: int, open_round: _OpenRound) -> dict[str, torch.Tensor]:
        """The round's aggregate delta: the folded sum, or the stored updates combined again."""
        if not isinstance(self.strategy, RobustStrategy):
            return open_round.accumulator.result() if open_round.weights else {}
        while open_round.weights:
            sites = sorted(open_round.weights)
            with ExitStack() as opened:
                payloads = {
                    site: opened.enter_context(self._opened(self.layout.update(round_index, site), False))[0]
                    for site in sites
                }
                changed = {s for s in sites if payloads[s].meta.tensors_sha256 != open_round.pins.get(s)}
                stored = StoredRound(
                    {s: p for s, p in payloads.items() if s not in changed}, self.signature(round_index)
                )
                outcome = (
                    self.strategy.combine(stored, sorted(self.signature(round_index).shapes))
                    if len(changed) < len(sites)
                    else RobustOutcome({})
                )
                changed |= set(stored.replaced())
            if not changed:
                open_round.outcome = outcome
                return outcome.delta
            for site in sorted(changed):  # replaced in the store since it was accepted: left out
                message = f"{self.layout.update(round_index, site)} was replaced after it was accepted"
                open_round.verdicts[site] = self._reject(round_index, site, "replaced", message)
                del open_round.weights[site]
        return {}

    def _server_state(self, round_index: int) -> Mapping[str, torch.Tensor]:
        """The strategy's state after round `round_index` (none before round 0, or for a strategy
        that keeps none). A missing state after a closed round starts the optimizer afresh, loudly."""
        if round_index < 0 or not self.strategy.keeps_state:
            return {}
        try:
            payload = decode(self.store.get_bytes(self.layout.server_state(round_index)), "server state")
        except ObjectNotFound:
            log.warning("round %d: no server optimizer state in the store: it starts afresh", round_index)
            return {}
        except CodecError as error:  # written only by the aggregator: a broken one is not a site's doing
            raise AggregationError(
                f"round {round_index}: the server optimizer state is corrupt: {error}"
            ) from None
        return payload.tensors

    # ---------------------------------------------------------------------------------------------
    # retention

    def apply_retention(self, round_index: int, updates: bool, models: list[int]) -> int:
        """storage.retention: delete round `round_index`'s uploads (once it is closed) and the global
        models of `models` (each older than the window the spec keeps). Refuses anything a running
        round, a close or a resume could still read; returns how many keys it deleted (missing ones
        count too: deleting is idempotent)."""
        retention = self.spec.retention
        closed = self.manifest(round_index) is not None
        if updates and not retention.delete_updates:
            raise UnknownRoundError(f"round {round_index}'s updates stay: storage.retention keeps them")
        if updates and not closed:
            raise UnknownRoundError(f"round {round_index}'s updates stay: the round is not closed")
        newest = round_index + 1 if closed else round_index
        oldest = oldest_kept_model(retention, newest)
        too_recent = [model for model in models if model >= oldest or retention.keep_global_models is None]
        if too_recent:
            raise UnknownRoundError(
                f"global models {too_recent} stay: storage.retention keeps models {oldest} to {newest}"
            )
        keys = [*(update_keys(self.layout, self.spec, round_index) if updates else [])]
        keys += [key for model in models for key in model_keys(self.layout, model)]
        for key in keys:
            self.store.delete(key)
        log.info("round %d: storage.retention deleted %d objects", round_index, len(keys))
        return len(keys)

    # ---------------------------------------------------------------------------------------------
    # the final model

    def merge(self, round_index: int, best_round: int | None = None) -> ModelReply:
        """Write the global model of `round_index` with LoRA folded in, as a plain timm state dict, and
        likewise the global model of `best_round` (the one that scored best on validation), if given.
        Idempotent: a model already written is left as it is."""
        if round_index > 0 and self.manifest(round_index - 1) is None:
            raise UnknownRoundError(
                f"round {round_index} has no global model: round {round_index - 1} is not closed"
            )
        if best_round is not None and best_round > round_index:
            raise UnknownRoundError(f"the best round {best_round} comes after the final round {round_index}")
        best_uri = None
        if best_round is not None:
            best_uri = self._write_merged(best_round, self.layout.best_merged_model())
        swag_uri = self._write_swag_model(self.swag) if self.swag is not None else None
        return ModelReply(
            model_uri=self._write_merged(round_index, self.layout.merged_model()),
            best_model_uri=best_uri,
            swag_model_uri=swag_uri,
        )

    def _write_merged(self, round_index: int, key: str) -> str:
        from fedtrain.model import build_model, merged_model_config  # timm and peft only here

        if self.store.exists(key):
            return self.store.uri(key)
        model = build_model(self.spec, self._pretrained_weights)
        with self._exact_model(round_index, verify=True) as (payload, _):
            if model.base_fingerprint != payload.meta.base_fingerprint:
                raise AggregationError(
                    "the global model was trained from a different base model than the spec builds"
                )
            model.load_exchanged(dict(payload.tensors))
        meta = Metadata(
            kind=PayloadKind.MERGED,
            training=self.layout.name,
            round=round_index,
            base_fingerprint=model.base_fingerprint,
            config=merged_model_config(self.spec.model, [site.data for site in self.spec.sites]),
        )
        with tempfile.TemporaryDirectory(prefix="fedtrain-aggregator-") as scratch:
            staged = Path(scratch) / "merged.safetensors"
            encode_file(model.merged_state_dict(), meta, staged)  # a model's size: never held twice
            self.store.put_file(key, staged)
        return self.store.uri(key)

    def _write_swag_model(self, swag: SwagRounds) -> str | None:
        """evaluation.uncertainty swag: the SWAG model (swag_rounds.SwagRounds.export), once; None
        where there are no moments to export."""
        from fedtrain.model import build_model, merged_model_config  # timm and peft only here

        key = self.layout.swag_model()
        if self.store.exists(key):
            return self.store.uri(key)
        model = build_model(self.spec, self._pretrained_weights)
        config = merged_model_config(self.spec.model, [site.data for site in self.spec.sites])
        exported = swag.export(model, config)
        if exported is None:
            return None
        tensors, meta = exported
        with tempfile.TemporaryDirectory(prefix="fedtrain-aggregator-") as scratch:
            staged = Path(scratch) / "swag.safetensors"
            encode_file(tensors, meta, staged)
            self.store.put_file(key, staged)
        return self.store.uri(key)


def _manifest_participants(open_round: _OpenRound, participants: list[str]) -> list[Participant]:
    """The participants as the manifest records them, their weights normalized to sum to 1."""
    total = sum(open_round.weights[site] for site in participants)
    return [
        Participant(
            site=site,
            weight=open_round.weights[site] / total,
            samples=open_round.verdicts[site].samples,
            sha256=open_round.verdicts[site].sha256 or "",
            norm=open_round.verdicts[site].norm or 0.0,
        )
        for site in participants
    ]


def _secure_participants(open_round: _OpenRound, record: SecureAggregationRecord) -> list[Participant]:
    """Under secure aggregation: the sites whose masked input is in the sum; what one site weighed,
    how many samples it had and its update's norm are what the masks hide (recorded as 0)."""
    return [
        Participant(site=site, weight=0.0, samples=0, sha256=open_round.pins.get(site, ""), norm=0.0)
        for site in record.masked
    ]


def _manifest_rejections(open_round: _OpenRound, recorded: list[RejectedUpdate]) -> list[RejectedUpdate]:
    """The engine's recorded rejections, then those of the aggregator's verdicts it did not record."""
    recorded_sites = {entry.site for entry in recorded}
    return list(recorded) + [
        # The engine's wording for a rejected site: the stable code, then the explanation.
        RejectedUpdate(site=site, reason=f"{verdict.reason}: {verdict.message}")
        for site, verdict in sorted(open_round.verdicts.items())
        if not verdict.accepted and site not in recorded_sites
    ]


def _common(meta: Metadata, size: int, class_count: int, sites: Sequence[str]) -> dict[str, Any]:
    """What every verdict on an update or report carries; ValueError when the metrics are unusable."""
    if not _SHA256.fullmatch(meta.tensors_sha256):
        raise ValueError(f"tensors_sha256 {meta.tensors_sha256[:80]!r} is not a sha256")
    train_seconds = meta.timings.get("train_seconds")
    if train_seconds is not None and not (math.isfinite(train_seconds) and train_seconds >= 0):
        raise ValueError(f"train_seconds is {train_seconds}")
    return {
        "samples": meta.samples,
        "sha256": meta.tensors_sha256,
        "update_bytes": size,
        "evaluation": _evaluation(meta, "evaluation", class_count),
        "test_evaluation": _evaluation(meta, "test", class_count),
        "test_uncertainty": _evaluation(meta, "test_uncertainty", class_count),
        "cross_site": _cross_site(meta, class_count, sites),
        "train_seconds": train_seconds,
        "train_metrics": _train_metrics(meta),
    }


def _train_metrics(meta: Metadata) -> dict[str, float]:
    """The trainer's scalar figures (loss, accuracy, samples/s); the evaluation is reported apart."""
    figures = {
        name[:64]: float(value)
        for name, value in meta.metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and name != CLIP_BELOW_METRIC  # under dp, a site's bit is what the count's noise hides
    }
    return dict(sorted(figures.items())[:MAX_TRAIN_METRICS])


def _cross_site(meta: Metadata, class_count: int, sites: Sequence[str]) -> dict[str, EvalMetrics]:
    """A report's cross-site figures: each a site's local model on the reporting site's test split."""
    raw = meta.metrics.get("cross_site")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not set(raw) <= set(sites):
        raise ValueError("cross_site must map the training's site names to figures")
    figures = {site: EvalMetrics.model_validate(value) for site, value in raw.items()}
    for value in figures.values():
        check_reported(value, class_count)
    return figures


def _evaluation(meta: Metadata, key: str, class_count: int) -> EvalMetrics | None:
    """The site's figures of the global model on a split (`key` evaluation: validation, test: the
    test split), or ValueError where they or their counts cannot be one split's."""
    raw = meta.metrics.get(key)
    if raw is None:
        return None
    evaluation = EvalMetrics.model_validate(raw)  # a ValidationError is a ValueError
    if evaluation.pooled is not None:
        raise ValueError(f"a site's {key} figures cannot be pooled ones")
    check_reported(evaluation, class_count)
    return evaluation
