"""`python -m fedtrain.aggregator serve`: one training's aggregator as an HTTP service.

On SIGTERM uvicorn finishes the requests in flight and then re-raises the signal, so a stopped
service ends by it. Otherwise: 2 the settings or the training file are invalid; 1 the service could
not start (the pretrained weights could not be read, the port is taken).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from fedtrain.api import FederatedTraining
from fedtrain.sealing import DataKey
from fedtrain.store import ObjectNotFound, StoreError

from .settings import (
    KEEP_ALIVE_SECONDS,
    AggregatorSettings,
    SettingsError,
    layout_of,
    load_settings,
    pretrained_weights,
    store_of,
)

EXIT_FAILED = 1
EXIT_INVALID = 2

log = logging.getLogger("fedtrain.aggregator")

__all__ = ["KEEP_ALIVE_SECONDS", "app"]  # the keep-alive is read by benchmarks/operator_scale.py

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The fedtrain aggregator: validates site updates, closes rounds, merges the final model.",
)


@app.callback()
def main() -> None:
    """The fedtrain aggregator (settings: FEDTRAIN_AGGREGATOR_* environment variables)."""


@app.command()
def serve(
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on (env FEDTRAIN_AGGREGATOR_HOST)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port to listen on (env FEDTRAIN_AGGREGATOR_PORT)."
    ),
    training_file: Path | None = typer.Option(
        None,
        "--training-file",
        help="FederatedTraining YAML/JSON file (env FEDTRAIN_AGGREGATOR_TRAINING_FILE).",
    ),
) -> None:
    """Serve the aggregator's HTTP API for the training in the training file."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(training_file=training_file, host=host, port=port)
        token = settings.bearer_token()
        resource = settings.training()
        data_key = settings.data_key(resource)
    except SettingsError as error:
        for problem in error.problems:
            log.error("%s", problem)
        raise typer.Exit(EXIT_INVALID) from None

    serve_training(settings, token, resource, data_key)


def serve_training(
    settings: AggregatorSettings, token: str, resource: FederatedTraining, data_key: DataKey | None = None
) -> None:
    """Build the aggregator of the training and serve it until a signal stops uvicorn."""
    # torch, timm and FastAPI load only once the settings are known to be good.
    import uvicorn

    from .rounds import RoundAggregator
    from .server import server_config
    from .service import create_app

    layout = layout_of(resource)
    try:
        weights = pretrained_weights(resource)
    except (ObjectNotFound, StoreError) as error:
        log.error("cannot read the pretrained weights %s: %s", resource.spec.model.pretrained.location, error)
        raise typer.Exit(EXIT_FAILED) from None
    aggregator = RoundAggregator(
        store_of(resource),
        layout,
        resource.spec,
        pretrained_weights=weights,
        max_site_samples=settings.max_site_samples,
        data_key=data_key,
    )
    log.info(
        "aggregator of %s/%s on %s:%d, store %s",
        layout.namespace,
        layout.name,
        settings.host,
        settings.port,
        aggregator.store.uri(layout.root),
    )
    app = create_app(
        aggregator,
        token,
        serve_docs=settings.serve_docs,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.body_timeout_seconds,
    )
    # log_config=None: uvicorn's loggers (one access line per request) go through the root handler above.
    # Every wait on a client is bounded: see fedtrain.aggregator.server.
    config = server_config(
        app,
        settings.host,
        settings.port,
        limit_concurrency=settings.limit_concurrency,
        header_timeout_seconds=settings.header_timeout_seconds,
        log_config=None,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # the port was taken, or the app failed its start-up
        raise typer.Exit(EXIT_FAILED)


if __name__ == "__main__":
    app()
