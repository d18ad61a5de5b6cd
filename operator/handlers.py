"""The kopf handlers: thin wrappers that hand each event to `reconcile.py` and the engine.

- a daemon per FederatedTraining runs reconciles one after another: woken at once by its Jobs'
  watch events and its own spec changes, and at the latest at the round deadline or resync;
- the Job watch keeps the Job table current (no listing per reconcile);
- deletion (a finalizer, since owner references cannot cross namespaces) removes the training's
  Jobs from every site namespace (their Secrets go with them) and its aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from fedtrain.api import GROUP, PLURAL, VERSION

from . import manifests
from .cleanup import remove_training_objects
from .kube import Kube, KubeError, connection_info, load_api_client
from .metrics import OperatorMetrics
from .reconcile import Context, Reconciler, TrainingRuntime, training_ref
from .settings import OperatorSettings

log = logging.getLogger(__name__)

#: How long to wait before reconciling again after an API error (a conflict, an API server restart).
ERROR_RETRY_SECONDS = 5.0
#: The longest wait between reconciles that keep failing the same way.
MAX_ERROR_RETRY_SECONDS = 60.0


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """Log kopf in exactly as the kubernetes client is (a kubeconfig given in settings, or in-cluster)."""
    # Under `kopf run` nothing has put settings in the memo yet: read them from the environment.
    settings: OperatorSettings = memo.get("settings") or OperatorSettings()
    api_client = memo.get("api_client") or load_api_client(settings.kubeconfig, settings.api_concurrency)
    memo["settings"], memo["api_client"] = settings, api_client
    return kopf.ConnectionInfo(**connection_info(api_client))


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The CRD's structural schema would prune kopf's own status fields: keep its state in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    # Events are the engine's own (RoundStarted, Straggler, ...); kopf's per-handler chatter is noise.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    operator_settings: OperatorSettings = memo.get("settings") or OperatorSettings()
    metrics: OperatorMetrics | None = memo.get("metrics")
    if metrics is None:  # under `kopf run`: no runner made them
        metrics = OperatorMetrics()
        metrics.leader.set(1)
        if operator_settings.metrics_port is not None:
            metrics.serve(operator_settings.metrics_port)
        memo["metrics"] = metrics
        memo["own_metrics"] = True
    memo["context"] = Context(
        settings=operator_settings,
        **({"clock": memo["clock"]} if memo.get("clock") else {}),
        kube=Kube(
            memo.get("api_client")
            or load_api_client(operator_settings.kubeconfig, operator_settings.api_concurrency)
        ),
        session=aiohttp.ClientSession(),
        metrics=metrics,
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    context: Context | None = memo.get("context")
    if context is not None:
        await context.session.close()
    if memo.get("own_metrics"):
        memo["metrics"].close()


@kopf.on.event("batch", "v1", "jobs", labels={manifests.MANAGED_BY: manifests.MANAGER})
def job_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    context: Context = memo["context"]
    uid = context.jobs.update(body, deleted=event.get("type") == "DELETED")
    if uid is not None:
        context.wake(uid)


@kopf.on.event(GROUP, VERSION, PLURAL)
def training_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake a training's daemon when its spec changes (not for the status patches it makes itself)."""
    context: Context = memo["context"]
    runtime = context.runtimes.get(body.meta.uid or "")
    if runtime is None:
        return
    spec = json.dumps(dict(body.spec), sort_keys=True)
    if spec != runtime.spec_seen:
        runtime.spec_seen = spec
        runtime.wake.set()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=30)
async def run_training(body: kopf.Body, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    context: Context = memo["context"]
    runtime = context.runtime(training_ref(body))
    runtime.spec_seen = json.dumps(dict(body.spec), sort_keys=True)
    while not stopped and not runtime.deleting:
        runtime.wake.clear()
        async with runtime.lock:
            if runtime.deleting or body.meta.get("deletionTimestamp"):
                return
            started = time.perf_counter()
            delay: float | None
            try:
                outcome = await Reconciler(context, body).reconcile()
            except KubeError as error:
                delay = failed_reconcile(context, runtime, error, logging.WARNING)
            except Exception as error:  # not classified where raised: logged once, shown in the status
                delay = failed_reconcile(context, runtime, error, logging.ERROR)
                with contextlib.suppress(Exception):  # the status write may be what fails
                    await Reconciler(context, body).report_unexpected(error)
            else:
                runtime.last_error = None
                # After the status write succeeded: an event never tells of a step that was not saved.
                for event in outcome.events:
                    kopf.event(body, type=event.type, reason=event.reason, message=event.message)
                delay = outcome.delay
            finally:
                context.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        if delay != 0:
            await _sleep(runtime, stopped, delay)


def failed_reconcile(context: Context, runtime: TrainingRuntime, error: Exception, level: int) -> float:
    """Count and log a reconcile that raised (a repeat of the last error only at DEBUG); the delay
    before the next one, doubling while the same error repeats, up to MAX_ERROR_RETRY_SECONDS."""
    context.metrics.reconcile_errors.labels(error=type(error).__name__).inc()
    text = f"{type(error).__name__}: {error}"
    repeated = text == runtime.last_error
    runtime.error_delay = (
        min(runtime.error_delay * 2, MAX_ERROR_RETRY_SECONDS) if repeated else ERROR_RETRY_SECONDS
    )
    runtime.last_error = text
    where = f"{runtime.ref.namespace}/{runtime.ref.name}"
    log.log(
        logging.DEBUG if repeated else level,
        "%s: %s; retrying in %.0f s",
        where,
        text,
        runtime.error_delay,
        exc_info=level >= logging.ERROR and not repeated,
    )
    return runtime.error_delay


async def _sleep(runtime: TrainingRuntime, stopped: kopf.DaemonStopped, delay: float | None) -> None:
    """Until woken (a Job or spec change), stopped, or `delay` seconds pass (None: no limit)."""
    woken = asyncio.ensure_future(runtime.wake.wait())
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({woken, stopping}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        stopping.cancel()


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_training(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    context: Context = memo["context"]
    await cleanup(context, body)


async def cleanup(context: Context, body: Mapping[str, Any]) -> None:
    """Stop the training's reconciles, then remove everything made for it."""
    ref = training_ref(body)
    runtime = context.runtime(ref)
    runtime.deleting = True
    runtime.wake.set()
    async with runtime.lock:  # a reconcile in flight finishes first: nothing is created after this
        removed = await remove_training_objects(context.kube, ref, body.get("spec") or {})
        log.info("%s/%s deleted: removed %d objects", ref.namespace, ref.name, removed)
    context.jobs.forget(ref.uid)
    context.runtimes.pop(ref.uid, None)
    context.metrics.forget(ref)
