"""The `triton` scorer against real Triton Inference Servers started by `thresher serve-rm` on
loopback ports; every server is stopped (and checked gone) even when a test fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thresher.core.errors import ScorerError
from thresher.core.types import Prompt, Rollout
from thresher.scorers.local import LocalRewardModelScorer
from thresher.scorers.rules import RuleScorer
from thresher.scorers.triton import TritonScorer

from .helpers import save_classifier
from .triton_servers import HERE, serving, start, tritonserver_pids

ADDITION = "thresher.presets.rewards:addition_correct"


def rollouts(n: int = 21) -> list[Rollout]:
    texts = [("12", "eos"), ("7 + 5 = 12", "eos"), ("13", "eos"), ("12", "length"), ("x12", "stop")]
    out = []
    for i in range(n):
        text, reason = texts[i % len(texts)]
        prompt = Prompt(i, f"What is 7 + {i % 3 + 4}? ", (5, 6, 7), {"answer": 7 + i % 3 + 4})
        out.append(Rollout(prompt, i, 0, [8, 9], text, reason))
    return out


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
def test_rule_over_triton_equals_the_in_process_rule(rule_server, protocol, concurrency):
    url = rule_server.grpc_url if protocol == "grpc" else rule_server.http_url
    scorer = TritonScorer(TritonScorer.Config(url=url, concurrency=concurrency))
    assert scorer.max_batch_size == 8  # read from the server's model config
    batch = rollouts()
    expected = RuleScorer(RuleScorer.Config(function=ADDITION)).score(batch)
    got = scorer.score(batch)
    assert got.tolist() == expected.tolist()
    assert sorted(set(got.tolist())) == [0.0, 1.0]
    scorer.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", ["sentences", "tokens"])
def test_reward_model_over_triton_equals_the_local_scorer(
    model_server, reward_model, tiny_tokenizer_module, protocol, mode
):
    from thresher.core.types import PluginContext

    url = model_server.grpc_url if protocol == "grpc" else model_server.http_url
    context = PluginContext(tokenizer=tiny_tokenizer_module)
    scorer = TritonScorer(TritonScorer.Config(url=url, input=mode), context)
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
    from .triton_servers import free_port

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


def test_a_rule_missing_its_arguments_answers_in_one_line(rule_server):
    scorer = TritonScorer(TritonScorer.Config(url=rule_server.http_url))
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


def test_auth_token_is_sent_from_the_environment(rule_server, monkeypatch):
    with pytest.raises(Exception, match=r"scorer.auth_token_env: environment variable 'RM_TOKEN' is not set"):
        TritonScorer(TritonScorer.Config(url=rule_server.grpc_url, auth_token_env="RM_TOKEN"))
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    scorer = TritonScorer(TritonScorer.Config(url=rule_server.grpc_url, auth_token_env="RM_TOKEN"))
    assert scorer.headers == {"authorization": "Bearer s3cret"}
    assert len(scorer.score(rollouts(3))) == 3  # an unauthenticated server ignores the header
    http = TritonScorer(TritonScorer.Config(url=rule_server.http_url, auth_token_env="RM_TOKEN"))
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
def test_ctrl_c_while_scoring_a_slow_server_stops_within_two_seconds(tmp_path, tiny_config, write_config, protocol):
    """The server takes 30 s per request from step 2 on; the scorer would wait (timeout 5 s) and retry
    5 times. Ctrl-C must cut the wait: exit 130 within 2 s, step 1 checkpointed, resumable."""
    marker = tmp_path / "scoring-step-2"
    rule = write_rule(
        tmp_path, f"    if CALLS[0] >= 2:\n        open({str(marker)!r}, 'w').close()\n        time.sleep(30)"
    )
    tiny_config["data"]["validation"] = None
    tiny_config["rs"]["max_steps"] = 3
    with serving(["--rule", rule]) as server:
        url = server.grpc_url if protocol == "grpc" else server.http_url
        tiny_config["scorer"] = {"type": "triton", "url": url, "timeout_s": 5, "max_retries": 5, "backoff_s": 1}
        config = write_config(tiny_config)
        train = subprocess.Popen(
            [sys.executable, "-m", "thresher", "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while not marker.exists():
            assert time.time() < deadline and train.poll() is None, train.stderr.read() if train.poll() else ""
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the first request's wait
        signalled = time.time()
        train.send_signal(subprocess.signal.SIGINT)
        _, stderr = train.communicate(timeout=120)
        stopped_after = time.time() - signalled
    assert train.returncode == 130, stderr
    assert stopped_after < 2.0, stopped_after
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
