"""A trainer job for in-process rounds against a local store (the trainer run with `run_job`)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

from fedtrain.api import FederatedTrainingSpec
from fedtrain.job import Sealing, TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
from fedtrain.messages import RoundManifest
from fedtrain.sealing import DataKey
from fedtrain.store import LocalStore


def state_key(site: str, round_index: int) -> str:
    """Where `in_process_job` keeps a site's private state of a round."""
    return f"test-state/{site}/{round_index}.safetensors"


def in_process_job(
    store: LocalStore,
    layout: TrainingLayout,
    spec: FederatedTrainingSpec,
    round_index: int,
    site: str,
    control: bool = False,
    data_key: DataKey | None = None,
) -> TrainerJob:
    """One site's training job of a round: its slice of the spec and URLs into `store`; the private
    state of round r - 1 is read and round r's written (at `state_key`); with `control`, SCAFFOLD's
    server control variate of the round is fetched too."""
    keys = {
        "global_model_url": layout.global_model(round_index),
        "update_url": layout.update(round_index, site),
        "state_get_url": state_key(site, round_index - 1),
        "state_put_url": state_key(site, round_index),
        **({"control_url": layout.server_control(round_index)} if control else {}),
    }
    sealing = Sealing(data_key=data_key.to_base64(), object_keys=keys) if data_key is not None else None
    return TrainerJob(
        training=layout.name,
        round=round_index,
        site=site,
        spec=TrainerSpec.for_site(spec, site),
        global_model_url=store.presign_get(keys["global_model_url"], 60),
        update_url=store.presign_put(keys["update_url"], 60),
        state_get_url=store.presign_get(keys["state_get_url"], 60),
        state_put_url=store.presign_put(keys["state_put_url"], 60),
        control_url=store.presign_get(keys["control_url"], 60) if control else None,
        sealing=sealing,
    )


def tiny_spec(
    sites: Sequence[str | dict[str, Any]] = ("fab-a", "fab-b"), samples: int = 40, **sections: Any
) -> FederatedTrainingSpec:
    """A training small enough to run in process in seconds: a 1-block ViT (embed 32) on 28-pixel
    synthetic wafer maps, LoRA rank 4, 2 rounds of 2 steps. Each keyword is a spec section (camelCase
    inside) merged over these defaults; a site is a name, or a whole site entry."""
    document: dict[str, Any] = {
        "model": {
            "numClasses": 9,
            "imageSize": 28,
            "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
        },
        "lora": {"rank": 4},
        "training": {"rounds": 2, "localSteps": 2, "batchSize": 8, "seed": 5},
        "sites": [
            site if isinstance(site, dict) else {"name": site, "data": {"synthetic": {"samples": samples}}}
            for site in sites
        ],
    }
    for section, value in sections.items():
        document[section] = {**document.get(section, {}), **value}
    return FederatedTrainingSpec.model_validate(document, by_name=False)


def plain_fedavg(
    root: Path, layout: TrainingLayout, spec: FederatedTrainingSpec, initial: Path
) -> tuple[dict[str, torch.Tensor], RoundManifest]:
    """Round 0 of `spec` without secure aggregation, from the global model at `initial`: each site's
    trainer in process (one after another), the aggregator library, the next global model and the
    manifest. What a secure-aggregation round of the same spec must equal within its bound."""
    from fedtrain.aggregator.rounds import RoundAggregator
    from fedtrain.codec import decode
    from fedtrain.operator.core import build_trainer_job
    from fedtrain.operator.engine import StartSiteJob
    from fedtrain.trainer.train import run_job

    plain = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"secure_aggregation": None})})
    store = LocalStore(root)
    (root / layout.round_dir(0)).mkdir(parents=True)
    shutil.copyfile(initial, root / layout.global_model(0))
    aggregator = RoundAggregator(store, layout, plain)
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    for site in plain.sites:
        action = StartSiteJob(site=site.name, round=0, attempt=0, mode="train")
        run_job(build_trainer_job(plain, layout, action, store, 600, None, deadline))
        assert aggregator.submit(0, site.name).accepted
    manifest = aggregator.close(0, [site.name for site in plain.sites])
    return dict(decode(store.get_bytes(layout.global_model(1))).tensors), manifest
