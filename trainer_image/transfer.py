"""A trainer's reads and writes of the training's objects, through the presigned URLs of its job;
under privacy.encryptAtRest each object is opened after it is read and sealed before it is written,
as the object its job names for that URL (fedtrain.sealing), with the data key the job carries."""

from __future__ import annotations

from fedtrain.job import TrainerJob
from fedtrain.sealed_store import identity
from fedtrain.sealing import DataKey, ObjectIdentity, open_bytes, seal_bytes
from fedtrain.store import read_url, write_url


def _sealing(job: TrainerJob, field: str) -> tuple[DataKey, ObjectIdentity] | None:
    if job.sealing is None:
        return None
    key = job.sealing.object_keys.get(field)
    if key is None:
        raise ValueError(f"the job's sealing names no object for {field}: the operator must name every URL's")
    return DataKey.from_base64(job.sealing.data_key), identity(job.training, key)


def _url(job: TrainerJob, field: str) -> str:
    """The URL of a job field, or of one entry of a mapping of URLs (cross_site_urls.fab-a)."""
    name, _, entry = field.partition(".")
    url = getattr(job, name)
    if entry:
        url = url.get(entry) if isinstance(url, dict) else None
    if not isinstance(url, str):
        raise ValueError(f"the job has no {field}")
    return url


def fetch(job: TrainerJob, field: str) -> bytes:
    """The object behind the job's URL `field` (opened if sealed); ObjectNotFound if it is absent."""
    data = read_url(_url(job, field), deadline=job.transfer_deadline)
    sealing = _sealing(job, field)
    return data if sealing is None else open_bytes(*sealing, data)


def upload(job: TrainerJob, field: str, data: bytes) -> None:
    """Write `data` to the job's URL `field` (sealed first under privacy.encryptAtRest)."""
    sealing = _sealing(job, field)
    write_url(
        _url(job, field),
        data if sealing is None else seal_bytes(*sealing, data),
        deadline=job.transfer_deadline,
    )
