"""evaluation.uncertainty swag, the aggregator's part (fedtrain.swag holds the arithmetic).

A site of a SWAG round writes its moments (`layout.site_swag`) before its update; the aggregator
checks them when the update arrives (a site whose moments do not fit is refused like a bad update),
and at each close of the window folds the folded sites' moments, weighted like their updates, into
the window's running SWAG (`layout.swag`, each round weighing one, written before the manifest, so a
repeated close writes the same). The final evaluation scores the last one; the merge exports it as
a model: the plain timm weights at the SWAG mean, the moments beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import Metadata, PayloadKind, decode, encode
from fedtrain.errors import CodecError
from fedtrain.layout import TrainingLayout
from fedtrain.lora_ranks import LORA_A, LORA_B, lora_scale
from fedtrain.store import ObjectNotFound, ObjectStore
from fedtrain.swag import (
    CONFIG_KEY,
    DIGEST_KEY,
    FROZEN,
    Moments,
    SwagError,
    combine_all,
    from_tensors,
    merge_targets,
    to_tensors,
)

if TYPE_CHECKING:
    import torch

    from fedtrain.model import FederatedModel

log = logging.getLogger(__name__)

#: The running SWAG's metadata config: how many rounds it holds.
ROUNDS_KEY = "rounds"


class SwagRounds:
    def __init__(self, store: ObjectStore, layout: TrainingLayout, spec: FederatedTrainingSpec) -> None:
        self.store, self.layout, self.spec = store, layout, spec
        self.settings = spec.evaluation.uncertainty

    def collects(self, round_index: int) -> bool:
        return self.settings.collects_swag(round_index, self.spec.training.rounds)

    def site_moments(
        self, round_index: int, site: str, shapes: Mapping[str, tuple[int, ...]], digest: object
    ) -> tuple[Moments, int]:
        """A site's moments of a round, checked against the round's exchanged tensors and against the
        `digest` its update names, and the size of their object (SwagError, CodecError,
        ObjectNotFound)."""
        key = self.layout.site_swag(round_index, site)
        data = self.store.get_bytes(key)
        payload = decode(data, name=key)
        if payload.meta.kind is not PayloadKind.SWAG or payload.meta.site != site:
            raise SwagError(f"{key} is not {site}'s SWAG moments ({payload.meta.kind.value})")
        if payload.meta.tensors_sha256 != digest:
            raise SwagError(
                f"{key} holds other SWAG moments than the update's {DIGEST_KEY} names (another attempt's)"
            )
        return from_tensors(dict(payload.tensors), shapes, 1.0, key), len(data)

    def problem(
        self, round_index: int, site: str, shapes: Mapping[str, tuple[int, ...]], digest: object
    ) -> tuple[str | None, int]:
        """Why a site's update of a SWAG round cannot be accepted for its moments (None if it can),
        and the bytes the site uploaded for them."""
        try:
            return None, self.site_moments(round_index, site, shapes, digest)[1]
        except ObjectNotFound:
            return f"no SWAG moments at {self.store.uri(self.layout.site_swag(round_index, site))}", 0
        except (SwagError, CodecError) as error:
            return str(error), 0

    def close(
        self,
        round_index: int,
        weights: Mapping[str, float],
        digests: Mapping[str, str],
        shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        """Fold the round's sites (weights normalised to sum to 1) into the window's running SWAG: the
        moments each accepted update names (`digests`); a site whose moments were replaced since is
        left out of the SWAG, not of the round."""
        key = self.layout.swag(round_index)
        if self.store.exists(key):
            return
        earlier = self.layout.swag(round_index - 1)
        previous = (
            self.running(round_index - 1, shapes)
            if self.collects(round_index - 1) and self.store.exists(earlier)
            else None
        )
        sites = {
            site: self._moments(round_index, site, shapes, digests.get(site)) for site in sorted(weights)
        }
        kept = {site: moments for site, moments in sites.items() if moments is not None}
        if not kept:  # no update made the round: the window's SWAG is the previous round's
            if previous is not None:
                self.store.put_bytes(key, self.store.get_bytes(earlier))
            return
        total = sum(weights[site] for site in kept)
        groups = [previous] if previous is not None else []
        rounds = 1 + (int(previous.weight) if previous is not None else 0)
        groups.extend(moments.reweighted(weights[site] / total) for site, moments in kept.items())
        combined = combine_all(groups, self.settings.swag_rank)
        meta = Metadata(
            kind=PayloadKind.SWAG, training=self.layout.name, round=round_index, config={ROUNDS_KEY: rounds}
        )
        self.store.put_bytes(key, encode(to_tensors(combined), meta))
        log.info("round %d: SWAG of %d rounds, %d deviation rows", round_index, rounds, combined.rows)

    def _moments(
        self, round_index: int, site: str, shapes: Mapping[str, tuple[int, ...]], digest: str | None
    ) -> Moments | None:
        try:
            return self.site_moments(round_index, site, shapes, digest)[0]
        except (ObjectNotFound, SwagError, CodecError) as error:
            log.warning("round %d: %s's SWAG moments left out: %s", round_index, site, error)
            return None

    def running(self, round_index: int, shapes: Mapping[str, tuple[int, ...]]) -> Moments:
        """The window's SWAG up to `round_index`, weighted by the rounds it holds."""
        key = self.layout.swag(round_index)
        payload = decode(self.store.get_bytes(key), name=key)
        rounds = payload.meta.config.get(ROUNDS_KEY)
        if payload.meta.kind is not PayloadKind.SWAG or not isinstance(rounds, int) or rounds < 1:
            raise SwagError(f"{key} is not a running SWAG of the window")
        return from_tensors(dict(payload.tensors), shapes, float(rounds), key)

    def export(
        self, model: FederatedModel, config: dict[str, object]
    ) -> tuple[dict[str, torch.Tensor], Metadata] | None:
        """The SWAG model: `model` (the spec's, freshly built) at the SWAG mean of the last training
        round, merged, with the moments (and any frozen LoRA factor they multiply) beside it; None
        where the window folded no site's moments."""
        from fedtrain.model.exchange import timm_name

        last = self.spec.training.rounds - 1
        if not self.store.exists(self.layout.swag(last)):
            log.warning("no SWAG moments of round %d: the window folded no site's; no SWAG model", last)
            return None
        shapes = model.exchanged_shapes()
        moments = self.running(last, shapes)
        model.load_exchanged(moments.mean)
        exchanged = set(shapes)
        params = dict(model.module.named_parameters())
        frozen = {
            name: params[name].detach().clone()
            for name in params
            if (LORA_A in name and name.replace(LORA_A, LORA_B) in exchanged and name not in exchanged)
            or (LORA_B in name and name.replace(LORA_B, LORA_A) in exchanged and name not in exchanged)
        }
        scale = lora_scale(model.rank, model.alpha) if model.rank is not None else None
        targets = merge_targets(exchanged, frozen, scale, timm_name)
        tensors = {**model.merged_state_dict(), **to_tensors(moments)}
        tensors.update({FROZEN + name: tensor for name, tensor in frozen.items()})
        settings = {
            "rank": self.settings.swag_rank,
            "rounds": int(moments.weight),
            "targets": targets.model_dump(mode="json"),
        }
        meta = Metadata(
            kind=PayloadKind.MERGED,
            training=self.layout.name,
            round=last,
            base_fingerprint=model.base_fingerprint,
            config={**config, CONFIG_KEY: settings},
        )
        return tensors, meta
