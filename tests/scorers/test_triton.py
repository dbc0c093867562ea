"""The `triton` scorer against real Triton Inference Servers started by `thresher serve-rm` on
loopback ports; every server is stopped (and checked gone) even when a test fails."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import save_classifier
from thresher.core.errors import ScorerError
from thresher.core.types import Prompt, Rollout
from thresher.scorers.local import LocalRewardModelScorer
from thresher.scorers.rules import RuleScorer
from thresher.scorers.triton import TritonScorer

from .triton_servers import (
    HERE,
    free_port,
    held_ports,
    interrupt_and_time,
    serving,
    silent_server,
    start,
    tritonserver_pids,
)

ADDITION = "thresher.presets.rewards:addition_correct"

# The Ctrl-C tests bound the time from SIGINT to the process's exit by STOP_BOUND_S, not by the
# product's 2-s target. The scorer notices a stop request within 0.2 s and cuts its request at once;
# the rest is the interpreter's own exit (torch, a checkpoint), which on a machine loaded several
# times over already took 2.1-2.5 s (issue #21): a 2-s wall-clock bound measured the machine, not
# the product. What these tests must rule out is a process that waits for its request to end, time
# out or be retried, and every such wait is at least REQUEST_TIMEOUT_S (the scorer's timeout_s; the
# servers hold their requests at least as long), three times the bound: a process that did not cut
# the wait cannot pass, a busy machine still can.
STOP_BOUND_S = 10.0
REQUEST_TIMEOUT_S = 30.0


def rollouts(n: int = 21) -> list[Rollout]:
    texts = [("12", "eos"), ("7 + 5 = 12", "eos"), ("13", "eos"), ("12", "length"), ("x12", "stop")]
    out = []
    for i in range(n):
        text, reason = texts[i % len(texts)]
        prompt = Prompt(i, f"What is 7 + {i % 3 + 4}? ", (5, 6, 7), {"answer": 7 + i % 3 + 4})
        out.append(Rollout(prompt, i, 0, [8, 9], text, reason))
    return out


@pytest.fixture
def triton_scorer():
    """Makes TritonScorers and closes them after the test, pass or fail. An HTTP scorer left open keeps
    a keep-alive connection that makes its server wait out Triton's 30-s exit timeout when the
    module's server stops (then PyTriton kills it, leaving tritonserver's /tmp/folder* behind)."""
    made: list[TritonScorer] = []

    def make(config: TritonScorer.Config, context=None) -> TritonScorer:
        made.append(TritonScorer(config, context))
        return made[-1]

    yield make
    for scorer in made:
        scorer.close()


@pytest.fixture(scope="module")
def rule_server():
    with serving(["--rule", ADDITION, "--max-batch-size", "8"]) as server:
        yield server


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_tokenizer_module):
    path = tmp_path_factory.mktemp("rm") / "rm"
    save_classifier(path, tiny_tokenizer_module, num_labels=1)
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer_module():
    from thresher.core.model import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model_server(reward_model):
    with serving(["--model", str(reward_model), "--max-batch-size", "4"]) as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_rule_over_triton_equals_the_in_process_rule(rule_server, protocol, concurrency, triton_scorer):
    url = rule_server.grpc_url if protocol == "grpc" else rule_server.http_url
    scorer = triton_scorer(TritonScorer.Config(url=url, concurrency=concurrency))
    assert scorer.max_batch_size == 8  # read from the server's model config
    batch = rollouts()
    expected = RuleScorer(RuleScorer.Config(function=ADDITION)).score(batch)
    got = scorer.score(batch)
    assert got.tolist() == expected.tolist()
    assert sorted(set(got.tolist())) == [0.0, 1.0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", ["sentences", "tokens"])
def test_reward_model_over_triton_equals_the_local_scorer(
    model_server, reward_model, tiny_tokenizer_module, protocol, mode, triton_scorer
):
    from thresher.core.types import PluginContext

    url = model_server.grpc_url if protocol == "grpc" else model_server.http_url
    context = PluginContext(tokenizer=tiny_tokenizer_module)
    scorer = triton_scorer(TritonScorer.Config(url=url, input=mode), context)
    batch = rollouts(10)
    for r in batch:  # the tokens path sends the policy's ids: make them those of the text
        r.prompt = Prompt(
            r.prompt.index, r.prompt.text, tuple(tiny_tokenizer_module(r.prompt.text)["input_ids"]), r.prompt.extra
        )
        r.response_ids = tiny_tokenizer_module(r.text)["input_ids"]
    expected = LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(reward_model))).score(batch)
    got = scorer.score(batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(set(got.tolist())) > 3


def test_a_train_step_through_triton(rule_server, tiny_config, write_config, cli):
    tiny_config["scorer"] = {"type": "triton", "url": rule_server.grpc_url}
    tiny_config["scorer"]["model_name"] = "reward_model"
    tiny_config["rs"]["max_steps"] = 1
    # the served rule is addition_correct: the tiny model's answers are wrong, yet every rollout is scored
    result = cli("train", write_config(tiny_config), "-q")
    assert result.exit_code == 0, result.output
    run = Path(tiny_config["output"]["dir"])
    rows = [json.loads(line) for line in (run / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["reward"] in (0.0, 1.0) for r in rows)
    (m,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert "time_score_busy" in m  # rs.overlap_scoring: auto overlaps a remote scorer


def test_server_not_running_names_the_url_and_how_to_start_one(tiny_config, write_config, cli):
    url = f"grpc://127.0.0.1:{free_port()}"
    tiny_config["scorer"] = {"type": "triton", "url": url}
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 3
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: scorer.url: no Triton server answers at {url} (")
    assert "thresher serve-rm" in error


def test_wrong_model_name(rule_server):
    with pytest.raises(ScorerError, match=r"scorer.model_name: model 'policy' is not ready on grpc://127.0.0.1:\d+"):
        TritonScorer(TritonScorer.Config(url=rule_server.grpc_url, model_name="policy"))


def test_contract_mismatch_names_what_differs():
    server = start([], script=HERE / "bad_contract_server.py")
    try:
        with pytest.raises(
            ScorerError, match=r"does not follow the reward contract: no output 'rewards' \(has: scores\)"
        ):
            TritonScorer(TritonScorer.Config(url=server.grpc_url))
    finally:
        server.kill()


def test_tokens_requested_from_a_text_only_server(rule_server):
    with pytest.raises(ScorerError, match="inputs 'tokens' and 'sequence_lengths' \\(INT64\\) are missing"):
        TritonScorer(TritonScorer.Config(url=rule_server.grpc_url, input="tokens"))


def test_a_rule_missing_its_arguments_answers_in_one_line(rule_server, triton_scorer):
    scorer = triton_scorer(TritonScorer.Config(url=rule_server.http_url))
    no_answer = [Rollout(Prompt(0, "p", (1,), {}), 0, 0, [5], "12", "eos")]
    with pytest.raises(
        ScorerError, match=r"failed: server raised RequestError: reward function .* needs 'answer', which the client"
    ):
        scorer.score(no_answer)


def test_a_nemo_style_client_sending_only_sentences_gets_one_line_not_a_traceback(rule_server):
    """NeMo-Aligner's client sends only `sentences`: the error text itself is the one line."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{rule_server.http_port}")
    sentences = httpclient.InferInput("sentences", [1, 1], "BYTES")
    sentences.set_data_from_numpy(np.array([[b"What is 7 + 5? 12"]], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("reward_model", [sentences])
    client.close()
    text = str(caught.value)
    # Thresher's own frames are gone; what remains is the one frame PyTriton's stub adds to any error
    assert text.count('File "') <= 1 and "triton_server.py" not in text and "rules.py" not in text
    assert (
        "RequestError: reward function 'thresher.presets.rewards:addition_correct' needs 'responses', 'answer', "
        "'finish_reasons', which the client did not send (it sent: sentences); send it in the 'extra' input"
    ) in text


@pytest.mark.parametrize("how", ["scorer", "config"])
def test_serve_rm_serves_any_registered_scorer(tmp_path, reward_model, tiny_config, write_config, how):
    """A reward model through the generic --scorer / --config path equals the in-process scorer."""
    section = {"type": "local", "path": str(reward_model)}
    if how == "scorer":
        args = ["--scorer", json.dumps(section)]
    else:
        tiny_config["scorer"] = section
        args = ["--config", str(write_config(tiny_config))]
    with serving(args) as server:
        scorer = TritonScorer(TritonScorer.Config(url=server.grpc_url))
        batch = rollouts(10)
        expected = LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(reward_model))).score(batch)
        torch.testing.assert_close(scorer.score(batch), expected, atol=1e-5, rtol=1e-5)
        scorer.close()


def test_auth_token_is_sent_from_the_environment(rule_server, monkeypatch, triton_scorer):
    with pytest.raises(Exception, match=r"scorer.auth_token_env: environment variable 'RM_TOKEN' is not set"):
        TritonScorer(TritonScorer.Config(url=rule_server.grpc_url, auth_token_env="RM_TOKEN"))
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    scorer = triton_scorer(TritonScorer.Config(url=rule_server.grpc_url, auth_token_env="RM_TOKEN"))
    assert scorer.headers == {"authorization": "Bearer s3cret"}
    assert len(scorer.score(rollouts(3))) == 3  # an unauthenticated server ignores the header
    http = triton_scorer(TritonScorer.Config(url=rule_server.http_url, auth_token_env="RM_TOKEN"))
    assert len(http.score(rollouts(3))) == 3


def write_rule(tmp_path: Path, body: str) -> str:
    path = tmp_path / "served_rewards.py"
    path.write_text(
        "import math, os, time\nfrom thresher.presets.rewards import digit_share\nCALLS = [0]\n"
        f"def reward(responses):\n    CALLS[0] += 1\n{body}\n    return digit_share(responses)\n"
    )
    return f"{path}:reward"


def test_server_returning_nan_stops_the_run_with_the_rollouts_saved(tmp_path, tiny_config, write_config, cli):
    rule = write_rule(tmp_path, "    return [math.nan] * len(responses)")
    with serving(["--rule", rule]) as server:
        tiny_config["scorer"] = {"type": "triton", "url": server.http_url}
        tiny_config["data"]["validation"] = None
        result = cli("train", write_config(tiny_config))
    assert result.exit_code == 3
    assert "error: scorer returned 16 non-finite reward(s) at step 1 (rollouts saved;" in result.output
    rows = (Path(tiny_config["output"]["dir"]) / "rollouts" / "step_1.jsonl").read_text().splitlines()
    assert len(rows) == 16


def test_server_killed_mid_step_fails_cleanly_and_the_run_resumes(tmp_path, tiny_config, write_config):
    marker = tmp_path / "scoring-step-2"
    rule = write_rule(
        tmp_path, f"    if CALLS[0] == 2:\n        open({str(marker)!r}, 'w').close()\n        time.sleep(30)"
    )
    tiny_config["scorer"] = {
        "type": "triton",
        "url": "grpc://127.0.0.1:1",
        "max_retries": 2,
        "backoff_s": 0.2,
        "timeout_s": 60,
    }
    tiny_config["data"]["validation"] = None
    tiny_config["rs"]["max_steps"] = 3
    server = start(["--rule", rule])
    try:
        tiny_config["scorer"]["url"] = server.grpc_url
        config = write_config(tiny_config)
        train = subprocess.Popen(
            [sys.executable, "-m", "thresher", "train", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not marker.exists():
            assert time.time() < deadline and train.poll() is None, train.stderr.read() if train.poll() else ""
            time.sleep(0.05)
        server.kill()  # mid-request: the client sees the connection drop, then connection refused
        _, stderr = train.communicate(timeout=120)
    finally:
        server.kill()
    assert train.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert "failed after 3 attempts" in stderr
    run = Path(tiny_config["output"]["dir"])
    rows = [json.loads(line) for line in (run / "rollouts" / "step_2.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["reward"] is None for r in rows)  # generated, kept, unscored
    assert (run / "checkpoints" / "step_1" / "state.json").is_file()
    with serving(["--rule", write_rule(tmp_path, "")], ports=(server.http_port, server.grpc_port)):
        resumed = subprocess.run(
            [sys.executable, "-m", "thresher", "train", str(config), "--resume", "-q"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert resumed.returncode == 0, resumed.stderr
    train_steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert train_steps == [1, 2, 3]
    assert all(
        r["reward"] is not None
        for r in (json.loads(x) for x in (run / "rollouts" / "step_2.jsonl").read_text().splitlines())
    )


def test_serve_rm_stops_cleanly_on_sigterm_and_leaves_no_process(tmp_path):
    server = start(["--rule", ADDITION])
    assert tritonserver_pids(server.grpc_port)
    assert server.stop() == 0
    assert not tritonserver_pids(server.grpc_port)
    assert "stopped" in server.process.stderr.read()


def test_serve_rm_needs_exactly_one_source(cli):
    result = cli("serve-rm")
    assert result.exit_code == 2
    assert (
        "error: serve-rm: give exactly one of --model DIR, --rule module:function, --scorer SECTION or --config FILE"
        in result.output
    )
    bad = cli("serve-rm", "--scorer", "{type: nope}")
    assert bad.exit_code == 2 and "error: --scorer.type: unknown scorer 'nope'; available:" in bad.output


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # v4, v4-in-v6, ::1


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) listening on ``port``, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_serve_rm_binds_loopback_by_default(rule_server):
    for port in (rule_server.grpc_port, rule_server.http_port):
        addresses = listening_addresses(port)
        assert addresses and addresses <= LOOPBACK, addresses  # never 0.0.0.0 / ::


def test_scorer_config_checks_the_url():
    with pytest.raises(Exception, match="expected grpc://HOST:PORT or http://HOST:PORT"):
        TritonScorer.Config(url="localhost:8001")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ctrl_c_while_scoring_a_slow_server_stops_the_wait_at_once(tmp_path, tiny_config, write_config, protocol):
    """The server holds every request from step 2 on for REQUEST_TIMEOUT_S; the scorer would wait that
    long (its timeout) and retry 5 times. Ctrl-C must cut the wait: exit 130 well inside one request's
    timeout (see STOP_BOUND_S), step 1 checkpointed, resumable."""
    marker, release = tmp_path / "scoring-step-2", tmp_path / "release"
    # The held request ends when the test releases it (after the Ctrl-C), so the server's shutdown does
    # not wait out the rest of REQUEST_TIMEOUT_S for it.
    hold = (
        f"    if CALLS[0] >= 2:\n        open({str(marker)!r}, 'w').close()\n        started = time.time()\n"
        f"        while time.time() - started < {REQUEST_TIMEOUT_S} and not os.path.exists({str(release)!r}):\n"
        "            time.sleep(0.05)"
    )
    rule = write_rule(tmp_path, hold)
    tiny_config["data"]["validation"] = None
    tiny_config["rs"]["max_steps"] = 3
    with serving(["--rule", rule]) as server:
        url = server.grpc_url if protocol == "grpc" else server.http_url
        scorer = {"type": "triton", "url": url, "timeout_s": REQUEST_TIMEOUT_S, "max_retries": 5, "backoff_s": 1}
        tiny_config["scorer"] = scorer
        config = write_config(tiny_config)
        train = subprocess.Popen(
            [sys.executable, "-m", "thresher", "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while not marker.exists():  # the server writes it once the step-2 request is in: the client waits
            assert time.time() < deadline and train.poll() is None, train.stderr.read() if train.poll() else ""
            time.sleep(0.05)
        stopped_after, stderr = interrupt_and_time(train)
        release.touch()
    assert train.returncode == 130, stderr
    assert stopped_after < STOP_BOUND_S, stopped_after
    assert "Traceback" not in stderr
    run = Path(tiny_config["output"]["dir"])
    assert (run / "checkpoints" / "step_1" / "state.json").is_file()
    assert "stopped after step 1" in stderr and "--resume" in stderr


def test_a_composite_with_a_triton_part_and_a_rule_part_trains_the_tiny_preset(
    rule_server, tiny_config, write_config, cli
):
    """The addition rule served over Triton (gRPC) and the digit-share rule in-process, as two parts."""
    digits = "thresher.presets.rewards:digit_share"
    served = {"type": "triton", "url": rule_server.grpc_url}
    tiny_config["scorer"] = {
        "type": "combine",
        "parts": [
            {"name": "remote", "weight": 0.5, "scorer": served},
            {"name": "local", "weight": 0.5, "scorer": {"type": "rule", "function": digits}},
        ],
    }
    tiny_config["rs"]["max_steps"] = 2
    result = cli("train", write_config(tiny_config), "-q")
    assert result.exit_code == 0, result.output
    run = Path(tiny_config["output"]["dir"])
    rows = [json.loads(x) for x in (run / "rollouts" / "step_2.jsonl").open()]
    assert rows and all(set(r["rewards"]) == {"remote", "local"} for r in rows)
    assert all(r["reward"] == pytest.approx(0.5 * r["rewards"]["remote"] + 0.5 * r["rewards"]["local"]) for r in rows)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    assert all("reward_corr_remote_local" in m for m in metrics if m["kind"] == "train")


def test_a_composite_is_served_as_one_triton_model(tmp_path):
    """`serve-rm --scorer '{type: combine, ...}'`: the whole reward stack behind one endpoint."""
    section = {
        "type": "combine",
        "mode": "sum",
        "parts": [
            {"name": "correct", "scorer": {"type": "rule", "function": ADDITION}},
            {
                "name": "digits",
                "weight": 0.25,
                "scorer": {"type": "rule", "function": "thresher.presets.rewards:digit_share"},
            },
        ],
    }
    with serving(["--scorer", json.dumps(section)]) as server:
        scorer = TritonScorer(TritonScorer.Config(url=server.http_url))
        batch = rollouts(10)
        got = scorer.score(batch)
        scorer.close()
    from thresher.core.build import instantiate
    from thresher.core.config import resolve_plugin_section
    from thresher.core.registry import build_registry
    from thresher.core.types import PluginContext

    registry = build_registry()
    local = instantiate(
        registry, "scorer", resolve_plugin_section("scorer", section, registry), PluginContext(registry=registry)
    )
    torch.testing.assert_close(got, local.score(batch).total)


# Starts a command the way a shell starts a job with `&`: SIGINT ignored (exec keeps it ignored).
AS_BACKGROUND_JOB = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.parametrize("started", ["foreground", "background"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ctrl_c_during_the_start_up_check_of_a_server_that_never_answers(tiny_config, write_config, protocol, started):
    """A server that accepts the connection and never answers: Ctrl-C during the scorer's start-up
    check stops `thresher train` at once, exit 130, one line. A process started in the background
    (SIGINT inherited as ignored; the run's own handler is not installed yet) ignored it for 17-58 s."""
    with silent_server() as server:
        url = f"{protocol}://127.0.0.1:{server.port}"
        tiny_config["scorer"] = {"type": "triton", "url": url, "timeout_s": REQUEST_TIMEOUT_S}
        config = write_config(tiny_config)
        command = [sys.executable, "-m", "thresher", "train", str(config)]
        if started == "background":
            command = [sys.executable, "-c", AS_BACKGROUND_JOB, *command]
        train = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # connected: the check's first request is out, and it will never be answered
            assert server.accepted.wait(timeout=180), "the scorer never connected"
            assert train.poll() is None
            stopped_after, stderr = interrupt_and_time(train)
        finally:
            if train.poll() is None:
                train.kill()
                train.wait()
    assert train.returncode == 130, stderr
    assert stopped_after < STOP_BOUND_S, stopped_after
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"


def test_the_start_up_check_of_a_server_that_never_answers_times_out_in_one_line(monkeypatch):
    """Without Ctrl-C, the check gives up after scorer.timeout_s, for gRPC too (it had no deadline)."""
    with silent_server() as server:
        url = f"grpc://127.0.0.1:{server.port}"
        started = time.monotonic()
        with pytest.raises(ScorerError, match=rf"^scorer.url: no Triton server answers at {url} \(.*\); start one"):
            TritonScorer(TritonScorer.Config(url=url, timeout_s=1.0))
        assert time.monotonic() - started < STOP_BOUND_S  # without a deadline gRPC gave up after 17.5 s
        assert server.accepted.is_set()


def port_flags(http_port: int, grpc_port: int) -> list[str]:
    return ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]


@pytest.mark.parametrize("taken", ["http", "grpc", "both"])
def test_serve_rm_on_ports_in_use_exits_2_naming_the_port(cli, taken, tmp_path, monkeypatch):
    """Ports held by another process: one line per port in use, exit 2, before anything starts
    (it used to wait up to 120 s for a server that had failed, then print two tracebacks)."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    free = free_port()
    with held_ports(2 if taken == "both" else 1) as held:
        http_port = held[0] if taken in ("http", "both") else free
        grpc_port = held[-1] if taken in ("grpc", "both") else free
        started = time.monotonic()
        result = cli("serve-rm", "--rule", ADDITION, *port_flags(http_port, grpc_port))
        elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    expected = []
    if taken in ("http", "both"):
        expected.append(f"error: --http-port {http_port}: the port is in use on 127.0.0.1 (another server?); "
                        "give a free port")  # fmt: skip
    if taken in ("grpc", "both"):
        expected.append(f"error: --grpc-port {grpc_port}: the port is in use on 127.0.0.1 (another server?); "
                        "give a free port")  # fmt: skip
    assert result.output.strip().splitlines() == expected
    assert elapsed < REQUEST_TIMEOUT_S  # refused up front: no server was started and waited for
    assert list(scratch.iterdir()) == []  # no thresher-triton-* folder left
    assert not tritonserver_pids(grpc_port)


def test_serve_rm_refuses_a_port_bound_without_listening(cli):
    """A socket only bound (not listening) holds the port too: Triton could not bind it either."""
    with held_ports(1, listen=False) as (port,):
        result = cli("serve-rm", "--rule", ADDITION, *port_flags(port, free_port()))
    assert result.exit_code == 2, result.output
    assert f"error: --http-port {port}: the port is in use on 127.0.0.1" in result.output


def test_serve_rm_one_port_for_both_protocols_is_refused(cli):
    port = free_port()
    result = cli("serve-rm", "--rule", ADDITION, *port_flags(port, port))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: --http-port and --grpc-port are both {port}; give two different ports"


class AnotherTriton(http.server.BaseHTTPRequestHandler):
    """Another PyTriton server's HTTP port, as a client sees it: live and ready, every other API
    restricted (403) to its own access token."""

    def _refuse(self) -> None:
        if self.path.startswith("/v2/health/"):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"error":"This API is restricted, expecting header \'triton-access-token\'"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args: object) -> None:
        pass


def test_serve_rm_losing_its_port_after_the_check_exits_in_one_line_and_cleans_up(tmp_path):
    """The HTTP port is taken after the check (a race no check can close) by another PyTriton server:
    tritonserver fails, and PyTriton's requests reach the other server, which answers 403. The same
    one line as the check's, exit 2, no traceback, nothing left in the temp directory, no tritonserver."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnotherTriton)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    http_port, grpc_port = other.server_address[1], free_port()
    # the port check passes the first time (before the start), as if the port were taken just after it
    skip_the_check = (
        "import sys, thresher.scorers.triton_server as s\n"
        "check, calls = s.check_ports_free, []\n"
        "s.check_ports_free = lambda *a: check(*a) if calls.append(a) or len(calls) > 1 else None\n"
        "sys.argv[0] = 'thresher'\nfrom thresher.cli import main\nmain()"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", skip_the_check, "serve-rm", "--rule", ADDITION, *port_flags(http_port, grpc_port)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)},
        )  # fmt: skip
    finally:
        other.shutdown()
        other.server_close()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --http-port {http_port}: the port is in use on 127.0.0.1 (another server?); give a free port"
    ]
    assert list(scratch.iterdir()) == []
    assert not tritonserver_pids(grpc_port)


def test_ctrl_c_while_serve_rm_starts_stops_it_and_cleans_up(tmp_path):
    """Ctrl-C before the server is ready stops the start-up (it used to be ignored until the server was
    up, or for 39 s after a failed start): exit 130, no tritonserver left, no temp folder left."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    http_port, grpc_port = free_port(), free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "thresher", "serve-rm", "--rule", ADDITION, *port_flags(http_port, grpc_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)},
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not any(scratch.glob("thresher-triton-*/workspace")):  # start-up under way, nothing ready yet
            assert time.time() < deadline and serve.poll() is None, serve.stderr.read() if serve.poll() else ""
            time.sleep(0.02)
        stopped_after, stderr = interrupt_and_time(serve)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert serve.returncode == 130, stderr
    assert stopped_after < REQUEST_TIMEOUT_S, stopped_after
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert not tritonserver_pids(grpc_port)
    assert list(scratch.iterdir()) == []
