"""Shared pytest fixtures.

S3 is moto's server mode on 127.0.0.1: boto3 and presigned URLs go through real HTTP, as they would
against MinIO or AWS, with no network and no credentials. One server serves the whole session and
every test gets a bucket of its own, so tests neither wait for a server nor see each other's objects.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from moto.server import ThreadedMotoServer
from ports import free_port

from fedtrain.store import S3Store

#: boto3's default credential chain finds these; moto accepts any keys.
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server that lives for the test session."""
    # Session scope cannot use monkeypatch, so save and restore the variables by hand; this also keeps
    # a developer's real AWS keys from ever reaching a test.
    saved = {name: os.environ.get(name) for name in _FAKE_AWS_ENV}
    os.environ.update(_FAKE_AWS_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_store(s3_endpoint: str) -> Iterator[S3Store]:
    """An S3Store with prefix 'test' on a fresh bucket of its own."""
    store = S3Store(bucket=f"test-{uuid.uuid4().hex[:16]}", prefix="test", endpoint=s3_endpoint)
    store.ensure_bucket()
    yield store
    # moto keeps objects in memory for the whole session; drop this test's.
    for key in store.list():
        store.delete(key)


@pytest.fixture
def plain_vit() -> Callable[..., Any]:
    """A plain timm DINOv2-architecture ViT at 28 pixels, the tests' tiny model, without peft."""

    def make(num_classes: int = 9, depth: int = 1, embed_dim: int = 32, num_heads: int = 2) -> Any:
        import timm  # here, so tests that need no model do not pay for importing it

        return timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            num_classes=num_classes,
            img_size=28,
            depth=depth,
            embed_dim=embed_dim,
            num_heads=num_heads,
        )

    return make
