"""Progress of a local run on the terminal: a bar with round, sites done and ETA, a line per round."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtrain.api import FederatedTrainingSpec, FederatedTrainingStatus, RoundRecord, Stage, TrainingMode

from .engine import Event
from .local import BEST_MERGED_FILE, MERGED_FILE, SWAG_MODEL_FILE, load_history
from .report import cross_site_document, plot_cross_site, plot_history, round_table, test_table, upload_table

PLOT_FILE = "plot.png"
#: evaluation.crossSite: the matrix and its heatmap.
CROSS_SITE_FILE = "cross-site.json"
CROSS_SITE_PLOT = "cross-site.png"


class RunProgress:
    def __init__(self, console: Console, spec: FederatedTrainingSpec, run_dir: Path) -> None:
        self.console = console
        self.spec = spec
        self.run_dir = run_dir
        self.sites = [site.name for site in spec.sites]
        self.progress = Progress(
            TextColumn("[bold]{task.fields[round_text]}"),
            BarColumn(),
            TextColumn("{task.fields[sites_text]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        # The last unit of work is the final evaluation of the model every site scores.
        self.task = self.progress.add_task(
            "run", total=spec.training.rounds + 1, round_text="starting", sites_text=""
        )

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.progress.stop()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, status: FederatedTrainingStatus) -> None:
        rounds = self.spec.training.rounds
        done = sum(site.state.terminal for site in status.sites)
        if status.stage is Stage.EVALUATING:
            label = "final evaluation"
        elif status.stage in (Stage.FINALIZING, Stage.DONE):
            label = "merging the final model"
        else:
            label = f"round {min(status.round + 1, rounds)} of {rounds}"
        fraction = done / len(status.sites) if status.sites else 0.0
        completed = status.round + fraction if status.stage is not Stage.DONE else rounds + 1
        self.progress.update(
            self.task,
            completed=completed,
            round_text=label,
            sites_text=f"sites done {done}/{len(status.sites)}" if status.sites else "",
        )

    def event(self, event: Event) -> None:
        if event.type == "Warning":
            self.progress.console.print(f"[yellow]warning[/] {event.reason}: {event.message}")

    def round_closed(self, record: RoundRecord, status: FederatedTrainingStatus) -> None:
        evaluation = record.evaluation
        per_site = ", ".join(f"{site} {m.accuracy:.3f}" for site, m in record.site_evaluation.items())
        head = "final model" if record.kind == "evaluate" else f"round {record.round}"
        scored = (
            f"accuracy {evaluation.accuracy:.3f} loss {evaluation.loss:.3f}"
            if evaluation
            else "no evaluation"
        )
        extra = f", {record.bytes_uploaded / 1024:.0f} KB uploaded" if record.kind == "train" else ""
        self.progress.console.print(f"{head}: {scored} ({per_site}){extra}, {record.duration_seconds:.0f} s")

    def _cross_site(self, record: RoundRecord) -> None:
        """evaluation.crossSite: the matrix as cross-site.json and a heatmap in the run directory."""
        document = cross_site_document(record)
        if document is None:
            return
        (self.run_dir / CROSS_SITE_FILE).write_text(json.dumps(document, indent=2) + "\n")
        plot_cross_site(document, self.run_dir / CROSS_SITE_PLOT)
        self.console.print(
            f"cross-site validation, {len(document['models'])} models x {len(document['sites'])} test "
            f"splits: {self.run_dir / CROSS_SITE_FILE}, {self.run_dir / CROSS_SITE_PLOT}"
        )

    def summary(self, status: FederatedTrainingStatus, seconds: float) -> None:
        records = load_history(self.run_dir)
        if records:
            local_only = self.spec.mode is TrainingMode.LOCAL_ONLY
            self.console.print(round_table(records, self.sites, local_only))
            self.console.print(upload_table(records, self.sites))
            tested = test_table(
                records[-1], self.spec.model.class_names(), self.spec.evaluation.uncertainty.method
            )
            if tested is not None:
                self.console.print(tested)
            self._cross_site(records[-1])
            plot_history(records, self.sites, self.run_dir / PLOT_FILE, local_only)
        self.console.print(f"{status.phase.value} in {seconds:.0f} s: {status.message}")
        self.console.print(f"run directory {self.run_dir}: status.json, history.jsonl, {PLOT_FILE}, logs/")
        if self.spec.mode is TrainingMode.LOCAL_ONLY:
            return  # no global model: the sites' own models are listed with the run's files
        if status.final_model_uri:
            self.console.print(f"final merged model: {self.run_dir / MERGED_FILE}")
        if status.best_merged_model_uri:
            metric = self.spec.evaluation.metric.value
            self.console.print(
                f"best merged model (round {status.best_round}, {metric} {status.best_metric:.4f} on "
                f"validation): {self.run_dir / BEST_MERGED_FILE}"
            )
        if status.swag_model_uri:
            self.console.print(
                f"SWAG model (weights at the SWAG mean, moments for `fedtrain predict` to sample): "
                f"{self.run_dir / SWAG_MODEL_FILE}"
            )
