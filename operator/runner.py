"""Start the kopf operator: in-process (tests, benchmarks) or as `python -m fedtrain.operator`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import kopf
from aiohttp import web
from kubernetes.client import ApiClient

from .kube import load_api_client
from .leader import LeaderElector
from .metrics import OperatorMetrics
from .settings import OperatorSettings

log = logging.getLogger(__name__)

StopFlag = asyncio.Event | threading.Event


async def _wait_flag(flag: StopFlag) -> None:
    if isinstance(flag, asyncio.Event):
        await flag.wait()
        return
    while not flag.is_set():  # a flag set from another thread (a test)
        await asyncio.sleep(0.1)


async def _standby_liveness(port: int | None) -> web.AppRunner | None:
    """`/healthz` on the liveness port while this replica waits for the Lease."""
    if port is None:
        return None

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"standby": True})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _lead(elector: LeaderElector, settings: OperatorSettings, stop: asyncio.Event) -> bool:
    """Wait for the Lease (answering the liveness probe meanwhile); False if stopped before."""
    log.info("%s waiting for the lease %s", settings.identity, settings.lease_name)
    # A standby is alive too: answer the liveness probe until kopf's own endpoint takes over.
    standby = await _standby_liveness(settings.liveness_port)
    try:
        if not await elector.acquire(stop):
            return False
    finally:
        if standby is not None:
            await standby.cleanup()
    log.info("%s leads", settings.identity)
    return True


async def _operate(
    settings: OperatorSettings,
    stop: asyncio.Event,
    ready_flag: asyncio.Event | threading.Event | None,
    memo: kopf.Memo,
    elector: LeaderElector | None,
) -> bool:
    """Run kopf until stopped; True if the Lease was lost on the way (the caller exits 1)."""
    liveness = (
        f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port is not None else None
    )
    operator = asyncio.create_task(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=True,  # leadership is the Lease's business, not kopf's peering
            stop_flag=stop,
            ready_flag=ready_flag,
            liveness_endpoint=liveness,
            memo=memo,
        )
    )
    lost = False
    if elector is not None:
        holding = asyncio.create_task(elector.hold(stop))
        await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding.done() and not stop.is_set():
            lost = True
            stop.set()
        holding.cancel()
    await operator
    return lost


async def run_operator(
    settings: OperatorSettings,
    *,
    stop_flag: StopFlag | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    api_client: ApiClient | None = None,
    clock: Callable[[], datetime] | None = None,
) -> int:
    """Run until `stop_flag` is set (or a signal, or lost leadership: exit code 1).

    `clock` replaces the wall clock the engine reads (tests move time on to reach a deadline).
    """
    from . import handlers  # noqa: F401  (registers the handlers with kopf)

    api_client = api_client or load_api_client(settings.kubeconfig, settings.api_concurrency)
    # The kubernetes client is synchronous: its calls run in this loop's default executor, whose
    # few default threads (cores + 4) would queue a round's Job starts one behind another.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=settings.api_concurrency, thread_name_prefix="kube")
    )
    stop = asyncio.Event()
    watcher = asyncio.create_task(_wait_flag(stop_flag)) if stop_flag is not None else None
    if watcher is not None:
        watcher.add_done_callback(lambda _: stop.set())
    elector = LeaderElector(api_client, settings) if settings.leader_election else None
    lost_leadership = False
    metrics = OperatorMetrics()
    if settings.metrics_port is not None:  # a standby serves them too: its leader gauge is 0
        metrics.serve(settings.metrics_port)
    try:
        if elector is not None and not await _lead(elector, settings, stop):
            return 0
        metrics.leader.set(1)
        memo = kopf.Memo(settings=settings, api_client=api_client, metrics=metrics, clock=clock)
        lost_leadership = await _operate(settings, stop, ready_flag, memo, elector)
    finally:
        metrics.leader.set(0)
        metrics.close()
        if watcher is not None:
            watcher.cancel()
        if elector is not None and not lost_leadership:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(elector.release)
    return 1 if lost_leadership else 0
