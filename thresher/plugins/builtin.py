"""Thresher's own plugins, registered through the same hooks a third-party package uses.

``tryfirst`` makes built-ins register before third parties, so a plugin that reuses a built-in name
is the one reported as the duplicate.
"""

from __future__ import annotations

from typing import Any

from thresher.core.hookspecs import Register, hookimpl
from thresher.generators.hf import HFGenerator
from thresher.generators.vllm import VLLMGenerator
from thresher.loggers.jsonl import JsonlLogger
from thresher.loggers.mlflow import MlflowLogger
from thresher.loggers.tensorboard import TensorBoardLogger
from thresher.loggers.wandb import WandbLogger
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss
from thresher.losses.raft_pp import RaftPlusPlusLoss
from thresher.losses.reinforce_rej import ReinforceRejLoss
from thresher.scorers.combine import CombineScorer
from thresher.scorers.local import LocalRewardModelScorer
from thresher.scorers.rules import RuleScorer
from thresher.scorers.triton import TritonScorer
from thresher.selectors.band import BandSelector
from thresher.selectors.chain import ChainSelector
from thresher.selectors.global_top_fraction import GlobalTopFractionSelector
from thresher.selectors.random_baseline import RandomSelector
from thresher.selectors.threshold import ThresholdSelector
from thresher.selectors.topk import TopKSelector


@hookimpl(tryfirst=True)
def register_generators(register: Register) -> None:
    register(HFGenerator)
    register(VLLMGenerator)


@hookimpl(tryfirst=True)
def register_scorers(register: Register) -> None:
    register(RuleScorer)
    register(LocalRewardModelScorer)
    register(TritonScorer)
    register(CombineScorer)


@hookimpl(tryfirst=True)
def register_selectors(register: Register) -> None:
    register(TopKSelector)
    register(ThresholdSelector)
    register(GlobalTopFractionSelector)
    register(BandSelector)
    register(ChainSelector)
    register(RandomSelector)


@hookimpl(tryfirst=True)
def register_losses(register: Register) -> None:
    register(MaskedMeanLogprobLoss)
    register(RaftPlusPlusLoss)
    register(ReinforceRejLoss)


@hookimpl(tryfirst=True)
def register_loggers(register: Register) -> None:
    register(JsonlLogger)
    register(TensorBoardLogger)
    register(WandbLogger)
    register(MlflowLogger)


@hookimpl
def register_commands(app: Any) -> None:
    """The Triton plugin's ``thresher serve-rm``."""
    from thresher.scorers.serve_command import add_serve_rm

    add_serve_rm(app)
