"""``thresher report``: one figure per question a rejection-sampling run raises, several runs overlaid.

Each figure is drawn from a :class:`FigureData` — the exact numbers plotted — which is also written
as a CSV beside its PNG, so what a figure shows can be checked (or re-plotted) without trusting the
picture. A series a run does not record (no held-out scorer, no sampled validation) is left out of
that figure; a figure no run has data for is left out of the report. Colour tells runs apart, line
style tells series apart.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from thresher.core.errors import OutputError, ThresherError
from thresher.observe.runs import RunRecords, load_runs, number

MATPLOTLIB_MISSING = "thresher report needs matplotlib, which is not installed: pip install 'thresher[report]'"


@dataclass(frozen=True)
class FigureSpec:
    """A figure: which metrics (``kind`` records) it plots, each series as (metric key, legend label).

    ``pattern`` finds series whose names depend on the run (a combined scorer's parts): every metric
    key it matches is a series, labelled by the pattern's groups joined with spaces.
    """

    name: str
    title: str
    ylabel: str
    kind: str
    series: tuple[tuple[str, str], ...] = ()
    pattern: str | None = None

    def all_series(self, runs: list[RunRecords]) -> list[tuple[str, str]]:
        series = list(self.series)
        if self.pattern is not None:
            found = {key for run in runs for record in run.records(self.kind) for key in record}
            for key in sorted(found):
                if (match := re.fullmatch(self.pattern, key)) is not None:
                    series.append((key, " ".join(g for g in match.groups() if g)))
        return series


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("reward", "Reward: all rollouts vs kept", "mean reward", "train",
               (("reward_mean", "all"), ("reward_kept_mean", "kept"))),
    FigureSpec("accept_rate", "Accept rate (kept / rollouts)", "fraction kept", "train",
               (("accept_rate", "accept rate"),)),
    FigureSpec("prompts_without_kept", "Prompts with nothing kept", "fraction of prompts", "train",
               (("prompts_without_kept_fraction", "nothing kept"),)),
    FigureSpec("validation", "Validation reward", "mean reward", "validation",
               (("val_reward_greedy", "greedy"), ("val_reward_sampled", "sampled"),
                ("val_heldout_reward_greedy", "held-out scorer, greedy"),
                ("val_heldout_reward_sampled", "held-out scorer, sampled"))),
    FigureSpec("response_length", "Response length", "tokens", "train",
               (("response_len_mean", "all"), ("response_len_kept_mean", "kept"))),
    FigureSpec("distinct_2", "Diversity: distinct-2", "unique bigrams / bigrams", "train",
               (("distinct_2", "all"), ("kept_distinct_2", "kept"))),
    FigureSpec("reward_parts", "Reward parts (combined scorer)", "mean reward", "train",
               pattern=r"reward_part_(.+?)_(kept)?_?mean"),
    FigureSpec("cost", "Cost of the kept data: generated tokens per kept token", "tokens", "train",
               (("generated_tokens_per_kept_token", "generated per kept"),)),
    FigureSpec("prompt_pass_rate", "Prompts' mean reward (pass rate for 0/1 rewards): quartiles", "mean reward",
               "train", (("prompt_reward_mean_q75", "75th percentile"), ("prompt_reward_mean_q50", "median"),
                         ("prompt_reward_mean_q25", "25th percentile"))),
    FigureSpec("loss", "Training loss", "loss", "train", (("loss", "loss"),)),
    FigureSpec("entropy", "Policy entropy on the trained tokens (a fast fall: collapse)", "nats per token", "train",
               (("policy_entropy", "entropy"),)),
    FigureSpec("importance_ratio", "Importance ratio π_θ/π_old (raft_pp, reinforce_rej)", "ratio / fraction",
               "train", (("loss_ratio_max", "max"), ("loss_ratio_mean", "mean"), ("loss_ratio_min", "min"),
                         ("loss_clip_fraction", "clipped tokens"))),
    FigureSpec("time_per_phase", "Time per phase", "seconds per step", "train",
               (("time_generate", "generate"), ("time_score", "score"), ("time_train", "train"),
                ("time_refresh", "refresh"), ("time_step", "whole step"))),
    FigureSpec("tokens_per_s", "Throughput", "tokens / s", "train",
               (("tokens_per_s_generate", "generate"), ("tokens_per_s_train", "train"))),
)  # fmt: skip

LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v")


@dataclass
class RunSeries:
    """One run's share of a figure: its steps and, per present series, one value (or None) per step."""

    label: str
    steps: list[int]
    values: dict[str, list[float | None]]
    index: int = 0  # the run's place among all the report's runs: its colour in every figure


@dataclass
class FigureData:
    """The numbers a figure plots: ``columns`` are the series that at least one run recorded."""

    spec: FigureSpec
    columns: list[str]
    labels: dict[str, str]
    runs: list[RunSeries] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.columns


def figure_data(spec: FigureSpec, runs: list[RunRecords]) -> FigureData:
    """Per run, the steps where any of the figure's series has a value, and those series' values."""
    series = spec.all_series(runs)
    keys = [key for key, _ in series]
    parts = []
    for index, run in enumerate(runs):
        present = [k for k in keys if any(number(r.get(k)) is not None for r in run.records(spec.kind))]
        rows = [r for r in run.records(spec.kind) if any(number(r.get(k)) is not None for k in present)]
        values = {k: [number(r.get(k)) for r in rows] for k in present}
        parts.append(RunSeries(run.label, [int(r["step"]) for r in rows], values, index))
    columns = [k for k in keys if any(k in part.values for part in parts)]
    return FigureData(spec, columns, dict(series), [part for part in parts if part.steps])


def write_csv(data: FigureData, path: Path) -> None:
    """``run, step, <series...>``: one row per run and step; a value the run lacks is an empty cell."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "step", *data.columns])
        for part in data.runs:
            for i, step in enumerate(part.steps):
                cells = [part.values[c][i] if c in part.values else None for c in data.columns]
                writer.writerow([part.label, step, *("" if v is None else repr(v) for v in cells)])


def _matplotlib() -> Any:
    """matplotlib, or one line saying how to install it. Figures are drawn on the Agg canvas directly,
    never through pyplot: no display is needed, and a caller's own pyplot backend is left alone."""
    try:
        import matplotlib
    except ImportError:
        raise ThresherError(MATPLOTLIB_MISSING) from None
    return matplotlib


def series_labels(data: FigureData, part: RunSeries) -> dict[str, str]:
    """Legend labels of one run's series; a series identical to an earlier one of the same run says
    so (``kept (= all)``), since its line lies exactly on the other's."""
    labels: dict[str, str] = {}
    for column in data.columns:
        if column not in part.values:
            continue
        same = next((c for c in labels if part.values[c] == part.values[column]), None)
        label = data.labels[column]
        labels[column] = f"{label} (= {data.labels[same]})" if same is not None else label
    return labels


def render_png(data: FigureData, path: Path) -> None:
    """The figure as a PNG: a colour per run (the same in every figure of a report), a line style and
    marker per series, so series that overlap stay visible; validation points (measured at a few
    steps) drawn larger."""
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colours = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    size = 6 if data.spec.kind == "validation" else 4
    for part in data.runs:
        labels = series_labels(data, part)
        for s, column in enumerate(data.columns):
            if column not in part.values:
                continue
            values = [float("nan") if v is None else v for v in part.values[column]]
            # later series get smaller, hollow markers: one drawn over another leaves both visible
            ax.plot(part.steps, values, color=colours(part.index % 10), linestyle=LINESTYLES[s % len(LINESTYLES)],
                    marker=MARKERS[s % len(MARKERS)], markersize=max(2, size - s),
                    markerfacecolor="none" if s else None,
                    label=_literal(f"{part.label} · {labels[column]}"))  # fmt: skip
    ax.set_title(data.spec.title)
    ax.set_xlabel("step")
    ax.set_ylabel(data.spec.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the data
    fig.savefig(path, format="png", bbox_inches="tight")


def _literal(text: str) -> str:
    """``text`` for a matplotlib label, drawn as written: a run directory or a reward part named with two
    ``$`` would otherwise be parsed as mathtext, and fail the whole report on a symbol it does not know."""
    return text.replace("$", r"\$")


@dataclass
class Report:
    """What was written: the figures (by name) and the figures no run had data for."""

    figures: list[FigureData]
    missing: list[FigureSpec]
    html: Path | None = None
    folders: list[Path] = field(default_factory=list)


def write_figures(figures: list[FigureData], folder: Path) -> None:
    """``NAME.png`` and ``NAME.csv`` per figure into ``folder``; stale files of absent figures removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = {f.spec.name for f in figures}
        for spec in FIGURES:
            if spec.name not in written:
                for suffix in (".png", ".csv"):
                    (folder / f"{spec.name}{suffix}").unlink(missing_ok=True)
        for figure in figures:
            render_png(figure, folder / f"{figure.spec.name}.png")
            write_csv(figure, folder / f"{figure.spec.name}.csv")
    except OSError as err:
        raise OutputError(f"cannot write the report's figures into {folder} ({err.strerror or err})") from None


def check_destinations(out: Path | None, png_dir: Path | None) -> None:
    """Fail before reading anything if ``--out`` or ``--png`` cannot be what they must be."""
    if out is not None and out.is_dir():
        raise OutputError(f"--out {out}: is a directory; give a file name, e.g. {out / 'report.html'}")
    if png_dir is not None and png_dir.exists() and not png_dir.is_dir():
        raise OutputError(f"--png {png_dir}: is a file; give a directory for the PNG and CSV files")


def build_report(paths: list[Path], out: Path | None, png_dir: Path | None) -> Report:
    """Read the runs (finished or live), then write the HTML report and/or the bare figures."""
    check_destinations(out, png_dir)
    _matplotlib()  # a missing matplotlib fails here, before any file is written
    runs = load_runs(paths)
    data = [figure_data(spec, runs) for spec in FIGURES]
    report = Report([d for d in data if not d.empty], [d.spec for d in data if d.empty])
    if png_dir is not None:
        write_figures(report.figures, png_dir)
        report.folders.append(png_dir)
    if out is not None:
        folder = out.with_name(f"{out.stem}_files")
        write_figures(report.figures, folder)
        report.folders.append(folder)
        try:
            out.write_text(render_html(runs, report, folder.name), encoding="utf-8")
        except OSError as err:
            raise OutputError(f"--out {out}: cannot write ({err.strerror or err})") from None
        report.html = out
    return report


def run_status(run: RunRecords) -> str:
    if run.stop is not None:
        reason = run.stop.get("reason")
        return f"stopped at step {run.stop.get('step')}" + (f": {reason}" if reason else "")
    if run.finished:
        return "finished"
    return "in progress (or interrupted)"


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _latest(records: list[dict[str, Any]], key: str) -> str:
    for record in reversed(records):
        value = number(record.get(key))
        if value is not None:
            return f"{value:.4g} (step {record.get('step')})"
    return ""


def render_html(runs: list[RunRecords], report: Report, folder: str) -> str:
    """A self-contained page: the runs, their latest numbers, each figure with a link to its CSV."""
    e = html.escape
    head = ["run", "directory", "selector", "status", "train steps", "last written", "reward (all)", "reward (kept)",
            "accept rate", "val reward (greedy)"]  # fmt: skip
    rows = [
        [run.label, str(run.path.resolve()), run.selector, run_status(run), str(len(run.train)), _when(run.last_time),
         _latest(run.train, "reward_mean"), _latest(run.train, "reward_kept_mean"),
         _latest(run.train, "accept_rate"), _latest(run.validation, "val_reward_greedy")]
        for run in runs
    ]  # fmt: skip
    table = "\n".join(
        ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
        + ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        + ["</table>"]
    )
    figures = []
    for figure in report.figures:
        name = quote(f"{folder}/{figure.spec.name}")
        figures.append(
            f'<figure id="{e(figure.spec.name)}"><img src="{e(name)}.png" alt="{e(figure.spec.title)}">'
            f'<figcaption>{e(figure.spec.title)} — <a href="{e(name)}.csv">data (CSV)</a></figcaption></figure>'
        )
    missing = (
        f"<p>Not recorded by any run: {e(', '.join(s.title for s in report.missing))}.</p>" if report.missing else ""
    )
    body = "\n".join(figures) or "<p>No steps recorded yet.</p>"
    title = "Thresher report: " + ", ".join(run.label for run in runs)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
figure {{ display: inline-block; margin: 0 1em 1.5em 0; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<p>Written {e(_when(dt.datetime.now(dt.UTC).timestamp()))}; a live run shows the steps written so far.</p>
{table}
{body}
{missing}
</body>
</html>
"""
