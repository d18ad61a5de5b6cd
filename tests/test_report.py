"""The run report: each site's upload per round in the table and the plot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from fedtrain.api import EvalMetrics, RoundRecord
from fedtrain.operator.report import plot_history, round_table, upload_table

START = datetime(2026, 11, 26, tzinfo=UTC)
SCORE = EvalMetrics(loss=1.0, accuracy=0.5, macro_f1=0.4, samples=10)


def record(round_index: int, site_bytes: dict[str, int], kind: str = "train") -> RoundRecord:
    return RoundRecord(
        round=round_index,
        kind=kind,  # type: ignore[arg-type]
        started_at=START,
        closed_at=START + timedelta(seconds=5),
        participants=list(site_bytes),
        evaluation=SCORE,
        site_evaluation={"a": SCORE, "b": SCORE},
        bytes_uploaded=sum(site_bytes.values()),
        site_bytes=site_bytes,
    )


RECORDS = [
    record(0, {"a": 2048, "b": 512}),
    record(1, {"a": 3 * 1024 * 1024}),  # b failed: uploaded nothing
    record(2, {}, kind="evaluate"),
]


def rendered(table: object) -> list[list[str]]:
    console = Console(width=200, record=True)
    console.print(table)
    lines = console.export_text().splitlines()
    rows = [line.replace("┃", "│") for line in lines]
    return [[cell.strip() for cell in row.split("│")[1:-1]] for row in rows if row.count("│") > 2]


def test_upload_table_shows_each_sites_bytes_per_training_round() -> None:
    rows = rendered(upload_table(RECORDS, ["a", "b"]))

    assert rows == [
        ["round", "a", "b", "all"],
        ["0", "2.0 KB", "512 B", "2.5 KB"],
        ["1", "3.0 MB", "-", "3.0 MB"],
    ]


def test_round_table_still_shows_the_total_upload() -> None:
    rows = rendered(round_table(RECORDS, ["a", "b"]))

    assert rows[0][-2:] == ["upload", "time"]
    assert [row[-2] for row in rows[1:]] == ["2.5 KB", "3.0 MB", "-"]


def test_plot_has_a_panel_of_bytes_per_site_and_round(tmp_path: Path) -> None:
    from PIL import Image

    plot_history(RECORDS, ["a", "b"], tmp_path / "plot.png")

    width, height = Image.open(tmp_path / "plot.png").size
    assert width > 2.5 * height  # loss, accuracy and uploads side by side


def test_a_local_only_table_says_it_scores_each_sites_own_model() -> None:
    assert round_table(RECORDS, ["a", "b"]).title == "validation accuracy of each round's global model"
    own = round_table(RECORDS, ["a", "b"], local_only=True).title
    assert own == "validation accuracy of each site's own model (localOnly)"
