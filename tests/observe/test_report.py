"""``thresher report``: the figures' data (the CSVs) are the metrics, the PNGs are real pictures, the
HTML links only to files that exist, and live, torn, resumed or odd run directories still report."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from thresher.cli import build_app
from thresher.core.registry import get_plugin_manager
from thresher.observe.runs import run_labels

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import image  # noqa: E402

SMALL = ["--set", "rs.max_steps=3", "--set", "rs.prompts_per_step=4", "--set", "rs.num_rollouts_per_prompt=4",
         "--set", "rs.val_max_prompts=4", "-q"]  # fmt: skip
RANDOM = "selector={type: random, like: {type: topk, top_n_rollouts: 1}}"
HELDOUT = 'validation_scorer={type: rule, function: "thresher.presets.rewards:addition_correct"}'


def invoke(*args: object):
    return CliRunner().invoke(
        build_app(get_plugin_manager(load_entrypoints=False)), [str(a) for a in args], catch_exceptions=False
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real tiny runs: ``topk`` (no sampled validation) and the ``random`` baseline (held-out scorer)."""
    root = tmp_path_factory.mktemp("runs")
    topk, baseline = root / "topk", root / "random"
    done = invoke("train", "tiny", "--set", f"output.dir={topk}", "--set", "rs.val_sampled=false", *SMALL)
    assert done.exit_code == 0, done.output
    done = invoke("train", "tiny", "--set", f"output.dir={baseline}", "--set", RANDOM, "--set", HELDOUT, *SMALL)
    assert done.exit_code == 0, done.output
    return {"topk": topk, "random": baseline}


def metrics(run: Path) -> dict[tuple[str, int], dict]:
    """Independent reading of metrics.jsonl: (kind, step) -> record."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") in ("train", "validation"):
            out[(record["kind"], record["step"])] = record
    return out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def check_csv_equals_metrics(path: Path, by_label: dict[str, Path]) -> None:
    """Every cell is the metric of that run and step (empty = null or absent); every step with data is a row."""
    columns, rows = read_csv(path)
    assert columns[:2] == ["run", "step"] and len(columns) > 2, path.name
    series = columns[2:]
    kind = "validation" if all(c.startswith("val_") for c in series) else "train"
    expected_rows = set()
    for label, run in by_label.items():
        for (k, step), record in metrics(run).items():
            if k == kind and any(record.get(c) is not None for c in series):
                expected_rows.add((label, step))
    assert {(row["run"], int(row["step"])) for row in rows} == expected_rows, path.name
    assert len(rows) == len(expected_rows)  # no step twice
    for row in rows:
        record = metrics(by_label[row["run"]])[(kind, int(row["step"]))]
        for column in series:
            value = record.get(column)
            assert row[column] == ("" if value is None else repr(float(value))), (path.name, row, column)


def test_the_figures_data_are_the_metrics_of_every_run(runs, tmp_path):
    out = tmp_path / "report.html"
    result = invoke("report", runs["topk"], runs["random"], "--out", out)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "report_files"
    csvs = sorted(folder.glob("*.csv"))
    names = {p.stem for p in csvs}
    assert names == {"reward", "accept_rate", "prompts_without_kept", "validation", "response_length",
                     "distinct_2", "cost", "prompt_pass_rate", "loss", "entropy", "time_per_phase",
                     "tokens_per_s"}  # fmt: skip
    assert names == {p.stem for p in folder.glob("*.png")}
    for path in csvs:
        check_csv_equals_metrics(path, {"topk": runs["topk"], "random": runs["random"]})
    assert read_csv(folder / "reward.csv")[0] == ["run", "step", "reward_mean", "reward_kept_mean"]
    assert read_csv(folder / "distinct_2.csv")[0] == ["run", "step", "distinct_2", "kept_distinct_2"]
    assert read_csv(folder / "time_per_phase.csv")[0][2:5] == ["time_generate", "time_score", "time_train"]
    # validation: greedy for both; sampled and the held-out scorer only where the run recorded them
    columns, rows = read_csv(folder / "validation.csv")
    assert columns == ["run", "step", "val_reward_greedy", "val_reward_sampled", "val_heldout_reward_greedy",
                       "val_heldout_reward_sampled"]  # fmt: skip
    topk_rows = [r for r in rows if r["run"] == "topk"]
    assert [int(r["step"]) for r in topk_rows] == [0, 3]
    assert all(r["val_reward_sampled"] == r["val_heldout_reward_greedy"] == "" for r in topk_rows)
    assert all(r["val_heldout_reward_greedy"] != "" for r in rows if r["run"] == "random")
    html = out.read_text()
    assert "topk" in html and "random" in html  # the selector column tells baseline from method


def test_the_pngs_are_real_distinct_pictures(runs, tmp_path):
    result = invoke("report", runs["topk"], runs["random"], "--png", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("*.html"))  # --png alone writes no HTML
    pngs = sorted((tmp_path / "figs").glob("*.png"))
    assert len(pngs) == 12
    seen = set()
    for path in pngs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = image.imread(path)
        height, width = pixels.shape[:2]
        assert height >= 300 and width >= 500, path.name
        assert pixels[..., :3].std() > 0.02, f"{path.name} is (nearly) blank"
        colours = {tuple(p) for p in (pixels[..., :3].reshape(-1, 3) * 255).astype(int)[::7].tolist()}
        assert len(colours) > 20, f"{path.name}: too few colours for two runs' lines and text"
        seen.add(path.read_bytes())
    assert len(seen) == len(pngs)  # every figure is its own picture


def test_the_html_references_only_files_that_exist(runs, tmp_path):
    out = tmp_path / "out" / "my report.html"
    result = invoke("report", runs["topk"], runs["random"], "--out", out)
    assert result.exit_code == 0, result.output
    html = out.read_text()
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert references
    from urllib.parse import unquote

    for ref in references:
        assert "://" not in ref and not ref.startswith("/"), ref  # relative: the report moves with its folder
        assert (out.parent / unquote(ref)).is_file(), ref
    images = {unquote(r) for r in references if r.endswith(".png")}
    assert images == {f"my report_files/{p.name}" for p in (out.parent / "my report_files").glob("*.png")}
    assert len(images) == 12


def test_a_run_without_optional_series_leaves_them_out(runs, tmp_path):
    result = invoke("report", runs["topk"], "--out", tmp_path / "r.html", "--png", tmp_path / "pngs")
    assert result.exit_code == 0, result.output
    for folder in (tmp_path / "r_files", tmp_path / "pngs"):
        assert read_csv(folder / "validation.csv")[0] == ["run", "step", "val_reward_greedy"]
        assert not (folder / "reward_parts.csv").exists()
    assert "Not recorded by any run: Reward parts" in (tmp_path / "r.html").read_text()


def test_a_live_run_with_a_torn_line_a_repeated_step_and_reward_parts(runs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    lines = (runs["topk"] / "metrics.jsonl").read_text().splitlines()
    trains = [json.loads(line) for line in lines if '"kind": "train"' in line]
    repeated = {**trains[0], "reward_mean": 0.875, "reward_part_correct_mean": 0.5, "reward_part_correct_kept_mean": 1}
    text = "\n".join([lines[0], json.dumps(trains[0]), json.dumps(trains[1]), json.dumps(repeated)])
    (live / "metrics.jsonl").write_text(text + "\n" + json.dumps(trains[2])[:40])  # torn mid-write
    result = invoke("report", live, "--png", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    columns, rows = read_csv(tmp_path / "figs" / "reward.csv")
    assert [(r["step"], r["reward_mean"]) for r in rows] == [("1", "0.875"), ("2", repr(trains[1]["reward_mean"]))]
    columns, rows = read_csv(tmp_path / "figs" / "reward_parts.csv")
    assert columns == ["run", "step", "reward_part_correct_kept_mean", "reward_part_correct_mean"]
    assert rows == [{"run": "live", "step": "1", "reward_part_correct_kept_mean": "1.0",
                     "reward_part_correct_mean": "0.5"}]  # fmt: skip


def test_a_run_that_has_not_finished_a_step_yet(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.jsonl").write_text("")
    result = invoke("report", tmp_path / "new", "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "No steps recorded yet" in (tmp_path / "r.html").read_text()


def test_runs_with_the_same_name_are_told_apart(runs, tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "exp").mkdir(parents=True)
        shutil.copy(runs["topk"] / "metrics.jsonl", tmp_path / parent / "exp" / "metrics.jsonl")
    result = invoke("report", tmp_path / "a" / "exp", tmp_path / "b" / "exp", "--png", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    assert {r["run"] for r in read_csv(tmp_path / "figs" / "reward.csv")[1]} == {"a/exp", "b/exp"}
    assert run_labels([Path("x/run"), Path("y/run"), Path("z")]) == ["x/run", "y/run", "z"]
    assert run_labels([Path("x/run"), Path("x/run")]) == ["run", "run#2"]  # the same run twice
    assert run_labels([Path("/run"), Path("/x/run")]) == ["/run", "x/run"]


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line.removeprefix("error: ") for line in result.output.splitlines() if line.startswith("error: ")]


def test_a_path_that_is_not_a_run_is_one_error_line_naming_it(runs, tmp_path):
    missing = tmp_path / "nope"
    result = invoke("report", runs["topk"], missing)
    assert result.exit_code == 2 and error_lines(result) == [f"{missing}: no such directory"]
    result = invoke("report", tmp_path)
    assert result.exit_code == 2 and error_lines(result) == [f"{tmp_path}: not a run directory (no metrics.jsonl)"]
    result = invoke("report", runs["topk"].parent)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"{runs['topk'].parent}: not a run directory (no metrics.jsonl); run directories inside it: "
        f"{runs['random']}, {runs['topk']}"
    ]


def test_output_mistakes_and_a_missing_matplotlib(runs, tmp_path, monkeypatch):
    result = invoke("report", runs["topk"], "--out", tmp_path)
    assert result.exit_code == 4 and error_lines(result)[0].startswith(f"--out {tmp_path}: is a directory")
    (tmp_path / "file").write_text("x")
    result = invoke("report", runs["topk"], "--png", tmp_path / "file")
    assert result.exit_code == 4 and error_lines(result)[0].startswith(f"--png {tmp_path / 'file'}: is a file")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = invoke("report", runs["topk"], "--out", tmp_path / "r.html")
    assert result.exit_code == 1
    assert error_lines(result) == [
        "thresher report needs matplotlib, which is not installed: pip install 'thresher[report]'"
    ]
    assert not (tmp_path / "r.html").exists()


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, and the page's text as a browser would show it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_text_from_the_run_directory_is_shown_as_text_never_as_markup(tmp_path):
    """Directory names, the selector, the stop record, metric names, prompts and responses: all can hold
    markup (or mathtext, which matplotlib would parse) written by a model or by whoever edits a file."""
    script, img = "<script>alert(1)</script>", '"><img src=x onerror="alert(2)">'
    run = tmp_path / "<script>alert(1)<" / "script>x $\\foo{$ <img src=x onerror=alert(3)>"
    (run / "rollouts").mkdir(parents=True)
    part = f"reward_part_{script}{img}$\\bar$_mean"
    lines = [
        {"kind": "train", "step": 1, "time": 1.0, "reward_mean": 0.5, "reward_kept_mean": 1.0, part: 0.25},
        {"kind": "stop", "step": script, "reason": img + " onerror=alert(4) " + script, "time": 2.0},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "config.yaml").write_text(json.dumps({"selector": {"type": f"{script}{img}"}}))
    rollout = {"step": 1, "prompt_index": script, "group": img, "sample": 0, "prompt": f"{script}{img}",
               "response": f"{img}{script}", "finish_reason": script, "reward": 1.0, "kept": True,
               "rewards": {f"{script}{img}": 1.0}}  # fmt: skip
    (run / "rollouts" / "step_1.jsonl").write_text(json.dumps(rollout) + "\n")

    out = tmp_path / "report.html"
    result = invoke("report", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    page = out.read_text()
    parsed = Tags()
    parsed.feed(page)
    assert {tag for tag, _ in parsed.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "p", "table",
                                               "tr", "th", "td", "figure", "img", "figcaption", "a"}  # fmt: skip
    for tag, attrs in parsed.tags:
        assert not [name for name in attrs if name.startswith("on") or name not in ("lang", "charset", "id", "src",
                    "alt", "href")], (tag, attrs)  # fmt: skip
    assert "<script" not in page.lower() and "<img src=x" not in page
    text = "".join(parsed.text)
    label = run.name
    for shown in (label, str(run.resolve()), f"{script}{img}", f"stopped at step {script}: {img} onerror=alert(4)"):
        assert shown in text, shown  # the same characters, as text
    _, rows = read_csv(tmp_path / "report_files" / "reward_parts.csv")
    assert list(rows[0]) == ["run", "step", part] and rows[0]["run"] == label  # the CSV holds the exact names
    assert (tmp_path / "report_files" / "reward_parts.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_keeps_its_colour_in_every_figure_and_overlapping_series_say_so(runs, tmp_path):
    from thresher.observe.report import FIGURES, FigureData, RunSeries, figure_data, series_labels
    from thresher.observe.runs import load_runs

    silent = tmp_path / "no-validation"  # a run without validation records: absent from that figure only
    shutil.copytree(runs["topk"], silent)
    lines = (silent / "metrics.jsonl").read_text().splitlines()
    (silent / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if '"kind": "validation"' not in x))
    loaded = load_runs([silent, runs["random"]])
    by_name = {spec.name: figure_data(spec, loaded) for spec in FIGURES}
    assert [part.index for part in by_name["validation"].runs] == [1]  # the second run, as in the others
    assert [part.index for part in by_name["reward"].runs] == [0, 1]
    spec = next(s for s in FIGURES if s.name == "reward")
    same = RunSeries("a", [1, 2], {"reward_mean": [0.5, 0.6], "reward_kept_mean": [0.5, 0.6]})
    apart = RunSeries("b", [1, 2], {"reward_mean": [0.5, 0.6], "reward_kept_mean": [0.5, 0.7]})
    data = FigureData(spec, ["reward_mean", "reward_kept_mean"], {"reward_mean": "all", "reward_kept_mean": "kept"})
    assert series_labels(data, same) == {"reward_mean": "all", "reward_kept_mean": "kept (= all)"}
    assert series_labels(data, apart) == {"reward_mean": "all", "reward_kept_mean": "kept"}
