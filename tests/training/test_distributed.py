"""Data-parallel runs under torchrun: real processes, gloo, 2 ranks on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import MEASURED, read_jsonl

TOLERANCE = 1e-5  # measured max weight difference, 1 vs 2 ranks: 8e-7 (float summation order)


def config(tmp: Path, name: str, **rs) -> Path:
    data = {
        "model": {"path": "builtin:tiny", "device": "cpu"},
        "data": {"train": "builtin:addition_train", "validation": "builtin:addition_val", "chat_template": "never"},
        "rs": {
            "max_steps": 3,
            "prompts_per_step": 4,
            "num_rollouts_per_prompt": 4,
            "seed": 7,
            "val_max_prompts": 3,
            **rs,
        },
        # greedy generation: the same samples whichever rank generates a prompt
        "generator": {"type": "hf", "max_new_tokens": 8, "temperature": 0.0, "batch_size": 2},
        "scorer": {"type": "rule", "function": "thresher.presets.rewards:digit_share"},
        "selector": {"type": "global_top_fraction", "fraction": 0.5},  # needs the whole step's rewards
        "optim": {"lr": 0.01, "micro_batch_size": 2, "batch_size": 4, "epochs_per_step": 2},
        "output": {"dir": str(tmp / name)},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def thresher(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "thresher", *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs
    )


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    single = thresher("train", config(tmp, "one"), "-q")
    assert single.returncode == 0, single.stderr
    double = thresher("train", config(tmp, "two"), "--nproc", "2", "-q")
    assert double.returncode == 0, double.stderr
    return tmp / "one", tmp / "two", double


def test_two_ranks_make_the_same_update_as_one_process(one_and_two):
    one, two, _ = one_and_two
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=TOLERANCE, rtol=0)
    # and training really moved the weights (the comparison is not between two untouched models)
    from thresher.core.model import build_tiny_model, build_tiny_tokenizer

    base = build_tiny_model(build_tiny_tokenizer(), seed=7).state_dict()
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3
    assert_same_metrics(read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl"))


def assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    """Same records; numbers within float-summation noise (losses, grad norms), all else identical."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        keys = {k for k in b if not k.startswith(MEASURED)}
        assert keys == {k for k in a if not k.startswith(MEASURED)}
        for key in keys:
            if isinstance(b[key], float) and isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
            else:
                assert a[key] == b[key], key


def test_the_rollouts_file_holds_every_rollout_of_both_ranks_once(one_and_two):
    one, two, _ = one_and_two
    for step in (1, 2, 3):
        rows = read_jsonl(two / "rollouts" / f"step_{step}.jsonl")
        keys = [(r["group"], r["sample"]) for r in rows]
        assert sorted(keys) == [(g, s) for g in range(4) for s in range(4)] and len(set(keys)) == 16
        assert rows == read_jsonl(one / "rollouts" / f"step_{step}.jsonl")  # same prompts, same responses


def test_only_rank_zero_writes(one_and_two):
    _, two, result = one_and_two
    assert result.stdout.count("finished 3 steps") == 1
    assert len([m for m in read_jsonl(two / "metrics.jsonl") if m["kind"] == "train"]) == 3
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_2", "step_3"]


def test_a_rank_that_dies_fails_the_job_promptly_and_the_run_resumes(tmp_path):
    marker = tmp_path / "rank1-pid"
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import os, time\nfrom thresher.presets.rewards import digit_share\nCALLS = [0]\n"
        "def reward(responses):\n"
        "    CALLS[0] += 1\n"
        "    if os.environ.get('RANK') == '1' and CALLS[0] == 4 and not os.path.exists(os.environ['MARK'] + '.done'):\n"
        "        open(os.environ['MARK'], 'w').write(str(os.getpid()))\n"
        "        time.sleep(120)\n"
        "    return digit_share(responses)\n"
    )
    path = config(tmp_path, "run", max_steps=3)
    data = yaml.safe_load(path.read_text())
    data["scorer"]["function"] = f"{slow}:reward"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "MARK": str(marker)}
    job = subprocess.Popen(
        [sys.executable, "-m", "thresher", "train", str(path), "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while not marker.exists() or not marker.read_text():
        assert time.time() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    killed_at = time.time()
    os.kill(int(marker.read_text()), signal.SIGKILL)  # rank 1 dies while scoring step 2
    _, stderr = job.communicate(timeout=120)
    assert time.time() - killed_at < 60  # torchrun stops rank 0, which waits in a collective
    assert job.returncode != 0
    assert "error: the 2-process run failed (torchrun exit" in stderr
    assert "exitcode  : -9" in stderr or "Signal 9" in stderr  # torchrun names the dead rank
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_1" / "state.json").is_file()
    Path(str(marker) + ".done").write_text("")  # the resumed run's rank 1 must not stall again
    refused = thresher("train", path, "--resume", env=env)
    assert refused.returncode == 2
    assert "was made by 2 process(es); resume with the same number (now 1)" in refused.stderr
    resumed = thresher("train", path, "--resume", "--nproc", "2", "-q", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"] == [1, 2, 3]


def test_prompts_per_step_must_split_over_the_ranks(tmp_path):
    result = thresher("train", config(tmp_path, "odd", prompts_per_step=3), "--nproc", "2")
    assert result.returncode != 0
    assert "rs.prompts_per_step: 3 prompts cannot be split evenly over 2 ranks" in result.stderr


def fsdp_config(tmp: Path, name: str, strategy: str, max_steps: int = 3) -> Path:
    """Optimizer batches of 3 over 2 ranks with micro-batches of 1: the ranks run unequal numbers of
    passes (2 and 1), which FSDP's collectives only survive if the shorter rank pads."""
    path = config(tmp, name, max_steps=max_steps)
    data = yaml.safe_load(path.read_text())
    data["optim"].update(strategy=strategy, batch_size=3, micro_batch_size=1)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def one_and_fsdp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    single = thresher("train", fsdp_config(tmp, "one", "ddp"), "-q")
    assert single.returncode == 0, single.stderr
    sharded = thresher("train", fsdp_config(tmp, "fsdp", "fsdp"), "--nproc", "2", "-q")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    return tmp


def test_fsdp_makes_the_same_update_as_one_process(one_and_fsdp):
    one, fsdp = one_and_fsdp / "one", one_and_fsdp / "fsdp"
    a, b = load_file(one / "final" / "model.safetensors"), load_file(fsdp / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=TOLERANCE, rtol=0)  # measured: 1.4e-6
    assert_same_metrics(read_jsonl(fsdp / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl"))
    # the checkpoint holds FSDP's gathered optimizer state (keyed by parameter name), proof the run was sharded
    optimizer = torch.load(fsdp / "checkpoints" / "step_3" / "optimizer.pt", weights_only=True)
    assert all(isinstance(key, str) for key in optimizer["state"])
    plain = torch.load(one / "checkpoints" / "step_3" / "optimizer.pt", weights_only=True)
    assert all(isinstance(key, int) for key in plain["state"])


def test_an_fsdp_run_resumes_exactly(one_and_fsdp, tmp_path):
    path = fsdp_config(tmp_path, "resumed", "fsdp", max_steps=2)
    first = thresher("train", path, "--nproc", "2", "-q")
    assert first.returncode == 0, first.stderr[-3000:]
    data = yaml.safe_load(path.read_text())
    data["rs"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(data))
    resumed = thresher("train", path, "--resume", "--nproc", "2", "-q")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(one_and_fsdp / "fsdp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)


def test_fsdp_with_a_bf16_policy_trains_fp32_masters_like_one_process(tmp_path):
    """bf16 compute over fp32 sharded masters (FSDP's mixed precision) makes the update that one
    process makes with its fp32 masters; both write fp32 weights."""
    finals = {}
    for name, strategy, nproc in (("one", "ddp", 1), ("fsdp", "fsdp", 2)):
        path = fsdp_config(tmp_path, name, strategy)
        data = yaml.safe_load(path.read_text())
        data["model"]["dtype"] = "bfloat16"
        path.write_text(yaml.safe_dump(data))
        result = thresher("train", path, "-q", *(["--nproc", "2"] if nproc > 1 else []))
        assert result.returncode == 0, result.stderr[-3000:]
        finals[name] = load_file(tmp_path / name / "final" / "model.safetensors")
    for name, tensor in finals["one"].items():
        assert tensor.dtype == finals["fsdp"][name].dtype == torch.float32
        torch.testing.assert_close(finals["fsdp"][name], tensor, atol=TOLERANCE, rtol=0)  # measured: 2.4e-7


# --- gradient clipping: the same bits whether the gradients are whole or FSDP shards (issue #21) -----

CLIP_SHAPES = [(101, 64), (64,), (128, 64), (7, 3), (1, 5)]  # uneven shards, and rank 1 holding none


def clip_inputs(seed: int) -> list[torch.Tensor]:
    """Gradients whose magnitudes span decades, so an fp32 norm's last bit depends on the summation order."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=generator) * torch.randn(shape, generator=generator).mul(3).exp()
        for shape in CLIP_SHAPES
    ]


def whole_clip(grads: list[torch.Tensor], clip, threads: int) -> tuple[float, list[torch.Tensor]]:
    """``clip`` on plain (unsharded) tensors, as one process or a DDP rank runs it, with ``threads`` threads."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        norm = clip(params, 1.0)
    finally:
        torch.set_num_threads(before)
    return float(norm), [p.grad for p in params]


def clip_on_rank(rank: int, store: str, out: str, seeds: list[int], clip) -> None:
    """One of two gloo ranks: clip the seeds' gradients as FSDP's shards (DTensors, Shard(0)); rank 0
    saves the norms and the gathered clipped gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)  # as torchrun's ranks run
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        results = []
        for seed in seeds:
            params = []
            for grad in clip_inputs(seed):
                param = torch.nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, [Shard(0)]))
                param.grad = distribute_tensor(grad, mesh, [Shard(0)])
                params.append(param)
            norm = clip(params, 1.0)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            results.append((norm, [p.grad.full_tensor() for p in params]))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def sharded_clips(tmp_path: Path, seeds: list[int], clip) -> list[tuple[float, list[torch.Tensor]]]:
    import torch.multiprocessing as mp

    out = tmp_path / "sharded.pt"
    mp.spawn(clip_on_rank, args=(str(tmp_path / "store"), str(out), seeds, clip), nprocs=2)
    return torch.load(out, weights_only=True)


def test_clipping_gives_the_same_bits_for_fsdp_shards_and_whole_gradients(tmp_path):
    """The clip coefficient must not depend on how the sum of squares is split (FSDP's per-rank
    partial sums, one process's whole tensors, the thread count): with torch's fp32 clip_grad_norm_
    it differed in the last bit, the fp32 masters did after AdamW, and a bf16 policy, rounding them,
    made the FSDP run drift from the one-process run (test_fsdp_with_a_bf16_policy_...)."""
    from thresher.core.training.distributed import clip_grad_norm

    seeds = list(range(8))
    for seed, (norm, grads) in zip(seeds, sharded_clips(tmp_path, seeds, clip_grad_norm), strict=True):
        assert norm > 1.0  # clipping is active: the coefficient matters
        for threads in (1, 2):
            whole_norm, whole_grads = whole_clip(clip_inputs(seed), clip_grad_norm, threads)
            assert whole_norm == pytest.approx(norm, rel=1e-12)
            for got, expected in zip(grads, whole_grads, strict=True):
                assert torch.equal(got, expected), f"seed {seed}, {threads} thread(s)"


# --- the losses that read old log-probs, rewards and groups (issue 25): 2 ranks = 1 process ---------

POLICY_LOSSES = ("raft_pp", "reinforce_rej")


def policy_loss_updates(dist_rank: int | None, store: str | None, out: str) -> None:
    """One optimizer step of each loss under each strategy on a hand-made batch (old log-probs off the
    policy so ratios clip, rewards, two groups, one sequence without recorded log-probs); saves the
    weights and the step's records. ``dist_rank`` None: one process, no torch.distributed."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from tests.training.test_loss import make_batch
    from tests.training.test_policy_losses import with_extras
    from thresher.core.config import OptimConfig
    from thresher.core.model import build_tiny_model, build_tiny_tokenizer
    from thresher.core.registry import build_registry
    from thresher.core.training.distributed import Distributed
    from thresher.core.training.sharding import shard
    from thresher.core.training.trainer import Trainer

    torch.set_num_threads(1)
    world = Distributed()
    if dist_rank is not None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=dist_rank, world_size=2)
        world = Distributed(rank=dist_rank, world_size=2, backend="gloo")
    try:
        tokenizer, registry = build_tiny_tokenizer(), build_registry()
        batch = with_extras(build_tiny_model(tokenizer, seed=0), make_batch(tokenizer))
        batch[2] = type(batch[2])(batch[2].prompt_ids, batch[2].response_ids, None, *list(vars(batch[2]).values())[3:])
        # eps = 1: AdamW's step is then about the gradient itself, not its sign, so float noise in a
        # near-zero gradient (sums in another order on two ranks) is not blown up to a full step
        config = OptimConfig(lr=0.05, eps=1.0, micro_batch_size=1, batch_size=3, epochs_per_step=2)
        results = {}
        for strategy in ("ddp", "fsdp") if world.enabled else ("ddp",):
            for name in POLICY_LOSSES:
                model = build_tiny_model(tokenizer, seed=0)
                if strategy == "fsdp":
                    shard(model)
                loss_cls = registry.get("loss", name)
                trainer = Trainer(model, loss_cls(loss_cls.Config()), config, max_steps=1,
                                  pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), dist=world)  # fmt: skip
                record = trainer.train_step(1, batch)
                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                state = get_model_state_dict(model, options=options) if strategy == "fsdp" else model.state_dict()
                results[strategy, name] = ({k: v.detach().clone() for k, v in state.items()}, record)
        if world.is_main:
            torch.save(results, out)
    finally:
        if dist_rank is not None:
            dist.destroy_process_group()


def test_policy_losses_make_the_same_update_on_two_ranks_ddp_and_fsdp(tmp_path):
    import torch.multiprocessing as mp

    from thresher.core.model import build_tiny_model, build_tiny_tokenizer

    policy_loss_updates(None, None, str(tmp_path / "one.pt"))
    mp.spawn(policy_loss_updates, args=(str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2)
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    for (strategy, name), (state, record) in two.items():
        expected_state, expected = one["ddp", name]
        for key, tensor in expected_state.items():
            gap = float((state[key] - tensor).abs().max())
            assert gap <= TOLERANCE, f"{strategy} {name} {key}: {gap}"  # measured: 7e-9
        assert record["old_logprobs_recomputed"] == expected["old_logprobs_recomputed"] == 1
        for key in ("loss", "loss_ratio_mean", "loss_clip_fraction", "policy_entropy", "loss_positive_count"):
            assert record[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (strategy, name, key)
        assert expected["loss_clip_fraction"] > 0  # π_old is off the policy: some ratios are clipped
    base = build_tiny_model(build_tiny_tokenizer(), seed=0).state_dict()
    for name in POLICY_LOSSES:  # and the updates are real
        assert max(float((one["ddp", name][0][k] - base[k]).abs().max()) for k in base) > 1e-3
