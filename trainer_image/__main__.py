"""`python -m fedtrain.trainer --config FILE`: run one site's round and exit.

Exit codes: 0 done; 2 the job file is invalid; 3 the global model does not fit this site's model;
4 the site's data cannot be read; 1 anything else, such as an object store that stayed out of
reach until the round's deadline (a retry may help).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError

from fedtrain.api import describe_errors
from fedtrain.job import TrainerJob, parse_job_file

EXIT_OTHER = 1
EXIT_INVALID = 2
EXIT_INCOMPATIBLE = 3
EXIT_DATA = 4

app = typer.Typer(add_completion=False)


@app.command()
def main(
    config: Path = typer.Option(
        ..., "--config", "-c", exists=True, dir_okay=False, help="Trainer job (YAML or JSON)."
    ),
) -> None:
    """Run one federated round for one site: score the global model, train, upload the update."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("fedtrain.trainer")
    try:
        job = TrainerJob.model_validate(parse_job_file(config.read_text()))
    except ValidationError as error:
        for line in describe_errors(error):
            log.error("%s: %s", config, line)
        raise typer.Exit(EXIT_INVALID) from None
    except yaml.YAMLError as error:
        log.error("%s is not valid YAML: %s", config, error)
        raise typer.Exit(EXIT_INVALID) from None
    _run(job)


def _run(job: TrainerJob) -> None:
    """Run a valid job, mapping its failures to exit codes. torch, timm and peft are imported here,
    once the job file is known to be valid: a bad one is refused in a second, not after the imports."""
    from fedtrain.model import ModelError
    from fedtrain.store import ObjectNotFound, StoreError

    from .data import DataError
    from .secure import SecureAggregationError
    from .train import IncompatibleModelError, run_job

    log = logging.getLogger("fedtrain.trainer")
    try:
        run_job(job)
    except (IncompatibleModelError, ModelError) as error:
        log.error("%s", error)
        raise typer.Exit(EXIT_INCOMPATIBLE) from None
    except DataError as error:
        log.error("%s", error)
        raise typer.Exit(EXIT_DATA) from None
    except SecureAggregationError as error:
        log.error("%s", error)
        raise typer.Exit(EXIT_OTHER) from None
    except (StoreError, ObjectNotFound) as error:
        # Transfers were already retried until the round's deadline; the message says what failed.
        log.error("%s", error)
        raise typer.Exit(EXIT_OTHER) from None


if __name__ == "__main__":
    sys.exit(app())
