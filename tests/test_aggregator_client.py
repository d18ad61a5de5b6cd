"""The operator's aggregator client against a real HTTP server: a dropped connection is sent again once."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fedtrain.errors import PermanentError, TemporaryError
from fedtrain.operator.aggregator_client import (
    AggregatorClient,
    AggregatorRefusedError,
    AggregatorUnavailableError,
)


async def serve(drops: int) -> tuple[TestServer, list[str]]:
    """A server that drops the first `drops` requests without an answer, then answers."""
    seen: list[str] = []

    async def initialize(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers["Authorization"])
        if len(seen) <= drops:
            assert request.transport is not None
            request.transport.close()  # the client sees ServerDisconnectedError
            return web.Response()
        return web.json_response({"model_uri": "s3://bucket/global/00000.safetensors"})

    app = web.Application()
    app.router.add_post("/v1/initialize", initialize)
    server = TestServer(app)
    await server.start_server()
    return server, seen


@pytest.mark.asyncio
async def test_a_dropped_connection_is_retried_once() -> None:
    server, seen = await serve(drops=1)
    async with aiohttp.ClientSession() as session:
        client = AggregatorClient(session, str(server.make_url("/")), "token", timeout=10)
        assert await client.initialize() == "s3://bucket/global/00000.safetensors"
    assert seen == ["Bearer token", "Bearer token"]
    await server.close()


@pytest.mark.asyncio
async def test_a_server_that_keeps_dropping_is_unavailable() -> None:
    server, seen = await serve(drops=5)
    async with aiohttp.ClientSession() as session:
        client = AggregatorClient(session, str(server.make_url("/")), "token", timeout=10)
        with pytest.raises(AggregatorUnavailableError, match="ServerDisconnectedError"):
            await client.initialize()
    assert len(seen) == 2  # one retry, then the operator's own back-off takes over
    await server.close()


async def answering(status: int, payload: dict[str, object], headers: dict[str, str]) -> TestServer:
    async def close(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/rounds/0/close", close)
    server = TestServer(app)
    await server.start_server()
    return server


@pytest.mark.asyncio
async def test_a_refusal_is_permanent_and_an_unready_service_temporary_with_its_delay() -> None:
    refused = await answering(409, {"error": {"code": "aggregation-failed", "message": "no update"}}, {})
    unready = await answering(
        503, {"error": {"code": "store-unavailable", "message": "down"}}, {"Retry-After": "7"}
    )
    async with aiohttp.ClientSession() as session:
        client = AggregatorClient(session, str(refused.make_url("/")), "token", timeout=10)
        with pytest.raises(PermanentError, match="no update") as permanent:
            await client.close(0, ["fab-a"], [])
        assert isinstance(permanent.value, AggregatorRefusedError)
        assert permanent.value.code == "aggregation-failed"
        assert permanent.value.reason == "AggregatorError"
        client = AggregatorClient(session, str(unready.make_url("/")), "token", timeout=10)
        with pytest.raises(TemporaryError, match="HTTP 503 store-unavailable: down") as temporary:
            await client.close(0, ["fab-a"], [])
        assert temporary.value.delay == 7
    await refused.close()
    await unready.close()


@pytest.mark.asyncio
async def test_a_spec_that_does_not_fit_the_model_fails_as_an_invalid_spec() -> None:
    """The service's code says the spec is at fault: the training fails with InvalidSpec, the message kept."""
    message = "spec.exchange.layers[0]: 'foo.*' matches no trainable tensor; trainable tensors look like ..."
    refused = await answering(409, {"error": {"code": "invalid-spec", "message": message}}, {})
    async with aiohttp.ClientSession() as session:
        client = AggregatorClient(session, str(refused.make_url("/")), "token", timeout=10)
        with pytest.raises(AggregatorRefusedError) as permanent:
            await client.close(0, ["fab-a"], [])
    await refused.close()
    assert (permanent.value.code, permanent.value.reason) == ("invalid-spec", "InvalidSpec")
    assert str(permanent.value) == message
