"""Bad input ends in one documented line and exit code, never a traceback, and leaves nothing a
later run would trust (no checkpoint, no final model). Plus fuzzing of the two readers of user files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import save_classifier
from thresher.core.config import read_config_file, resolve_config
from thresher.core.data import load_prompts
from thresher.core.errors import ConfigError, DataError

PRESETS_TINY = Path(__file__).resolve().parents[2] / "thresher" / "presets" / "tiny.yaml"


def errors_of(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line.removeprefix("error: ") for line in result.output.splitlines() if line.startswith("error: ")]


def prompts_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    return str(path)


def reward_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bad_rewards.py"
    path.write_text(f"def reward(responses):\n    {body}\n")
    return f"{path}:reward"


def not_a_reward_model(tmp_path: Path) -> str:
    from thresher.core.model import build_tiny_tokenizer

    save_classifier(tmp_path / "classifier", build_tiny_tokenizer(), num_labels=2)
    return str(tmp_path / "classifier")


LONG_PROMPT = json.dumps({"prompt": "x" * 600}).encode()  # the tiny model's context is 512 tokens

CASES = {
    "malformed JSONL": (
        lambda c, t: c["data"].update(train=prompts_file(t, b'{"prompt": "a"}\n{"prompt": "b"\n')),
        2,
        "train.jsonl:2: malformed JSON",
    ),
    "missing prompt field": (
        lambda c, t: c["data"].update(train=prompts_file(t, b'{"question": "a"}\n')),
        2,
        "train.jsonl:1: missing field 'prompt' (or a 'messages' list)",
    ),
    "empty prompt file": (
        lambda c, t: c["data"].update(train=prompts_file(t, b"\n\n")),
        2,
        "train.jsonl: no prompts (the file is empty)",
    ),
    "non-UTF-8 bytes": (
        lambda c, t: c["data"].update(train=prompts_file(t, b'{"prompt": "\xff\xfe"}\n')),
        2,
        "train.jsonl: not valid UTF-8 (byte 12)",
    ),
    "prompt longer than the model's context": (
        lambda c, t: c["data"].update(train=prompts_file(t, b'{"prompt": "ok"}\n' + LONG_PROMPT + b"\n")),
        2,
        "train.jsonl:2: prompt is 600 tokens, over the limit of 496 (the model's context (512 tokens) minus "
        "generator.max_new_tokens=16); set data.on_long_prompt: skip to drop such prompts",
    ),
    "reward function raises": (
        lambda c, t: c["scorer"].update(function=reward_file(t, "raise ValueError('no reference answer')")),
        3,
        "raised ValueError: no reference answer",
    ),
    "reward function returns the wrong shape": (
        lambda c, t: c["scorer"].update(function=reward_file(t, "return [1.0]")),
        3,
        "returned 1 rewards for 2 responses",
    ),
    "reward function returns a non-number": (
        lambda c, t: c["scorer"].update(function=reward_file(t, "return ['high'] * len(responses)")),
        3,
        "returned a non-number at position 0: 'high'",
    ),
    "reward model directory that is not a reward model": (
        lambda c, t: c.update(scorer={"type": "local", "path": not_a_reward_model(t)}),
        2,
        "is not a reward model: it has 2 labels, expected 1",
    ),
    "message content that is not text": (
        lambda c, t: c["data"].update(train=prompts_file(t, b'{"messages": [{"role": "user", "content": 42}]}\n')),
        2,
        "train.jsonl:1: messages[0].content: must be a string or a list of text parts, got int",
    ),
    "message part that is not text": (
        lambda c, t: c["data"].update(
            train=prompts_file(t, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}\n')
        ),
        2,
        "train.jsonl:1: messages[0].content[0]: only text parts ({type: text, text: ...}) are supported, "
        "got 'image_url'",
    ),
    "reward too large for a float": (
        lambda c, t: c["scorer"].update(function=reward_file(t, "return [10**400] * len(responses)")),
        3,
        "scorer returned 2 non-finite reward(s) at step 1 (rollouts saved",
    ),
    "reward function calls sys.exit": (
        lambda c, t: c["scorer"].update(function=reward_file(t, "import sys; sys.exit(0)")),
        3,
        "called sys.exit(0)",
    ),
    "a billion rollouts per prompt": (
        lambda c, t: c["rs"].update(num_rollouts_per_prompt=1_000_000_000),
        2,
        "memory plan: this run needs about",
    ),
    "a billion prompts per step": (
        lambda c, t: c["rs"].update(prompts_per_step=1_000_000_000),
        2,
        "the biggest item is rollouts",
    ),
    "max_new_tokens beyond the model's context": (
        lambda c, t: c["generator"].update(max_new_tokens=1_000_000_000),
        2,
        "generator.max_new_tokens: 1000000000 leaves no room for a prompt in the model's context (512 tokens)",
    ),
    "reward module that cannot be imported": (
        lambda c, t: c["scorer"].update(function="no_such_module_anywhere:reward"),
        2,
        "scorer.function: cannot import module 'no_such_module_anywhere'",
    ),
    "an infinite learning rate": (
        lambda c, t: c["optim"].update(lr=float("inf")),
        2,
        "optim.lr: must be a finite number (got inf)",
    ),
    "a NaN reward bar": (
        lambda c, t: c["selector"].update(min_reward=float("nan")),
        2,
        "selector.min_reward: must be a finite number (got nan)",
    ),
    "a negative AdamW beta": (
        lambda c, t: c["optim"].update(betas=[-0.1, 0.999]),
        2,
        "optim.betas: each beta must be in [0, 1), got [-0.1, 0.999]",
    ),
    "an empty stop string": (
        lambda c, t: c["generator"].update(stop=[""]),
        2,
        "generator.stop: stop[0] is empty: an empty stop string matches at once and ends every response",
    ),
    "z-scores over one response per prompt": (
        lambda c, t: (c["rs"].update(num_rollouts_per_prompt=1), c["selector"].update(normalize="zscore")),
        2,
        "selector.normalize: 'zscore' compares the responses of each prompt, but rs.num_rollouts_per_prompt is 1",
    ),
    "a z-scored reward part over one response per prompt": (
        lambda c, t: (
            c["rs"].update(num_rollouts_per_prompt=1),
            c.update(
                scorer={
                    "type": "combine",
                    "parts": [{"name": "digits", "normalize": "zscore", "scorer": dict(c["scorer"])}],
                }
            ),
        ),
        2,
        "scorer.parts[0].normalize: 'zscore' compares the responses of each prompt",
    ),
    "output directory that cannot be written": (
        lambda c, t: (t.joinpath("a-file").write_text("x"), c["output"].update(dir=str(t / "a-file" / "run"))),
        4,
        "/a-file/run': not writable (",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_gives_its_line_and_exit_code(case, tiny_config, write_config, cli, tmp_path):
    edit, code, message = CASES[case]
    tiny_config["rs"].update(prompts_per_step=1, num_rollouts_per_prompt=2, val_max_prompts=1)
    tiny_config["data"]["validation"] = None
    edit(tiny_config, tmp_path)
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == code, result.output
    errors = errors_of(result)
    assert len(errors) == 1 and message in errors[0], errors
    run = Path(tiny_config["output"]["dir"])
    assert not list(run.glob("checkpoints/step_*")) and not (run / "final").exists()
    if code == 3:  # a failing reward: what was generated is kept
        assert len((run / "rollouts" / "step_1.jsonl").read_text().splitlines()) == 2
    if code == 2:  # a config or data mistake stops the run before its first step
        assert not (run / "metrics.jsonl").exists()


def test_long_prompts_can_be_skipped_and_are_counted(tiny_config, write_config, cli, tmp_path):
    tiny_config["data"].update(
        train=prompts_file(tmp_path, b'{"prompt": "ok"}\n' + LONG_PROMPT + b"\n"),
        on_long_prompt="skip",
        validation=None,
    )
    tiny_config["rs"]["max_steps"] = 1
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 0, result.output
    assert "skipped 1 training prompts longer than the limit" in result.output
    (m,) = [json.loads(x) for x in (Path(tiny_config["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert m["prompts_skipped_too_long"] == 1


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs: a real full-disk condition (needs root, as CI has; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_fails_before_generating(tiny_config, write_config, cli, full_disk):
    tiny_config["output"]["dir"] = str(full_disk / "run")
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 4
    (error,) = errors_of(result)
    assert "free, but a checkpoint and the final model of this policy need about" in error
    assert not list((full_disk / "run" / "rollouts").iterdir())  # nothing was generated


@pytest.mark.parametrize("room", [200_000, 560_000], ids=["weights do not fit", "optimizer state does not fit"])
def test_disk_filling_up_mid_run_is_a_clean_error(tiny_config, write_config, cli, full_disk, monkeypatch, room):
    # Let the start-up space check pass, then run out of space for real when the checkpoint is written:
    # in safetensors' write of the weights, or in torch.save of the optimizer state (which reports it
    # as "[enforce fail at inline_container.cc:…] unexpected pos …").
    import shutil

    from thresher.core.run import directory as rundir

    monkeypatch.setattr(rundir, "SPACE_MARGIN", 0.0)
    ballast = full_disk / "ballast"
    tiny_config["output"]["dir"] = str(full_disk / "run")
    tiny_config["data"]["validation"] = None
    path = write_config(tiny_config)
    free = shutil.disk_usage(full_disk).free
    ballast.write_bytes(b"\0" * (free - room))  # room for rollouts and metrics, not a whole checkpoint
    result = cli("train", path)
    assert result.exit_code == 4
    (error,) = errors_of(result)
    checkpoints = full_disk / "run" / "checkpoints"
    assert error == (
        f"checkpoint of step 1: cannot write to {checkpoints} (no space left on device); earlier checkpoints are intact"
    )
    assert not list((full_disk / "run" / "checkpoints").glob("step_*"))
    assert not list((full_disk / "run" / "checkpoints").glob(".tmp-*"))  # the partial write is removed


# --- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
line = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"prompt": json_values}).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"messages": json_values}).map(lambda v: json.dumps(v).encode()),
    st.text(min_size=1, max_size=30).map(lambda t: json.dumps({"prompt": t, "answer": 1}).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=6))
def test_fuzz_jsonl_reader_either_loads_or_raises_data_error(tmp_path, tiny_tokenizer, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        prompts, _ = load_prompts(str(path), tiny_tokenizer, chat_template="never")
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        return
    assert prompts and all(isinstance(p.text, str) and p.text.strip() for p in prompts)


sections = st.sampled_from(["model", "data", "rs", "generator", "scorer", "selector", "loss", "optim", "output", "x"])
keys = st.sampled_from(["type", "path", "train", "max_steps", "lr", "top_n_rollouts", "function", "k", "dir", "n"])
config_data = st.dictionaries(
    sections, st.one_of(json_values, st.dictionaries(keys, json_values, max_size=4)), max_size=9
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=config_data)
def test_fuzz_config_either_validates_or_raises_config_error(tmp_path, registry, data):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        resolve_config(read_config_file(path), registry)
    except ConfigError as err:
        assert err.problems and all(p and "\n" not in p for p in err.problems)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_fuzz_config_text_either_parses_or_raises_config_error(tmp_path, registry, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        resolve_config(read_config_file(path), registry)
    except ConfigError as err:
        assert err.problems


def test_generate_into_a_directory_is_refused_before_any_generation(tmp_path):
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "thresher", "generate", "tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 4
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --out {tmp_path}: is a directory; give a file name, e.g. {tmp_path / 'best_of_n.jsonl'}"
    ]
    assert "Traceback" not in result.stderr
    assert "loading model" not in result.stderr  # refused before the model loaded (off a terminal each phase prints)


def test_greedy_sampling_with_several_rollouts_warns(tiny_config, write_config, cli):
    tiny_config["generator"]["temperature"] = 0
    tiny_config["rs"].update(max_steps=1)
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 0, result.output
    assert "warning: generator.temperature=0 decodes greedily: the 4 responses of each prompt will be identical" in (
        " ".join(result.output.split())
    )


def test_a_config_path_that_is_a_directory_says_so(tmp_path, cli):
    result = cli("config", "validate", str(tmp_path))
    assert result.exit_code == 2
    assert errors_of(result) == [
        f"config file {str(tmp_path)!r}: is a directory, not a config file (nor a Thresher run directory)"
    ]


def test_duplicate_keys_in_a_config_file_are_an_error(tmp_path, cli):
    path = tmp_path / "dup.yaml"
    path.write_text((PRESETS_TINY).read_text() + "rs: {max_steps: 3}\n")
    result = cli("config", "validate", str(path))
    assert result.exit_code == 2
    (line,) = errors_of(result)
    assert line.startswith(f"config file {str(path)!r}: duplicate key 'rs' at line ")


def test_config_validate_imports_the_reward_function(tmp_path, cli):
    result = cli("config", "validate", "tiny", "--set", "scorer.function=no_such_module_anywhere:reward")
    assert result.exit_code == 2
    (line,) = errors_of(result)
    assert line.startswith("scorer.function: cannot import module 'no_such_module_anywhere'")
