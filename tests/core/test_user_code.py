"""What users hand Thresher that can end the process or cannot be read: reward functions, reward
modules and plugins that call ``sys.exit()`` or raise ``KeyboardInterrupt`` themselves, and model
directories whose weights file was cut short. Each is one line naming the function, module, plugin
or file, with the exit code of its kind, never an exit that looks like success; a real Ctrl-C still
interrupts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import thresher
from tests.helpers import cli_errors, install
from thresher.core.config.resolve import resolve_plugin_section
from thresher.core.errors import ConfigError, PluginError, ScorerError, guard_user_code
from thresher.core.interrupt import Interrupts
from thresher.core.registry import build_registry, get_plugin_manager
from thresher.core.types import Prompt, Rollout
from thresher.scorers.rules import RuleScorer

ROOT = Path(__file__).resolve().parents[2]


def exits_zero(responses):
    sys.exit(0)


def raises_keyboard_interrupt(responses):
    raise KeyboardInterrupt


def sends_sigint(responses):
    """A real Ctrl-C arriving while the reward runs: SIGINT to this process, then work that takes a
    while (the signal's Python handler runs at the next bytecode; 10 s is only a ceiling)."""
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return [1.0] * len(responses)


def one_rollout() -> list[Rollout]:
    return [Rollout(Prompt(0, "Q:", (5,), {}), 0, 0, [7], "a", "eos")]


def rule(function: str) -> RuleScorer:
    return RuleScorer(RuleScorer.Config(function=f"{__name__}:{function}"))


# --- reward functions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("exits_zero", r"^reward function '[\w.]+:exits_zero' called sys.exit\(0\)$"),
        (
            "raises_keyboard_interrupt",
            r"^reward function '[\w.]+:raises_keyboard_interrupt' raised KeyboardInterrupt \(no Ctrl-C was "
            r"received: the code raised it itself\)$",
        ),
    ],
)
def test_a_reward_that_tries_to_end_the_run_is_a_scorer_error(function, message):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(ScorerError, match=message):
        rule(function).score(one_rollout())
    assert signal.getsignal(signal.SIGINT) is handler  # the guard put the run's handler back


def test_a_keyboard_interrupt_raised_on_the_scoring_thread_is_a_scorer_error():
    """Overlapped scoring calls the reward on a worker thread, where no signal is ever delivered."""
    caught: list[BaseException] = []

    def score() -> None:
        try:
            rule("raises_keyboard_interrupt").score(one_rollout())
        except BaseException as err:
            caught.append(err)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert isinstance(caught[0], ScorerError) and "raised KeyboardInterrupt" in str(caught[0])


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, as an interactive ``pytest`` has it. Started as a
    background job (``pytest &``), a process inherits SIGINT ignored and Python keeps it ignored:
    these tests then measured how pytest was launched, not the code (both failed that way once)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_real_ctrl_c_during_a_reward_still_interrupts(python_sigint):
    with pytest.raises(KeyboardInterrupt):
        rule("sends_sigint").score(one_rollout())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_real_ctrl_c_during_a_reward_in_a_run_is_the_runs_stop_request(python_sigint):
    """In a run, Ctrl-C sets the run's flag (it stops after the phase); the reward finishes."""
    interrupts = Interrupts()
    with interrupts:
        assert rule("sends_sigint").score(one_rollout()).tolist() == [1.0]
        assert interrupts.requested and interrupts.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == interrupts._handle
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_guard_passes_through_ordinary_errors_and_results():
    with pytest.raises(ValueError, match="its own"), guard_user_code(lambda what: ScorerError(what)):
        raise ValueError("its own")
    with guard_user_code(lambda what: ScorerError(what)):
        value = 3
    assert value == 3


@pytest.fixture
def rewards_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("import_time_")]:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
        ("raise SystemExit('bye')\n", "called sys.exit('bye')"),
        (
            "raise KeyboardInterrupt\n",
            "raised KeyboardInterrupt (no Ctrl-C was received: the code raised it itself)",
        ),
        ("raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
        # a data file missing at import is the module's error, not "file not found" for the module itself
        (
            "open('/nowhere/table.csv')\n",
            "raised FileNotFoundError: [Errno 2] No such file or directory: '/nowhere/table.csv'",
        ),
    ],
)
def test_a_reward_module_that_fails_at_import_is_a_config_error(rewards_dir, body, message):
    (rewards_dir / "import_time_rewards.py").write_text(body + "def reward(responses):\n    return [1.0]\n")
    (rewards_dir / "by_path.py").write_text(body + "def reward(responses):\n    return [1.0]\n")
    for target, shown in [("import_time_rewards", "import_time_rewards"), (rewards_dir / "by_path.py", None)]:
        shown = shown or str(target)
        with pytest.raises(ConfigError) as caught:
            resolve_plugin_section("scorer", {"type": "rule", "function": f"{target}:reward"}, build_registry())
        got = f"{target}:reward"
        assert caught.value.problems == [f"scorer.function: importing module {shown!r} {message} (got {got!r})"]
        assert "import_time_rewards" not in sys.modules  # nothing half-imported is left behind


def run_cli(*args: str, site: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m thresher ARGS``: the real process, so its exit status is what a shell would see."""
    env = {k: v for k, v in os.environ.items() if k != "THRESHER_LOAD_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([*([str(site)] if site else []), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_sys_exit_in_a_reward_module_at_import_is_exit_2_not_success(tmp_path, tiny_config, write_config):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    tiny_config["scorer"]["function"] = f"{tmp_path / 'quits.py'}:reward"
    for command in (["config", "validate"], ["train", "-q"]):
        result = run_cli(*command, str(write_config(tiny_config)))
        assert result.returncode == 2, result.stderr
        assert f"error: scorer.function: importing module '{tmp_path / 'quits.py'}' called sys.exit(0)" in (
            result.stderr.replace("\n", "")
        )
        assert "Traceback" not in result.stderr
    assert not Path(tiny_config["output"]["dir"]).exists()


def test_a_keyboard_interrupt_from_a_reward_fails_the_step_with_its_rollouts_saved(
    tmp_path, tiny_config, write_config, cli
):
    """It used to read as the user's Ctrl-C: exit 130, "interrupted", the step's rollouts lost."""
    tiny_config["scorer"]["function"] = f"{__name__}:raises_keyboard_interrupt"
    tiny_config["data"]["validation"] = None
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 3, result.output
    assert (
        f"error: reward function '{__name__}:raises_keyboard_interrupt' raised KeyboardInterrupt (no Ctrl-C was "
        "received: the code raised it itself)"
    ) in result.output.replace("\n", "")
    rows = (Path(tiny_config["output"]["dir"]) / "rollouts" / "step_1.jsonl").read_text().splitlines()
    assert len(rows) == 16 and all(json.loads(r)["reward"] is None for r in rows)


# --- plugins ------------------------------------------------------------------------------------------


@pytest.fixture
def exiting_site(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "quitzero", "import sys\nsys.exit(0)\n")
    install(site, "quitthree", "import sys\nsys.exit(3)\n")
    install(site, "ctrlc", "raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("THRESHER_LOAD_PLUGINS", raising=False)
    yield site
    for name in ("thresher_quitzero", "thresher_quitthree", "thresher_ctrlc"):
        sys.modules.pop(name, None)


def test_a_plugin_that_exits_at_import_is_left_out_with_one_line_each(exiting_site):
    problems = build_registry(get_plugin_manager()).problems
    assert sorted(problems) == [
        "plugin 'ctrlc' (thresher_ctrlc, from thresher-ctrlc) was not loaded: its import raised KeyboardInterrupt "
        "(no Ctrl-C was received: the code raised it itself)",
        "plugin 'quitthree' (thresher_quitthree, from thresher-quitthree) was not loaded: its import called "
        "sys.exit(3)",
        "plugin 'quitzero' (thresher_quitzero, from thresher-quitzero) was not loaded: its import called sys.exit(0)",
    ]


def test_config_validate_survives_plugins_that_exit_at_import(exiting_site):
    """Before, `thresher config validate` ended with the plugin's status (0 or 3) and no output."""
    result = run_cli("config", "validate", "tiny", site=exiting_site)
    assert result.returncode == 0, result.stderr
    warnings = sorted(line for line in result.stderr.splitlines() if line.startswith("warning:"))
    assert len(warnings) == 3, result.stderr
    assert "plugin 'quitthree'" in warnings[1] and warnings[1].endswith("was not loaded: its import called sys.exit(3)")
    assert "tiny: valid" in result.stderr and "scorer:" in result.stdout


class ExitingHook:
    @thresher.hookimpl
    def register_scorers(self, register):
        sys.exit(0)


def test_a_plugin_hook_that_calls_sys_exit_is_a_plugin_error(plugin_manager, cli, tiny_config, write_config):
    plugin_manager.register(ExitingHook(), name="exiting-hook")
    with pytest.raises(PluginError, match=r"^plugin 'exiting-hook': its register_scorers hook called sys.exit\(0\)$"):
        build_registry(plugin_manager)
    result = cli("config", "validate", write_config(tiny_config))
    assert result.exit_code == 2
    assert "error: plugin 'exiting-hook': its register_scorers hook called sys.exit(0)" in result.output


# --- model directories ----------------------------------------------------------------------------------


@pytest.fixture
def truncated_model(tmp_path, tiny_tokenizer, tiny_model) -> Path:
    """A real HF model directory whose model.safetensors was cut to half its size (a copy cut short)."""
    path = tmp_path / "policy"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return path


def test_a_truncated_safetensors_file_is_one_line_naming_it(truncated_model):
    from thresher.core.model import load_policy

    message = (
        f"model.path: {truncated_model / 'model.safetensors'} is damaged or truncated (Error while deserializing "
        "header: incomplete metadata, file not fully covered); copy or download it again"
    )
    with pytest.raises(ConfigError) as caught:
        load_policy(str(truncated_model))
    assert caught.value.problems == [message]


def test_a_truncated_pytorch_bin_file_is_one_line_naming_it(tmp_path, tiny_tokenizer, tiny_model):
    import torch

    from thresher.core.model import load_policy

    path = tmp_path / "policy"
    tiny_tokenizer.save_pretrained(path)
    tiny_model.config.save_pretrained(path)
    torch.save(tiny_model.state_dict(), path / "pytorch_model.bin")
    weights = path / "pytorch_model.bin"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(ConfigError) as caught:
        load_policy(str(path))
    assert caught.value.problems == [
        f"model.path: {weights} is damaged or truncated (not a complete torch.save zip); copy or download it again"
    ]


def test_training_from_a_truncated_model_exits_2_with_one_line(truncated_model, tiny_config, write_config, cli):
    tiny_config["model"]["path"] = str(truncated_model)
    assert cli_errors(cli("train", write_config(tiny_config), "-q"), 2) == [
        f"error: model.path: {truncated_model / 'model.safetensors'} is damaged or truncated (Error while "
        "deserializing header: incomplete metadata, file not fully covered); copy or download it again"
    ]
