"""What a person reads after (and during) a run: the per-round tables and the loss/accuracy/bytes plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from rich.table import Table

from fedtrain.api import GLOBAL_MODEL_KEY, RoundRecord, UncertaintyMethod
from fedtrain.evaluation import per_class_accuracy

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


#: What a round's scores describe: the global model, or in `mode: localOnly` each site's own model.
SCORED = {False: "each round's global model", True: "each site's own model (localOnly)"}


def round_table(records: Sequence[RoundRecord], sites: Sequence[str], local_only: bool = False) -> Table:
    """One row per round: the validation accuracy of the global model (or in localOnly of each site's
    own model) per site and weighted."""
    table = Table(title=f"validation accuracy of {SCORED[local_only]}", show_lines=False)
    table.add_column("round", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    for column in ("all", "macro-F1", "loss", "upload", "time"):
        table.add_column(column, justify="right")
    epsilon_column = any(record.epsilon is not None for record in records)
    if epsilon_column:  # privacy.dp: epsilon at delta spent by the rounds so far
        table.add_column("epsilon", justify="right")
    notes_column = any(record.stragglers or record.failed or record.rejected for record in records)
    if notes_column:
        table.add_column("notes")
    for record in records:
        label = "final" if record.kind == "evaluate" else str(record.round)
        per_site = [
            f"{record.site_evaluation[site].accuracy:.3f}" if site in record.site_evaluation else "-"
            for site in sites
        ]
        overall = record.evaluation
        notes = []
        if record.stragglers:
            notes.append(f"stragglers: {', '.join(record.stragglers)}")
        if record.failed:
            notes.append(f"failed: {', '.join(record.failed)}")
        if record.rejected:
            notes.append(f"rejected: {', '.join(r.site for r in record.rejected)}")
        table.add_row(
            label,
            *per_site,
            f"{overall.accuracy:.3f}" if overall else "-",
            f"{overall.macro_f1:.3f}" if overall else "-",
            f"{overall.loss:.3f}" if overall else "-",
            _bytes(record.bytes_uploaded) if record.kind == "train" else "-",
            f"{record.duration_seconds:.0f} s",
            *([_epsilon(record.epsilon)] if epsilon_column else []),
            *(["; ".join(notes)] if notes_column else []),
        )
    return table


#: How the test table names evaluation.uncertainty's methods.
UNCERTAINTY_LABELS: Final = {UncertaintyMethod.MC_DROPOUT: "MC dropout", UncertaintyMethod.SWAG: "SWAG"}


def test_table(record: RoundRecord, class_names: Sequence[str], method: UncertaintyMethod) -> Table | None:
    """The final model on the sites' held-out test splits (evaluation.testFraction): one row per site
    and the pooled figures (and those under the uncertainty `method`), then the pooled per-class
    accuracy; None without a test split."""
    pooled = record.test_evaluation
    if pooled is None:
        return None
    table = Table(title="final model on the held-out test splits", show_lines=False)
    columns = (
        "site",
        "samples",
        "accuracy",
        "macro-F1",
        "loss (NLL)",
        "ECE",
        "errors in top 10% uncertain",
        "AUROC",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "site" else "right")
    rows = [*record.site_test_evaluation.items(), ("all (pooled)", pooled)]
    if record.test_uncertainty is not None:  # evaluation.uncertainty: the method's pooled figures
        rows.append((f"all, {UNCERTAINTY_LABELS.get(method, method.value)}", record.test_uncertainty))
    for site, figures in rows:
        table.add_row(
            site,
            str(figures.samples),
            f"{figures.accuracy:.3f}",
            f"{figures.macro_f1:.3f}",
            f"{figures.loss:.3f}",
            *(_optional(value) for value in (figures.ece, figures.uncertain_error_rate, figures.error_auroc)),
        )
    if pooled.class_counts is not None:
        recall = per_class_accuracy(pooled.class_counts, list(class_names))
        table.caption = "per-class accuracy: " + ", ".join(
            f"{name} {value:.2f}" for name, value in recall.items() if value is not None
        )
    return table


def cross_site_document(record: RoundRecord) -> dict[str, Any] | None:
    """evaluation.crossSite: the N x (N + 1) matrix of the final evaluation as JSON: for each model
    (each site's last local model, then the final global model) each site's test figures."""
    if not record.cross_site:
        return None
    models = {**record.cross_site, GLOBAL_MODEL_KEY: record.site_test_evaluation}
    return {
        "round": record.round,
        "split": "test",
        "sites": sorted({site for column in models.values() for site in column}),
        "models": list(models),
        "matrix": {
            model: {
                site: figures.model_dump(mode="json", exclude_none=True) for site, figures in column.items()
            }
            for model, column in models.items()
        },
    }


def plot_cross_site(document: dict[str, Any], path: Path) -> None:
    """The cross-site matrix's accuracies as a heatmap PNG: a row per scoring site, a column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites, models = document["sites"], document["models"]
    cells = [
        [document["matrix"][model].get(site, {}).get("accuracy", float("nan")) for model in models]
        for site in sites
    ]
    figure, axis = plt.subplots(
        figsize=(1.2 * len(models) + 2, 0.6 * len(sites) + 1.5), constrained_layout=True
    )
    image = axis.imshow(cells, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(models)), [f"{model} model" for model in models], rotation=30, ha="right")
    axis.set_yticks(range(len(sites)), [f"{site} test" for site in sites])
    for row, values in enumerate(cells):
        for column, value in enumerate(values):
            axis.text(
                column, row, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k"
            )
    figure.colorbar(image, ax=axis, label="test accuracy")
    axis.set_title("cross-site validation: each model on each site's test split")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _optional(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _epsilon(epsilon: float | None) -> str:
    return f"{epsilon:.3g}" if epsilon is not None else "-"


def upload_table(records: Sequence[RoundRecord], sites: Sequence[str]) -> Table:
    """One row per training round: the bytes each site uploaded (its exchange policy and dtype's cost).

    "-" is a site that uploaded nothing that round (failed, straggled, or not selected).
    """
    table = Table(title="update bytes each site uploaded", show_lines=False)
    table.add_column("round", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("all", justify="right")
    for record in records:
        if record.kind != "train":
            continue
        per_site = [_bytes(record.site_bytes[site]) if site in record.site_bytes else "-" for site in sites]
        table.add_row(str(record.round), *per_site, _bytes(record.bytes_uploaded))
    return table


def _plot_uploads(axis: Axes, records: Sequence[RoundRecord], sites: Sequence[str]) -> None:
    for site in sites:
        points = [
            (r.round, r.site_bytes[site]) for r in records if r.kind == "train" and site in r.site_bytes
        ]
        axis.plot([x for x, _ in points], [b / 1024 for _, b in points], marker=".", alpha=0.6, label=site)
    axis.set_ylabel("update KB uploaded")
    peak = max((count for r in records for count in r.site_bytes.values()), default=0) / 1024
    axis.set_ylim(0, peak * 1.15 or 1)  # equal sizes would otherwise draw on the frame


def plot_history(
    records: Sequence[RoundRecord], sites: Sequence[str], path: Path, local_only: bool = False
) -> None:
    """Validation loss and accuracy of each round's global model, per site and weighted, and the
    bytes each site uploaded per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    rounds = [record.round for record in records]
    figure, (loss_axis, accuracy_axis, upload_axis) = plt.subplots(
        1, 3, figsize=(16, 4), constrained_layout=True
    )
    for site in sites:
        points = [(r.round, r.site_evaluation[site]) for r in records if site in r.site_evaluation]
        xs = [x for x, _ in points]
        loss_axis.plot(xs, [m.loss for _, m in points], marker=".", alpha=0.6, label=site)
        accuracy_axis.plot(xs, [m.accuracy for _, m in points], marker=".", alpha=0.6, label=site)
    weighted = [(r.round, r.evaluation) for r in records if r.evaluation is not None]
    loss_axis.plot(
        [x for x, _ in weighted], [m.loss for _, m in weighted], "k-o", linewidth=2, label="weighted"
    )
    accuracy_axis.plot(
        [x for x, _ in weighted], [m.accuracy for _, m in weighted], "k-o", linewidth=2, label="weighted"
    )
    _plot_uploads(upload_axis, records, sites)
    for axis, name in ((loss_axis, "validation loss"), (accuracy_axis, "validation accuracy")):
        axis.set_ylabel(name)
    for axis in (loss_axis, accuracy_axis, upload_axis):
        axis.set_xlabel("round (own model evaluated)" if local_only else "round (global model evaluated)")
        axis.set_xticks(rounds)
        axis.grid(alpha=0.3)
    accuracy_axis.set_ylim(0, 1)
    accuracy_axis.legend(loc="lower right", fontsize="small")
    figure.suptitle(f"fedtrain: {SCORED[local_only]} on each site's validation split")
    figure.savefig(path, dpi=110)
    plt.close(figure)
