"""A trainer job for in-process rounds against a local store (the trainer run with `run_job`)."""

from __future__ import annotations

from fedtrain.api import FederatedTrainingSpec
from fedtrain.job import TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
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
) -> TrainerJob:
    """One site's training job of a round: its slice of the spec and URLs into `store`; the private
    state of round r - 1 is read and round r's written (at `state_key`); with `control`, SCAFFOLD's
    server control variate of the round is fetched too."""
    return TrainerJob(
        training=layout.name,
        round=round_index,
        site=site,
        spec=TrainerSpec.for_site(spec, site),
        global_model_url=store.presign_get(layout.global_model(round_index), 60),
        update_url=store.presign_put(layout.update(round_index, site), 60),
        state_get_url=store.presign_get(state_key(site, round_index - 1), 60),
        state_put_url=store.presign_put(state_key(site, round_index), 60),
        control_url=store.presign_get(layout.server_control(round_index), 60) if control else None,
    )
