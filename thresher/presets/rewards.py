"""Reward functions of the built-in presets (and examples of ``rule`` scorer functions).

Why addition for the demo: SmolLM2-135M-Instruct answers "What is 7 + 5? Answer with just the
number." correctly about half the time greedily and far less often when sampling, and it tends to
ramble past the answer. That leaves room to improve, a verifiable reward (no reward model to trust),
and enough correct samples among N = 8 for rejection sampling to have something to select. What the
demo measured (before and after its 15 steps, and how long it takes) is in the README, the one
place those figures are kept.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def addition_correct(responses: list[str], answer: list[int], finish_reasons: list[str]) -> list[float]:
    """1.0 when the response finished on its own and its last number is the sum, else 0.0.

    Requiring a finished response rewards stopping after the answer (a cut-off ramble scores 0);
    taking the *last* number accepts "7 + 5 = 12" as well as "12".
    """
    rewards = []
    for response, expected, reason in zip(responses, answer, finish_reasons, strict=True):
        numbers = NUMBER.findall(response)
        correct = reason != "length" and bool(numbers) and int(numbers[-1]) == int(expected)
        rewards.append(1.0 if correct else 0.0)
    return rewards


# The `arithmetic` preset's reward: the same rule (the last number is the answer, the response finished).
answer_correct = addition_correct


def digit_share(responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are digits: the ``tiny`` preset's graded reward.

    A random character-level model writes a digit about one time in ten; top-1 of N selects the
    responses with the most digits, and the model visibly learns to write numbers within a few
    steps — a fast end-to-end check that selection and training move the policy the right way.
    """
    return [sum(c.isdigit() for c in r) / len(r) if r else 0.0 for r in responses]
