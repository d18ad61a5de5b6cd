"""The `fedtrain` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from fedtrain.api import FederatedTraining, describe_errors
from fedtrain.crd import CRD_DIRS, CRD_FILENAME, render_crd

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated fine-tuning of vision models across sites that never share their data.",
)
# Output captured in a file or CI log gets room for a per-site table; a terminal keeps its width.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
errors = Console(stderr=True, highlight=False)

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


class InvalidResourceError(Exception):
    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: {len(problems)} problem(s)")
        self.path = path
        self.problems = problems


def load_resource(path: Path) -> FederatedTraining:
    """Read a FederatedTraining YAML file, as written for `kubectl apply`."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise InvalidResourceError(path, [f"cannot read the file: {error.strerror}"]) from None
    except yaml.YAMLError as error:
        raise InvalidResourceError(path, [f"not valid YAML: {error}"]) from None
    if not isinstance(document, dict):
        raise InvalidResourceError(
            path, ["expected a FederatedTraining object (apiVersion, kind, metadata, spec)"]
        )
    try:
        return FederatedTraining.model_validate(document)
    except ValidationError as error:
        raise InvalidResourceError(path, describe_errors(error)) from None


def _load_or_exit(path: Path) -> FederatedTraining:
    try:
        return load_resource(path)
    except InvalidResourceError as error:
        errors.print(f"[red]error:[/] {error.path} is not a valid FederatedTraining:")
        for problem in error.problems:
            errors.print(f"  {problem}")
        raise typer.Exit(EXIT_INVALID) from None


@app.command()
def validate(file: Path = typer.Argument(..., help="FederatedTraining YAML file.")) -> None:
    """Check a FederatedTraining file without running anything."""
    resource = _load_or_exit(file)
    spec = resource.spec
    console.print(
        f"{file}: valid: {resource.metadata.name}, {len(spec.sites)} sites, {spec.training.rounds} rounds, "
        f"model {spec.model.name}"
    )


@app.command()
def run(
    file: Path = typer.Argument(
        ..., help="FederatedTraining YAML file (the same one you would kubectl apply)."
    ),
    run_dir: Path | None = typer.Option(
        None,
        "--run-dir",
        help="Where status, history, plot, logs and the final model go [default: runs/NAME].",
    ),
    store: str | None = typer.Option(
        None, "--store", help="Object store: s3://bucket/prefix, or a directory [default: RUN_DIR/store]."
    ),
    endpoint: str | None = typer.Option(None, "--endpoint", help="S3 endpoint URL (MinIO, moto, Ceph RGW)."),
    parallel: int = typer.Option(
        0, "--parallel", min=0, help="Trainer processes at once [default: one per core]."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --run-dir from its last status."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier run in --run-dir first."),
    trainer_command: str | None = typer.Option(
        None,
        "--trainer-command",
        help="Command that runs a trainer job, given '--config FILE' [default: python -m fedtrain.trainer].",
    ),
) -> None:
    """Run a federated training on this machine: one trainer process per site, a local aggregator."""
    resource = _load_or_exit(file)
    if resume and overwrite:
        errors.print(
            "[red]error:[/] --resume continues the run in --run-dir, --overwrite deletes it: choose one"
        )
        raise typer.Exit(EXIT_INVALID)
    from fedtrain.operator.local import LocalRunner, RunError, RunOptions  # torch loads only here
    from fedtrain.operator.progress import RunProgress

    options = RunOptions(
        run_dir=run_dir or Path("runs") / resource.metadata.name,
        store=store,
        endpoint=endpoint,
        parallel=parallel,
        resume=resume,
        overwrite=overwrite,
    )
    if trainer_command:
        options.trainer_command = trainer_command.split()
    started = time.monotonic()
    with RunProgress(console, resource.spec, options.run_dir) as progress:
        runner = LocalRunner(
            resource,
            options,
            on_event=progress.event,
            on_round=progress.round_closed,
            on_step=progress.update,
        )
        try:
            status = runner.run()
        except RunError as error:
            errors.print(f"[red]error:[/] {error}")
            raise typer.Exit(EXIT_INVALID) from None
        except KeyboardInterrupt:
            progress.stop()
            errors.print(
                f"\ninterrupted: trainers stopped, status saved in {options.run_dir}; continue with\n"
                f"  fedtrain run {file} --run-dir {options.run_dir} --resume"
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
    progress.summary(status, time.monotonic() - started)
    if status.phase.value != "Succeeded":
        errors.print(f"[red]training failed:[/] {status.message}")
        raise typer.Exit(EXIT_FAILED)


@app.command()
def crd(
    output_dirs: list[Path] = typer.Option(
        [Path(folder) for folder in CRD_DIRS],
        "--output-dir",
        metavar="DIR",
        help="Folder to write the CRD file to; repeat the option for several.",
    ),
    check: bool = typer.Option(
        False,
        "--check",
        help="Write nothing; exit 1 if a file differs from what fedtrain/api.py generates.",
    ),
) -> None:
    """Generate the FederatedTraining CustomResourceDefinition from the API models."""
    text = render_crd()
    paths = [folder / CRD_FILENAME for folder in output_dirs]
    if check:
        stale = False
        for path in paths:
            try:
                current = path.read_text()
            except FileNotFoundError:
                current = None
            if current == text:
                console.print(f"{path}: up to date")
                continue
            stale = True
            state = "is missing" if current is None else "is out of date with fedtrain/api.py"
            errors.print(f"[red]error:[/] {path} {state}: run `make crd` (fedtrain crd) and commit the file")
        if stale:
            raise typer.Exit(EXIT_FAILED)
        return
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
