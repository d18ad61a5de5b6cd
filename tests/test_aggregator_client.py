"""The operator's aggregator client against a real HTTP server: a dropped connection is sent again once."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fedtrain.operator.aggregator_client import AggregatorClient, AggregatorUnavailableError


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
