"""Every code block in the README and docs/ runs, in the order it appears, in a fresh directory:

- ``bash``: run as a script (``.venv/bin`` first on the PATH);
- ``python``: the document's blocks run one after another in one namespace (like a doctest);
- ``yaml``: parsed; a run-config fragment is merged into the ``tiny`` preset and validated as a config;
- ``toml``: parsed;
- ``text``: a listing or an output, not code.

A comment just before a block may say ``<!-- docs-test: file NAME -->`` (write the block to NAME,
for later blocks to use) or ``<!-- docs-test: skip, REASON -->``: a block that cannot run in a test
(an install, a server that runs until stopped) must say where it is exercised instead, and that place
is checked to exist.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- docs-test: (?P<directive>[^>]*?) -->\n)?```(?P<lang>[^\n`]*)\n(?P<body>.*?)\n```", re.S)
SECTIONS = {"model", "data", "rs", "generator", "scorer", "selector", "loss", "optim", "output", "validation_scorer",
            "guardrails", "distributed"}  # fmt: skip
PLUGIN_SECTIONS = {"generator", "scorer", "selector", "loss", "validation_scorer"}


@dataclass
class Block:
    lang: str
    body: str
    directive: str
    line: int


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [
        Block(m["lang"].strip(), m["body"], (m["directive"] or "").strip(), text[: m.start()].count("\n") + 1)
        for m in FENCE.finditer(text)
    ]


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_and_image_points_to_a_file():
    for path in DOCS:
        text = FENCE.sub("", path.read_text())  # links in code blocks are code, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (path.parent / target.split("#")[0]).resolve()
            assert file.exists(), f"{path.name}: {target} does not exist"


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_to_a_section_names_a_heading_that_exists():
    for path in DOCS:
        text = FENCE.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or "#" not in target:
                continue
            name, anchor = target.split("#", 1)
            file = (path.parent / name).resolve() if name else path
            headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", file.read_text()), re.MULTILINE)
            assert anchor in {heading_anchor(h) for h in headings}, f"{path.name}: {target}: no such heading"


def test_every_block_has_a_language_this_test_knows():
    for path in DOCS:
        for block in blocks(path):
            assert block.lang in {"bash", "python", "yaml", "toml", "text"}, f"{path.name}:{block.line}: {block.lang!r}"


def test_skipped_blocks_say_where_they_are_exercised():
    ci = (ROOT / ".ci" / "run").read_text()
    for path in DOCS:
        for block in blocks(path):
            if not block.directive.startswith("skip"):
                continue
            reason = block.directive.removeprefix("skip,").strip()
            places = re.findall(r"tests/[\w/]+\.py", reason)
            assert places or reason.startswith("ci:"), f"{path.name}:{block.line}: say where it is exercised"
            for place in places:
                assert (ROOT / place).is_file(), f"{path.name}:{block.line}: {place} does not exist"
            if reason.startswith("ci:"):  # what CI runs on a fresh clone: these very commands
                for command in re.split(r"&&|\n", block.body):
                    command = command.strip().removeprefix(".venv/bin/")
                    if "thresher train" not in command:
                        assert command in ci, f"{path.name}:{block.line}: .ci/run does not run {command!r}"


def validate_config_fragment(data: dict, where: str) -> None:
    from thresher.core.config import read_config_file, resolve_config
    from thresher.core.registry import build_registry

    config = copy.deepcopy(read_config_file("tiny"))
    for section, value in data.items():
        if section in PLUGIN_SECTIONS or not isinstance(value, dict) or not isinstance(config.get(section), dict):
            config[section] = value
        else:
            config[section].update(value)
    resolve_config(config, build_registry())  # raises ConfigError naming the fragment's mistake


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_the_code_blocks_of_a_document_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # rule modules the document writes
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}  # fmt: skip
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for block in blocks(path):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.directive.startswith("skip") or block.lang == "text":
            continue
        if block.directive.startswith("file "):
            (tmp_path / block.directive.removeprefix("file ").strip()).write_text(block.body + "\n")
            continue
        if block.lang == "bash":
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block.body], cwd=tmp_path, env=env, capture_output=True,
                text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, (
                f"{where}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            )
            assert "Traceback" not in done.stderr, f"{where}:\n{done.stderr[-3000:]}"
        elif block.lang == "python":
            exec(compile(block.body, where, "exec"), namespace)
        elif block.lang == "yaml":
            data = yaml.safe_load(block.body)
            if isinstance(data, dict) and set(data) <= SECTIONS:
                validate_config_fragment(data, where)
        elif block.lang == "toml":
            tomllib.loads(block.body)
