"""The aggregator's HTTP API: the operator's remote handle on one training's RoundAggregator.

Every /v1 call maps to one library call and is as idempotent as that call: the operator retries
freely, and after a restart it re-sends the submits it has no verdict for and closes the round with
the participants it recorded, which rebuilds the sum from the store. The service holds no state of
its own beyond the library's open round.

Errors are JSON `ErrorReply` bodies with a stable code. A rejected update is a verdict (200), not an
error; a round the library cannot close is a 409 the operator turns into a failed training (code
invalid-spec where the spec does not fit the model: the training fails as for an invalid spec); a
store that cannot be reached is a 503 the operator retries.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector
from pydantic import Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from fedtrain.api import RejectedUpdate
from fedtrain.errors import INVALID_SPEC, PermanentError, TemporaryError
from fedtrain.layout import TrainingLayout
from fedtrain.messages import (
    MAX_ROUND_INDEX,
    CloseRoundRequest,
    ErrorBody,
    ErrorReply,
    FieldProblem,
    MergeRequest,
    Message,
    ModelReply,
    RetentionReply,
    RetentionRequest,
    RoundManifest,
    RoundReply,
    SecureAggregationReply,
    SecureAggregationRequest,
    SubmitUpdateRequest,
    UpdateVerdict,
)

from .rounds import MissingModelError, RoundAggregator, UnknownRoundError

log = logging.getLogger(__name__)

T = TypeVar("T")

API_PREFIX = "/v1"

#: How long a readiness answer is reused: probes of several kubelets and people cost one S3 request.
READINESS_TTL_SECONDS = 5.0
#: How long /readyz waits for the store; under the kubelet's default probe timeout of one second.
READINESS_TIMEOUT_SECONDS = 0.8

#: The largest request body read: the largest close request (256 participants and 256 rejections of
#: 4,096 characters) is about 1.1 MB of JSON.
MAX_BODY_BYTES = 2 * 1024 * 1024
#: How long a client may take to send its whole body (a lying Content-Length is waited for no longer).
BODY_TIMEOUT_SECONDS = 10.0

#: Update norms: a LoRA delta of a few layers is ~0.01-1, a full fine-tune's much larger.
NORM_BUCKETS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
#: Folding one update reads it once: seconds for a small LoRA update, minutes for a full model.
FOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class StatusReply(Message):
    """The answer of a probe that passes."""

    status: str = Field(..., description="ok (the process is alive) or ready (the bucket answers).")


class ApiError(Exception):
    """An error reply: its HTTP status, stable code and message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[FieldProblem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    reply = ErrorReply(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(reply.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


#: A round in a path; module level, so FastAPI can resolve the annotation of the endpoints.
RoundIndex = Annotated[int, Path(ge=0, le=MAX_ROUND_INDEX, description="Round index, from 0.")]

#: FastAPI's type for documented responses, keyed by status code.
Responses = dict[int | str, dict[str, Any]]


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorReply, "description": description}


UNAUTHORIZED: Responses = {401: _error_doc("unauthorized: no bearer token, or not this training's token.")}
BODY_LIMITS: Responses = {
    408: _error_doc("request-timeout: the body did not arrive in time; nothing was done."),
    413: _error_doc("content-too-large: the body is larger than the service reads; nothing was done."),
}
UNKNOWN_ROUND: Responses = {
    404: _error_doc("unknown-round: the round's global model cannot exist yet (its previous round is open).")
}
INVALID: Responses = {
    422: _error_doc("invalid-request: the body or a path parameter is malformed; nothing was done.")
}
STORE_DOWN: Responses = {
    503: _error_doc("store-unavailable: the object store cannot be reached; retry later.")
}
NO_GLOBAL_MODEL: Responses = {
    409: _error_doc("no-global-model: the round's global model does not exist (yet).")
}
CONFLICT: Responses = {
    409: _error_doc(
        "no-global-model: the round's global model does not exist; invalid-spec: the training's spec "
        "does not fit its model (an exchange pattern that matches no trainable tensor); "
        "aggregation-failed: the library cannot do this (a participant was rejected, no update to "
        "aggregate, another base model)."
    )
}


# --------------------------------------------------------------------------------------------------
# metrics


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of its own (one app, one registry)."""

    def __init__(self, layout: TrainingLayout, registry: CollectorRegistry | None = None) -> None:
        if registry is None:  # a process of its own: its memory and CPU too
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        # One training per process, but dashboards aggregate many: every series names its training.
        self._training = {"namespace": layout.namespace, "training": layout.name}
        labels = list(self._training)
        self._declare_update_metrics(labels)
        self._declare_round_metrics(labels)
        self._requests = Counter(
            "fedtrain_aggregator_requests",
            "HTTP requests, by route template and status code.",
            [*labels, "endpoint", "code"],
            registry=self.registry,
        )
        self._round.labels(**self._training).set(-1)
        self._last_round = -1

    def _declare_update_metrics(self, labels: list[str]) -> None:
        """What the sites sent: verdicts, bytes, norms, and the time each fold took."""
        self._updates = Counter(
            "fedtrain_aggregator_updates",
            "Updates given a verdict, by verdict and rejection reason (each site of a round once).",
            [*labels, "verdict", "reason"],
            registry=self.registry,
        )
        self._update_bytes = Counter(
            "fedtrain_aggregator_update_bytes",
            "Bytes of the updates given a verdict.",
            labels,
            registry=self.registry,
        )
        self._fold_seconds = Histogram(
            "fedtrain_aggregator_fold_seconds",
            "Time to validate and fold one update.",
            labels,
            buckets=FOLD_BUCKETS,
            registry=self.registry,
        )
        self._update_norm = Histogram(
            "fedtrain_aggregator_update_norm",
            "L2 norm of each update received (rejected ones too, where it could be computed).",
            labels,
            buckets=NORM_BUCKETS,
            registry=self.registry,
        )

    def _declare_round_metrics(self, labels: list[str]) -> None:
        """The rounds closed, the last of them, and how long closing took."""
        self._close_seconds = Histogram(
            "fedtrain_aggregator_close_seconds",
            "Closing a round: writing the next global model and the manifest.",
            labels,
            buckets=FOLD_BUCKETS,
            registry=self.registry,
        )
        self._rounds_closed = Counter(
            "fedtrain_aggregator_rounds_closed",
            "Rounds this process closed (a closed round closed again is not counted).",
            labels,
            registry=self.registry,
        )
        self._round = Gauge(
            "fedtrain_aggregator_round",
            "The last round closed or found closed (-1 before any).",
            labels,
            registry=self.registry,
        )

    def verdict(self, verdict: UpdateVerdict, seconds: float) -> None:
        kind = "accepted" if verdict.accepted else "rejected"
        self._updates.labels(**self._training, verdict=kind, reason=verdict.reason or "").inc()
        self._update_bytes.labels(**self._training).inc(verdict.update_bytes)
        self._fold_seconds.labels(**self._training).observe(seconds)
        if verdict.norm is not None and math.isfinite(verdict.norm):
            self._update_norm.labels(**self._training).observe(verdict.norm)

    def round_closed(self, round_index: int, newly: bool, seconds: float) -> None:
        if newly:
            self._rounds_closed.labels(**self._training).inc()
            self._close_seconds.labels(**self._training).observe(seconds)
        if round_index > self._last_round:
            self._last_round = round_index
            self._round.labels(**self._training).set(round_index)

    def request(self, endpoint: str, code: int) -> None:
        self._requests.labels(**self._training, endpoint=endpoint, code=str(code)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------------
# readiness


class StoreReadiness:
    """Whether the bucket answers, asked at most every `ttl_seconds` and never waited on for long.

    The probe runs in a thread of its own, not in the request threadpool: a store that hangs (botocore
    retries for tens of seconds) must neither hold /readyz past the kubelet's timeout nor use up the
    workers the /v1 calls need.
    """

    def __init__(
        self,
        probe: Callable[[], object],
        ttl_seconds: float = READINESS_TTL_SECONDS,
        timeout_seconds: float = READINESS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.ttl_seconds = ttl_seconds
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._running: Future[str | None] | None = None

    async def problem(self) -> str | None:
        """None when the store answered, else why it is not ready."""
        with self._lock:
            fresh = self._checked_at is not None and self.clock() - self._checked_at < self.ttl_seconds
            if fresh:
                return self._problem
            if self._running is None:
                self._running = Future()
                threading.Thread(
                    target=self._check, args=(self._running,), name="store-readiness", daemon=True
                ).start()
            running = self._running
        try:
            # shield: a timed-out wait must not cancel the check, whose answer the next probe uses.
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running)), self.timeout_seconds)
        except TimeoutError:
            return f"the object store did not answer within {self.timeout_seconds:g} s"

    def _check(self, result: Future[str | None]) -> None:
        try:
            self.probe()
            problem = None
        except Exception as error:  # whatever the store raises, the answer is "not ready, because"
            problem = f"{type(error).__name__}: {error}"
        with self._lock:
            if problem != self._problem:
                if problem is None:
                    log.info("the object store answers again")
                else:
                    log.warning("the object store does not answer: %s", problem)
            self._checked_at = self.clock()
            self._problem = problem
            self._running = None
        result.set_result(problem)


# --------------------------------------------------------------------------------------------------
# ASGI middleware


class BearerAuth:
    """401 for any /v1 request without the training's bearer token, before routing or body parsing.

    A dependency would run after FastAPI has parsed the body, answering a malformed body with a 422
    to a caller that never proved who it is.
    """

    def __init__(self, app: ASGIApp, token: str, prefix: str = API_PREFIX) -> None:
        self.app = app
        self._token = token.encode()
        self._prefix = prefix

    def _problem(self, header: str | None) -> str | None:
        if header is None:
            return "missing Authorization header: send 'Authorization: Bearer <token>'"
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return "malformed Authorization header: send 'Authorization: Bearer <token>'"
        # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent.
        if not hmac.compare_digest(credentials.encode("latin-1"), self._token):
            return "wrong bearer token"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"].removeprefix(scope.get("root_path", ""))
            if path == self._prefix or path.startswith(self._prefix + "/"):
                problem = self._problem(Headers(scope=scope).get("authorization"))
                if problem is not None:
                    response = error_response(
                        401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"}
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads each request body whole before the app sees it, refusing one over `max_bytes` (413), by
    its Content-Length or by the bytes that actually arrive, and one not sent within `timeout_seconds`
    (408): a client that lies about its length holds a connection no longer than that."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send, 413)
            return
        try:
            async with asyncio.timeout(self.timeout_seconds):
                body = await self._read(receive)
        except TimeoutError:
            await self._refuse(scope, receive, send, 408)
            return
        if body is None:
            await self._refuse(scope, receive, send, 413)
            return
        delivered = False

        async def replay() -> AsgiMessage:
            nonlocal delivered
            if delivered:
                return await receive()  # the app waits for a disconnect: pass it on
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        if status == 413:
            code, message = "content-too-large", f"the body is over {self.max_bytes} bytes"
        else:
            code, message = "request-timeout", f"the body did not arrive within {self.timeout_seconds:g} s"
        # The connection is closed after the answer: what is left of the body is never read.
        response = error_response(status, code, message, headers={"Connection": "close"})
        await response(scope, receive, send)


class RequestMetrics:
    """Counts every response by route template (bounded labels) and status code, errors included."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE and isinstance(route, Route):
                return route.path
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started becomes a 500

        async def send_counted(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(self._endpoint(scope), status)


# --------------------------------------------------------------------------------------------------
# errors


def _field_problems(error: RequestValidationError) -> list[FieldProblem]:
    problems = []
    for problem in error.errors():
        location = [str(part) for part in problem.get("loc", ())]
        if problem["type"] == "json_invalid":
            context = problem.get("ctx", {}).get("error", "")
            position = location[1] if len(location) > 1 else "?"
            problems.append(
                FieldProblem(
                    field="body",
                    problem=f"not valid JSON: {context} at character {position}",
                    type="json_invalid",
                )
            )
            continue
        # ("body", "rejected", 0, "reason") -> rejected.0.reason; ("path", "round") -> round
        where = location[1:] if location and location[0] in ("body", "path", "query", "header") else location
        field = ".".join(where) or (location[0] if location else "request")
        message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(FieldProblem(field=field, problem=message, type=str(problem["type"])))
    return problems


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return error_response(error.status, error.code, error.message, headers=error.headers)

    async def invalid_request(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = _field_problems(error)
        message = "; ".join(f"{problem.field}: {problem.problem}" for problem in problems)
        return error_response(422, "invalid-request", message or "invalid request", details=problems)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8): as malformed as bad JSON.
            problem = FieldProblem(
                field="body", problem="cannot be decoded: send UTF-8 JSON", type="body_decode"
            )
            return error_response(422, "invalid-request", f"body: {problem.problem}", details=[problem])
        try:
            phrase = HTTPStatus(error.status_code).phrase
        except ValueError:
            phrase = f"HTTP {error.status_code}"
        codes = {404: "not-found", 405: "method-not-allowed"}
        code = codes.get(error.status_code, phrase.lower().replace(" ", "-"))
        detail = error.detail if isinstance(error.detail, str) else phrase
        if error.status_code == 404:
            detail = f"no endpoint {request.method} {request.url.path}"
        headers = dict(error.headers) if error.headers else None
        return error_response(error.status_code, code, detail, headers=headers)

    async def internal(request: Request, error: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal", f"{type(error).__name__}: {error}")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


class _Library:
    """The RoundAggregator behind one lock (it is not thread-safe), its exceptions as API errors."""

    def __init__(self, aggregator: RoundAggregator) -> None:
        self.aggregator = aggregator
        self.lock = threading.Lock()

    def call(self, what: str, work: Callable[[RoundAggregator], T]) -> T:
        with self.lock:
            try:
                return work(self.aggregator)
            except MissingModelError as error:
                log.warning("%s: %s", what, error)
                raise ApiError(409, "no-global-model", str(error)) from error
            except UnknownRoundError as error:  # a request the operator never sends: not a failure
                log.warning("%s: %s", what, error)
                raise ApiError(404, "unknown-round", str(error)) from error
            except PermanentError as error:  # classified where raised: retrying cannot help
                log.warning("%s: %s", what, error)
                # The user's spec at fault (a ModelError) keeps its reason across the API.
                code = "invalid-spec" if error.reason == INVALID_SPEC else "aggregation-failed"
                raise ApiError(409, code, str(error)) from error
            except TemporaryError as error:  # the store unreachable: the operator retries, bounded
                log.warning("%s: the object store failed: %s", what, error)
                raise ApiError(
                    503,
                    "store-unavailable",
                    f"the object store failed: {error}",
                    headers={"Retry-After": str(int(error.delay) or 1)},
                ) from error
            except ValueError as error:
                # As the local runner treats it: metadata that does not validate (a ModelError, also a
                # ValueError, was answered above). The operator fails the training with the message.
                log.warning("%s: %s", what, error)
                raise ApiError(409, "aggregation-failed", str(error)) from error


# --------------------------------------------------------------------------------------------------
# the app


def create_app(
    aggregator: RoundAggregator,
    token: str,
    *,
    registry: CollectorRegistry | None = None,
    readiness_probe: Callable[[], object] | None = None,
    readiness_ttl_seconds: float = READINESS_TTL_SECONDS,
    readiness_timeout_seconds: float = READINESS_TIMEOUT_SECONDS,
    serve_docs: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS,
) -> FastAPI:
    """The HTTP API around `aggregator`; /v1 requires `Authorization: Bearer <token>`.

    `serve_docs` serves /openapi.json, /docs and /redoc (without a token, as probes are); off, they
    are 404s: the schema describes the API, but need not be handed to anyone who asks.

    `readiness_probe` raises when the store is unusable; by default it lists one key of the training
    (S3: ListObjectsV2, which fails on a missing bucket, bad credentials or an unreachable endpoint).
    """
    if not token:
        raise ValueError("the bearer token is empty: every /v1 request would need to send none")
    layout = aggregator.layout
    metrics = ServiceMetrics(layout, registry)
    readiness = StoreReadiness(
        readiness_probe or (lambda: aggregator.store.list(layout.manifest(0))),
        ttl_seconds=readiness_ttl_seconds,
        timeout_seconds=readiness_timeout_seconds,
    )
    app = FastAPI(
        openapi_url="/openapi.json" if serve_docs else None,
        docs_url="/docs" if serve_docs else None,
        redoc_url="/redoc" if serve_docs else None,
        title="fedtrain aggregator",
        version="v1",
        description=(
            f"Validates and folds the site updates of training {layout.namespace}/{layout.name}, closes "
            "its rounds and writes the merged final model. Every /v1 call is idempotent."
        ),
    )
    _install_error_handlers(app)
    _add_probe_routes(app, readiness, metrics)
    v1 = _v1_router(_Library(aggregator), metrics)
    app.include_router(v1)
    # Inside BearerAuth: a caller without the token is answered before its body is read.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_seconds=body_timeout_seconds)
    # Added last, so outermost: the request counter sees the 401s of BearerAuth too.
    app.add_middleware(BearerAuth, token=token)
    # The app lists an included router as one opaque entry: match against the router's own routes.
    app.add_middleware(RequestMetrics, metrics=metrics, routes=[*v1.routes, *app.routes])
    return app


def _add_probe_routes(app: FastAPI, readiness: StoreReadiness, metrics: ServiceMetrics) -> None:
    """Probes and metrics: no token, and never in the worker threadpool the /v1 calls may fill."""

    @app.get("/healthz", response_model=StatusReply, tags=["probes"], summary="The process is alive.")
    async def healthz() -> StatusReply:
        return StatusReply(status="ok")

    @app.get(
        "/readyz",
        response_model=StatusReply,
        tags=["probes"],
        summary="The bucket answers.",
        responses=STORE_DOWN,
    )
    async def readyz() -> Response:
        problem = await readiness.problem()
        if problem is not None:
            return error_response(503, "store-unavailable", problem)
        return JSONResponse(StatusReply(status="ready").model_dump())

    @app.get(
        "/metrics",
        tags=["probes"],
        summary="Prometheus metrics.",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _v1_router(library: _Library, metrics: ServiceMetrics) -> APIRouter:
    """/v1: the token is checked by BearerAuth; the dependency declares it in the OpenAPI schema.

    Replies go out by alias, FastAPI's default and what the OpenAPI schema says: the models' own
    fields have none; a verdict's evaluation reads macroF1, as in the resource's status.
    """
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="bearer",
        description="The training's aggregator token (the Secret the operator creates).",
    )
    v1 = APIRouter(
        prefix=API_PREFIX,
        tags=["v1"],
        dependencies=[Security(bearer)],
        responses={**UNAUTHORIZED, **INVALID, **STORE_DOWN, **BODY_LIMITS},
    )

    @v1.post(
        "/initialize",
        response_model=ModelReply,
        summary="Write the round-0 global model unless it exists.",
        responses=CONFLICT,
    )
    def initialize() -> ModelReply:
        return ModelReply(model_uri=library.call("initialize", lambda agg: agg.initialize()))

    _add_round_routes(v1, library, metrics)
    _add_secure_aggregation_route(v1, library)
    _add_retention_route(v1, library)

    @v1.post(
        "/merge",
        response_model=ModelReply,
        summary="Write the final model, a round's global model with LoRA folded in, and the best round's.",
        responses={**CONFLICT, **UNKNOWN_ROUND},
    )
    def merge(request: MergeRequest) -> ModelReply:
        reply: ModelReply = library.call(
            f"merge round {request.round}", lambda agg: agg.merge(request.round, request.best_round)
        )
        return reply

    return v1


def _add_round_routes(v1: APIRouter, library: _Library, metrics: ServiceMetrics) -> None:
    """A round's calls: submit a site's update, close the round, read it."""

    @v1.post(
        "/rounds/{round}/updates",
        response_model=UpdateVerdict,
        summary="Validate a site's update and fold it into the round: the verdict (rejections too).",
        responses=NO_GLOBAL_MODEL,
    )
    def submit_update(round: RoundIndex, request: SubmitUpdateRequest) -> UpdateVerdict:
        def work(agg: RoundAggregator) -> UpdateVerdict:
            known = request.site in agg.open_verdicts(round)
            started = time.perf_counter()
            verdict = agg.submit(round, request.site)
            # Count each site of a round once: repeated submits and closed rounds give recorded verdicts.
            if not known and request.site in agg.open_verdicts(round):
                metrics.verdict(verdict, time.perf_counter() - started)
            return verdict

        return library.call(f"round {round} submit {request.site}", work)

    @v1.post(
        "/rounds/{round}/close",
        response_model=RoundManifest,
        summary="Write the next global model and the manifest; a closed round returns its manifest.",
        responses=CONFLICT,
    )
    def close_round(round: RoundIndex, request: CloseRoundRequest) -> RoundManifest:
        def work(agg: RoundAggregator) -> RoundManifest:
            newly = agg.manifest(round) is None
            started = time.perf_counter()
            manifest = agg.close(round, list(request.participants), list[RejectedUpdate](request.rejected))
            metrics.round_closed(round, newly, time.perf_counter() - started)
            return manifest

        return library.call(f"round {round} close", work)

    @v1.get(
        "/rounds/{round}",
        response_model=RoundReply,
        summary="Whether a round is closed, its manifest, and the verdicts known.",
    )
    def get_round(round: RoundIndex) -> RoundReply:
        def work(agg: RoundAggregator) -> RoundReply:
            manifest = agg.manifest(round)
            if manifest is None:
                return RoundReply(round=round, closed=False, verdicts=agg.open_verdicts(round))
            verdicts = RoundAggregator.verdicts_from_manifest(manifest)
            return RoundReply(round=round, closed=True, manifest=manifest, verdicts=verdicts)

        return library.call(f"round {round}", work)


def _add_retention_route(v1: APIRouter, library: _Library) -> None:
    """storage.retention: the engine's call that deletes what a closed round no longer needs."""

    @v1.post(
        "/rounds/{round}/retention",
        response_model=RetentionReply,
        summary="storage.retention: delete a closed round's updates and global models out of the window.",
        responses={**CONFLICT, **UNKNOWN_ROUND},
    )
    def apply_retention(round: RoundIndex, request: RetentionRequest) -> RetentionReply:
        def work(agg: RoundAggregator) -> RetentionReply:
            return RetentionReply(deleted=agg.apply_retention(round, request.updates, list(request.models)))

        return library.call(f"round {round} retention", work)


def _add_secure_aggregation_route(v1: APIRouter, library: _Library) -> None:
    """privacy.secureAggregation: the engine's call that ends a round's protocol phase."""

    @v1.post(
        "/rounds/{round}/secagg",
        response_model=SecureAggregationReply,
        summary="privacy.secureAggregation: end the round's current protocol phase if it may end.",
        responses={**CONFLICT, **NO_GLOBAL_MODEL},
    )
    def advance_secure(round: RoundIndex, request: SecureAggregationRequest) -> SecureAggregationReply:
        def work(agg: RoundAggregator) -> SecureAggregationReply:
            progress = agg.advance_secure(round, list(request.live), request.started_at, request.now)
            return SecureAggregationReply(phase=progress.phase, waiting_on=list(progress.waiting_on))

        return library.call(f"round {round} secure aggregation", work)
