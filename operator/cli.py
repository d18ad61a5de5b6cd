"""The `fedtrain` command: validate a resource, run it on this machine, generate the CRD."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from fedtrain.api import (
    FederatedTraining,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    Phase,
    PretrainedSource,
)
from fedtrain.crd import CRD_DIRS, CRD_FILENAME, render_crd
from fedtrain.pretrained import cluster_problems
from fedtrain.resource import InvalidResourceError, load_resource

if TYPE_CHECKING:
    from fedtrain.trainer.predict import Prediction

    from .local import RunOptions

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

#: `fedtrain run` of a suspended resource: the runner returns at once and the command exits 0.
SUSPENDED_MESSAGE = (
    "spec.suspend is true: nothing was run; set spec.suspend to false and run again "
    "(add --resume to continue this run)"
)


def _refuse(headline: str, problems: list[str]) -> typer.Exit:
    """Print why a file is refused, user text escaped (a pattern's [a-z0-9] is not rich markup)."""
    errors.print(f"[red]error:[/] {escape(headline)}")
    for problem in problems:
        errors.print(f"  {problem}", markup=False, soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def _load_or_exit(path: Path) -> FederatedTraining:
    try:
        return load_resource(path)
    except InvalidResourceError as error:
        raise _refuse(f"{error.path} is not a valid FederatedTraining:", error.problems) from None


def local_problems(spec: FederatedTrainingSpec) -> list[str]:
    """What a local run cannot find: data paths that do not exist on this machine (a cluster cannot
    tell, its paths are inside the sites' volumes)."""
    problems = []
    pretrained = spec.model.pretrained
    if pretrained.source is PretrainedSource.FILE and not Path(pretrained.location or "").is_file():
        problems.append(
            f"spec.model.pretrained.location: {pretrained.location} is not a file on this machine"
        )
    for index, site in enumerate(spec.sites):
        data = site.data
        if data.image_folder is not None and not Path(data.image_folder.path).is_dir():
            problems.append(
                f"spec.sites[{index}].data.imageFolder.path: {data.image_folder.path} is not a directory "
                "on this machine"
            )
        if data.npz is not None and data.npz.path is not None and not Path(data.npz.path).is_file():
            where = f"spec.sites[{index}].data.npz.path"
            problems.append(f"{where}: {data.npz.path} is not a file on this machine")
    return problems


@app.command()
def validate(
    file: Path = typer.Argument(..., help="FederatedTraining YAML file."),
    cluster: bool = typer.Option(
        False,
        "--cluster",
        help="Also check what a cluster needs beyond a local run (spec.storage; no pretrained file).",
    ),
) -> None:
    """Check a FederatedTraining file without running anything."""
    resource = _load_or_exit(file)
    spec = resource.spec
    from .privacy_budget import budget_problem

    if (problem := budget_problem(spec)) is not None:
        raise _refuse(f"{file} is not valid:", [problem])
    if cluster:
        from .admission import trainer_job_problems  # the Kubernetes schema loads only here

        namespace = resource.metadata.namespace or "default"
        problems = cluster_problems(spec) + trainer_job_problems(spec, resource.metadata.name, namespace)
        if problems:
            raise _refuse(f"{file} cannot run on a cluster:", problems)
    console.print(
        f"{file}: valid: {resource.metadata.name}, {len(spec.sites)} sites, {spec.training.rounds} rounds, "
        f"model {spec.model.name}",
        markup=False,
    )
    if spec.privacy.dp is not None:
        console.print(_privacy_plan(spec), markup=False)
    if spec.privacy.secure_aggregation is not None:
        console.print(_secure_plan(spec), markup=False)


def _privacy_plan(spec: FederatedTrainingSpec) -> str:
    """What privacy.dp will spend: epsilon after all rounds, and how many rounds the budget allows."""
    from .privacy_budget import epsilon_spent, rounds_within

    dp = spec.privacy.dp
    if dp is None:
        return ""
    rounds = spec.training.rounds
    spent = epsilon_spent(spec, rounds) or 0.0
    plan = f"privacy.dp: epsilon {spent:.3g} at delta {dp.delta:g} after all {rounds} rounds"
    if dp.target_epsilon is not None:
        fits = rounds_within(spec, dp.target_epsilon)
        plan += f"; targetEpsilon {dp.target_epsilon:g} allows {fits} of them"
    return plan


def _secure_plan(spec: FederatedTrainingSpec) -> str:
    """What privacy.secureAggregation will run: the graph, the threshold, the weights' range and the
    fixed-point precision of the decoded mean."""
    from fedtrain.secagg_round import degree, fixed_point, max_weight, threshold

    secure, clip = spec.privacy.secure_aggregation, spec.privacy.clip_norm
    if secure is None or clip is None:
        return ""
    sites = spec.aggregation.sites_per_round(len(spec.sites))
    neighbours = degree(secure, sites)
    graph = "every other site" if neighbours == sites - 1 else f"{neighbours} neighbours each"
    weighting = spec.aggregation.weighting
    code = fixed_point(secure, clip, len(spec.sites), weighting)
    noise = " before the dp noise" if spec.privacy.dp is not None else ""
    return (
        f"privacy.secureAggregation: {sites} sites a round masking with {graph}, threshold "
        f"{threshold(secure, sites)}; weights 1 to {max_weight(secure, weighting)}; the decoded mean is "
        f"within {code.bound:.2g} of the exact one per element{noise} ({code.precision_bits:.1f} bits of "
        "clipNorm)"
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
        0,
        "--parallel",
        min=0,
        help="Trainer processes at once [default: one per free core; under privacy.secureAggregation at "
        "least the sites a round selects, which must run at once].",
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
    problems = local_problems(resource.spec)
    if problems:
        raise _refuse(f"{file} cannot run on this machine:", problems)
    if resume and overwrite:
        errors.print(
            "[red]error:[/] --resume continues the run in --run-dir, --overwrite deletes it: choose one"
        )
        raise typer.Exit(EXIT_INVALID)
    from .local import RunOptions  # torch loads only here

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
    status = _run_here(file, resource, options)
    if status.phase == Phase.SUSPENDED:
        console.print(SUSPENDED_MESSAGE)
    elif status.phase != Phase.SUCCEEDED:
        errors.print(f"[red]training failed:[/] {escape(status.message or '')}")
        raise typer.Exit(EXIT_FAILED)


def _run_here(file: Path, resource: FederatedTraining, options: RunOptions) -> FederatedTrainingStatus:
    """Drive the run with a live progress display; a summary follows unless nothing was run."""
    from .local import SITE_MERGED_FILE, LocalRunner, RunError
    from .progress import RunProgress

    started = time.monotonic()
    with RunProgress(console, resource.spec, options.run_dir) as progress:
        try:
            runner = LocalRunner(
                resource,
                options,
                on_event=progress.event,
                on_round=progress.round_closed,
                on_step=progress.update,
            )
            status = runner.run()
        except RunError as error:
            errors.print(f"[red]error:[/] {escape(str(error))}")
            raise typer.Exit(EXIT_INVALID) from None
        except KeyboardInterrupt:
            progress.stop()
            errors.print(
                f"\ninterrupted: trainers stopped, status saved in {options.run_dir}; continue with\n"
                f"  fedtrain run {file} --run-dir {options.run_dir} --resume",
                markup=False,
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if status.phase != Phase.SUSPENDED:
        progress.summary(status, time.monotonic() - started)
        for site in sorted(status.site_model_uris):
            merged = options.run_dir / SITE_MERGED_FILE.format(site=site)
            console.print(f"site {site}'s own merged model: {merged}", markup=False)
    return status


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
                console.print(f"{path}: up to date", markup=False)
                continue
            stale = True
            state = "is missing" if current is None else "is out of date with fedtrain/api.py"
            fix = "run `make crd` (fedtrain crd) and commit the file"
            errors.print(f"[red]error:[/] {escape(str(path))} {state}: {fix}")
        if stale:
            raise typer.Exit(EXIT_FAILED)
        return
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        console.print(f"wrote {path}", markup=False)


if __name__ == "__main__":
    app()


@app.command()
def unseal(
    sealed: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="A sealed object downloaded from the bucket."
    ),
    key_file: Path = typer.Option(
        ...,
        "--key-file",
        exists=True,
        dir_okay=False,
        help="The training's data key (32 bytes, raw or base64).",
    ),
    training: str = typer.Option(..., "--training", help="The training's metadata.name."),
    object_key: str = typer.Option(
        ...,
        "--object",
        help="The object's key under the training's store root, e.g. "
        "research/wafer/final/model-merged.safetensors (NAMESPACE/NAME/...).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the opened object."),
) -> None:
    """Open an object that privacy.encryptAtRest sealed (e.g. the final merged model), checking that
    it is intact and is the object named: a tampered, truncated or swapped object is refused."""
    from fedtrain.sealed_store import identity
    from fedtrain.sealing import SealError, load_key_file, open_file

    try:
        data_key = load_key_file(key_file)
        open_file(data_key, identity(training, object_key), sealed, output)
    except SealError as error:
        errors.print(f"[red]refused ({error.reason}):[/] {escape(str(error))}")
        raise typer.Exit(EXIT_FAILED) from None
    except ValueError as error:
        errors.print(f"[red]error:[/] {escape(str(error))}")
        raise typer.Exit(EXIT_INVALID) from None
    console.print(f"wrote {output}", markup=False)


@app.command()
def predict(
    model: Path = typer.Argument(
        ..., help="An exported model: a training's model-merged.safetensors (or model-swag.safetensors)."
    ),
    inputs: list[Path] = typer.Argument(
        ...,
        help="NPZ wafer maps (maps, optional labels), image files, or image folders (class sub-directories).",
    ),
    top: int = typer.Option(3, "--top", min=1, help="Classes to show per input."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout, for machines."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Inputs per forward pass."),
    mc_dropout: int = typer.Option(
        0,
        "--mc-dropout",
        min=0,
        help="Average this many passes with dropout kept on (MC dropout; 0: one plain pass): the entropy "
        "then includes the model's own uncertainty.",
    ),
    dropout: float = typer.Option(
        0.1, "--dropout", min=0.0, max=0.99, help="--mc-dropout: the dropout rate."
    ),
    swag: int = typer.Option(
        0,
        "--swag",
        min=0,
        help="Average the predictions of this many weight draws from a SWAG model (a training's "
        "model-swag.safetensors; 0: its weights at the SWAG mean alone).",
    ),
) -> None:
    """Classify inputs with an exported model: each input's top classes with their probabilities and
    the predictive entropy (nats; log of the class count is a uniform guess). Inputs are prepared as
    the trainers prepared them for that model (wafer maps one-hot, images ImageNet-normalised)."""
    from fedtrain.trainer.predict import PredictError, load_model, load_swag_model, read_inputs
    from fedtrain.trainer.predict import predict as run_predict

    if swag and mc_dropout:
        errors.print("[red]error:[/] --swag and --mc-dropout are two ways to sample: pass one of them")
        raise typer.Exit(EXIT_INVALID)
    try:
        sampler = None
        if swag:
            network, config, sampler = load_swag_model(model, swag)
        else:
            network, config = load_model(model)
        batch = read_inputs(inputs, config)
    except PredictError as error:
        errors.print(f"[red]error:[/] {escape(str(error))}")
        raise typer.Exit(EXIT_INVALID) from None
    sampling = (mc_dropout, dropout) if mc_dropout else None
    predictions = run_predict(network, batch, config["labels"], top, batch_size, sampling, sampler)
    _show_predictions(model, predictions, config["labels"], as_json)


def _show_predictions(model: Path, predictions: list[Prediction], labels: list[str], as_json: bool) -> None:
    from fedtrain.trainer.predict import accuracy, max_entropy

    scored = accuracy(predictions)
    if as_json:
        document = {
            "model": str(model),
            "predictions": [p.as_json() for p in predictions],
            "accuracy": scored,
        }
        typer.echo(json.dumps(document, indent=2))
        return
    for prediction in predictions:
        best = ", ".join(f"{name} {probability:.3f}" for name, probability in prediction.top)
        known = f" (label {prediction.label})" if prediction.label is not None else ""
        console.print(f"{prediction.source}: {best}; entropy {prediction.entropy:.3f}{known}", markup=False)
    uniform = max_entropy(len(labels))
    summary = f"{len(predictions)} inputs; entropy of a uniform guess {uniform:.3f}"
    if scored is not None:
        summary += f"; accuracy {scored:.3f} on the {sum(p.label is not None for p in predictions)} labelled"
    console.print(summary, markup=False)
