"""The aggregator library: validate each site's update as it arrives, fold it, close the round.

Each round keeps one running sum, so memory stays near two models whatever the number of sites.
Every call is idempotent: submitting an update twice returns the first verdict, closing a closed
round returns its manifest, and a restarted aggregator rebuilds an open round from the updates
in the store when the round is closed with the participants the engine recorded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedtrain.api import EvalMetrics, FederatedTrainingSpec, RejectedUpdate, TransferDtype
from fedtrain.codec import CodecError, Metadata, Payload, PayloadKind, Signature, check_update, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.messages import Participant, RoundManifest, UpdateVerdict
from fedtrain.store import ObjectNotFound, ObjectStore
from fedtrain.trainer.model import build_model

from .strategies import Accumulator, make_strategy, site_weight

log = logging.getLogger(__name__)


class AggregationError(RuntimeError):
    """A round that cannot be closed as asked (no accepted update, a participant missing)."""


@dataclass
class _OpenRound:
    accumulator: Accumulator
    verdicts: dict[str, UpdateVerdict] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


class RoundAggregator:
    def __init__(
        self,
        store: ObjectStore,
        layout: TrainingLayout,
        spec: FederatedTrainingSpec,
        pretrained_weights: Path | bytes | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.spec = spec
        self.strategy = make_strategy(spec.aggregation.strategy)
        self._pretrained_weights = pretrained_weights
        self._open: dict[int, _OpenRound] = {}
        self._globals: dict[int, Payload] = {}

    # ---------------------------------------------------------------------------------------------
    # reading

    def _read(self, key: str) -> tuple[Payload, int]:
        """Decode an object: memory-mapped from a local store, downloaded whole from S3; and its size."""
        path = self.store.local_path(key)
        if path is not None:
            if not path.exists():
                raise ObjectNotFound(self.store.uri(key))
            return decode(path, name=key), path.stat().st_size
        data = self.store.get_bytes(key)
        return decode(data, name=key), len(data)

    def global_model(self, round_index: int) -> Payload:
        if round_index not in self._globals:
            self._globals = {round_index: self._read(self.layout.global_model(round_index))[0]}
        return self._globals[round_index]

    def manifest(self, round_index: int) -> RoundManifest | None:
        try:
            return RoundManifest.model_validate_json(self.store.get_bytes(self.layout.manifest(round_index)))
        except ObjectNotFound:
            return None

    # ---------------------------------------------------------------------------------------------
    # round 0

    def initialize(self) -> str:
        """Write the initial global model (round 0) unless it exists; return its URI."""
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
            self.store.put_bytes(key, encode(model.exchanged_state(), meta))
            log.info("initial global model written to %s", self.store.uri(key))
        return self.store.uri(key)

    # ---------------------------------------------------------------------------------------------
    # updates

    def _round(self, round_index: int) -> _OpenRound:
        if round_index not in self._open:
            self._open[round_index] = self._new_round(round_index)
        return self._open[round_index]

    def _new_round(self, round_index: int) -> _OpenRound:
        signature = Signature.of(self.global_model(round_index))
        return _OpenRound(self.strategy.accumulator(signature.shapes))

    def submit(self, round_index: int, site: str) -> UpdateVerdict:
        """Validate a site's uploaded update and fold it into the round; return the verdict."""
        manifest = self.manifest(round_index)
        if manifest is not None:
            return self._verdict_from_manifest(manifest, site)
        open_round = self._round(round_index)
        if site in open_round.verdicts:
            return open_round.verdicts[site]
        verdict = self._fold(round_index, site, open_round)
        open_round.verdicts[site] = verdict
        level = logging.INFO if verdict.accepted else logging.WARNING
        log.log(level, "round %d site %s: %s", round_index, site, verdict.reason or "accepted")
        return verdict

    def _reject(
        self, round_index: int, site: str, reason: str, message: str, **extra: object
    ) -> UpdateVerdict:
        return UpdateVerdict(
            round=round_index, site=site, accepted=False, reason=reason, message=message, **extra
        )

    def _fold(self, round_index: int, site: str, open_round: _OpenRound) -> UpdateVerdict:
        key = self.layout.update(round_index, site)
        try:
            payload, size = self._read(key)
        except ObjectNotFound:
            return self._reject(round_index, site, "missing", f"no update at {self.store.uri(key)}")
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error))
        meta = payload.meta
        if (meta.training, meta.round, meta.site) != (self.layout.name, round_index, site):
            return self._reject(
                round_index,
                site,
                "mismatch",
                f"{key} is the update of training {meta.training} round {meta.round} site {meta.site}",
            )
        evaluation = _evaluation(meta)
        common = {
            "samples": meta.samples,
            "sha256": meta.tensors_sha256,
            "update_bytes": size,
            "evaluation": evaluation,
            "train_seconds": meta.timings.get("train_seconds"),
        }
        if meta.kind is PayloadKind.REPORT:
            return UpdateVerdict(round=round_index, site=site, accepted=True, **common)
        try:
            norm = check_update(payload, Signature.of(self.global_model(round_index)), name=key)
        except CodecError as error:
            return self._reject(round_index, site, error.reason, str(error), **common)
        bound = self.spec.aggregation.max_update_norm
        if bound is not None and norm > bound:
            message = f"update norm {norm:.4g} exceeds aggregation.maxUpdateNorm {bound:.4g}"
            return self._reject(round_index, site, "norm", message, norm=norm, **common)
        site_spec = next((s for s in self.spec.sites if s.name == site), None)
        if site_spec is None:
            return self._reject(round_index, site, "unknown-site", f"{site} is not a site of this training")
        try:
            weight = site_weight(self.spec.aggregation.weighting, meta.samples, site_spec.weight)
        except ValueError as error:
            return self._reject(round_index, site, "samples", str(error), norm=norm, **common)
        open_round.accumulator.add(payload.tensors, weight)
        open_round.weights[site] = weight
        return UpdateVerdict(round=round_index, site=site, accepted=True, norm=norm, **common)

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
        open_round = self._round(round_index)
        if set(open_round.weights) - set(participants):
            # A folded update the engine did not count (it arrived after the engine decided to close):
            # sum exactly the participants again, as a restarted aggregator would, keeping the rejections.
            rejections = {site: v for site, v in open_round.verdicts.items() if not v.accepted}
            open_round = self._open[round_index] = self._new_round(round_index)
            open_round.verdicts.update(rejections)
        for site in participants:
            # After an aggregator restart the sum is empty: fold again what the engine accepted.
            verdict = self.submit(round_index, site)
            if not verdict.accepted:
                raise AggregationError(
                    f"round {round_index}: participant {site} was rejected: {verdict.message}"
                )
        used = [site for site in participants if site in open_round.weights]
        if not used:
            raise AggregationError(f"round {round_index} has no accepted update to aggregate")
        current = self.global_model(round_index)
        next_tensors = self.strategy.apply(current.tensors, open_round.accumulator.result())
        broken = sorted(
            name for name, tensor in next_tensors.items() if not bool(torch.isfinite(tensor).all())
        )
        if broken:
            # Each update was finite, but their weighted sum overflowed fp32: publish nothing.
            raise AggregationError(
                f"round {round_index}: the aggregate is not finite in {', '.join(broken[:3])}; "
                "set aggregation.maxUpdateNorm to reject runaway updates"
            )
        meta = Metadata(
            kind=PayloadKind.MODEL,
            training=self.layout.name,
            round=round_index + 1,
            transfer_dtype=TransferDtype.FP32,
            base_fingerprint=current.meta.base_fingerprint,
            config=current.meta.config,
        )
        model_key = self.layout.global_model(round_index + 1)
        encoded = encode(next_tensors, meta)
        self.store.put_bytes(model_key, encoded)
        total = sum(open_round.weights[site] for site in used)
        manifest = RoundManifest(
            training=self.layout.name,
            round=round_index,
            strategy=self.strategy.name.value,
            weighting=self.spec.aggregation.weighting.value,
            participants=[
                Participant(
                    site=site,
                    weight=open_round.weights[site] / total,
                    samples=open_round.verdicts[site].samples,
                    sha256=open_round.verdicts[site].sha256 or "",
                    norm=open_round.verdicts[site].norm or 0.0,
                )
                for site in used
            ],
            rejected=list(rejected or [])
            + [
                # The engine's wording for a rejected site: the stable code, then the explanation.
                RejectedUpdate(site=site, reason=f"{verdict.reason}: {verdict.message}")
                for site, verdict in sorted(open_round.verdicts.items())
                if not verdict.accepted and site not in {r.site for r in rejected or []}
            ],
            model_key=model_key,
            model_uri=self.store.uri(model_key),
            model_sha256=hashlib.sha256(encoded).hexdigest(),
        )
        # The manifest is written last: its presence is what says the round is closed.
        self.store.put_bytes(self.layout.manifest(round_index), manifest.model_dump_json(indent=2).encode())
        del self._open[round_index]
        return manifest

    # ---------------------------------------------------------------------------------------------
    # the final model

    def merge(self, round_index: int) -> str:
        """Write the global model of `round_index` with LoRA folded in, as a plain timm state dict."""
        key = self.layout.merged_model()
        if self.store.exists(key):
            return self.store.uri(key)
        payload = self.global_model(round_index)
        model = build_model(self.spec, self._pretrained_weights)
        if model.base_fingerprint != payload.meta.base_fingerprint:
            raise AggregationError(
                "the global model was trained from a different base model than the spec builds"
            )
        model.load_exchanged(dict(payload.tensors))
        spec_model = self.spec.model
        meta = Metadata(
            kind=PayloadKind.MERGED,
            training=self.layout.name,
            round=round_index,
            base_fingerprint=model.base_fingerprint,
            config={
                "timm_name": spec_model.name,
                "num_classes": spec_model.class_count,
                "labels": spec_model.class_names(),
                "img_size": spec_model.image_size,
                "architecture": spec_model.architecture.timm_kwargs() if spec_model.architecture else {},
            },
        )
        self.store.put_bytes(key, encode(model.merged_state_dict(), meta))
        return self.store.uri(key)


def _evaluation(meta: Metadata) -> EvalMetrics | None:
    raw = meta.metrics.get("evaluation")
    return EvalMetrics.model_validate(raw) if isinstance(raw, dict) else None
