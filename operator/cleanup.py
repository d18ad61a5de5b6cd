"""What deleting a FederatedTraining removes: everything made for it, in every namespace it touched.

Owner references cannot cross namespaces, so the site namespaces' Jobs are found by the training's
uid label; the aggregator's objects live in the training's own namespace. Secrets are never listed:
each trainer Secret is owned by its Job and the token Secret by the training, so garbage collection
removes them with their owner (and the operator needs no right to read the Secrets of a namespace).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from . import manifests
from .kube import Kube, KubeError
from .manifests import TrainingRef

log = logging.getLogger(__name__)

SITE_KINDS = ("Job",)
AGGREGATOR_KINDS = ("Deployment", "Service", "ConfigMap")


def cleanup_targets(ref: TrainingRef, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, namespace) pairs to search, from the spec as written (it may no longer validate)."""
    sites = spec.get("sites") or []
    namespaces = {ref.namespace} | {site.get("namespace") or "default" for site in sites}
    targets = [(kind, namespace) for namespace in sorted(namespaces) for kind in SITE_KINDS]
    return targets + [(kind, ref.namespace) for kind in AGGREGATOR_KINDS]


async def remove_training_objects(kube: Kube, ref: TrainingRef, spec: Mapping[str, Any]) -> int:
    """Delete every object labelled with the training's uid; returns how many were removed.

    A namespace this operator may not read (403: outside its namespaces) cannot hold anything it made,
    and a finalizer that waited for it would wait forever: it is skipped.
    """
    selector = {manifests.TRAINING_UID: ref.uid}
    removed = 0
    for kind, namespace in cleanup_targets(ref, spec):
        try:
            items = await kube.list_labelled(kind, namespace, selector)
        except KubeError as error:
            if error.status != 403:
                raise
            log.warning("%s/%s: %s: skipped", ref.namespace, ref.name, error)
            continue
        for item in items:
            removed += await kube.delete(kind, namespace, item["metadata"]["name"])
    return removed
