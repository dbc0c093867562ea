"""The ``rule`` scorer: rewards from a plain Python function (a verifier, a unit test, a regex).

The function is named ``module:function`` (or ``path/to/file.py:function``) and is called once per
batch with keyword arguments, taking whichever of these it declares (all of them if it has
``**kwargs``):

- ``prompts``: the prompt texts the model saw; ``responses``: the decoded responses;
- ``finish_reasons``: ``"eos" | "stop" | "length"`` per response (a cut-off answer is rarely right);
- every other field of the dataset rows, as a list (``answer``, ``tests``…; ``None`` where absent).

It returns one number per response. Example::

    def exact_answer(responses, answer):
        return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]

    scorer: {type: rule, function: my_rewards:exact_answer}

A function written for TRL's ``GRPOTrainer`` (``reward_funcs``) works as it is; it is recognised by
its ``completions`` parameter and then called as TRL calls it: ``prompts`` are the prompts as the
rows gave them (a text, or a list of chat messages), ``completions`` the responses (a text, or
``[{"role": "assistant", "content": ...}]`` after a chat prompt), ``completion_ids`` their token ids,
the dataset's other columns as keyword arguments, and a ``None`` reward means NaN
(``rs.on_nonfinite_reward`` decides what happens to it). A module named without a path is looked for
among installed modules, then beside the config file, then in the working directory. Arguments the
function requires are checked against these names and the data's columns before the model loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator

from thresher.core.config import Section, config_directory
from thresher.core.errors import ConfigError, ScorerError, guard_user_code
from thresher.core.types import PluginContext, Rollout


class RuleScorer:
    name: ClassVar[str] = "rule"

    class Config(Section):
        function: str = Field(..., description="Reward function as module:function or file.py:function.")
        batch_size: int = Field(256, ge=1, description="Responses per call of the function.")

        @field_validator("function")
        @classmethod
        def _has_colon(cls, value: str) -> str:
            module, _, attr = value.rpartition(":")
            if not module or not attr:
                raise ValueError("expected module:function, e.g. my_rewards:exact_answer")
            value = locate_module(value, config_directory())
            try:  # an import that fails is a config error, found when the config is checked
                load_callable(value, "")
            except ConfigError as err:
                raise ValueError(err.problems[0].removeprefix(": ")) from None
            return value

        def check_columns(self, columns: Collection[str], where: str, registry: Any = None) -> list[str]:
            """Problems with the data: arguments the function requires that no call would pass."""
            function = load_callable(self.function, f"{where}.function")
            available = [*THRESHER_ARGUMENTS, *sorted(columns)]
            missing = [name for name in required_parameters(function) if name not in available]
            if not missing:
                return []
            listed = ", ".join(repr(name) for name in missing)
            return [
                f"{where}.function: {self.function} requires {listed}, which no call passes; it may take "
                f"{', '.join(THRESHER_ARGUMENTS)} and the data's columns ({', '.join(sorted(columns)) or 'none'})"
            ]

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config
        self.function = load_callable(config.function, "scorer.function")
        self.label = f"reward function {config.function!r}"
        self.trl = written_for_trl(self.function)

    def score(self, rollouts: list[Rollout]) -> torch.Tensor:
        # Field names come from all rollouts, so every batch gets the same arguments.
        fields = sorted({key for r in rollouts for key in r.prompt.extra})
        rewards: list[float] = []
        for start in range(0, len(rollouts), self.config.batch_size):
            batch = rollouts[start : start + self.config.batch_size]
            rewards.extend(self._score_batch(batch, fields))
        return torch.tensor(rewards, dtype=torch.float32)

    def _score_batch(self, batch: list[Rollout], fields: list[str]) -> list[float]:
        kwargs = select_kwargs(self.function, rule_arguments(batch, fields, trl=self.trl))
        # sys.exit() or a KeyboardInterrupt of its own in a reward is a failing reward, not the end of
        # the run: a ScorerError, after which the step's rollouts are still written.
        with guard_user_code(lambda what: ScorerError(f"{self.label} {what}")):
            try:
                result = self.function(**kwargs)
            except Exception as err:  # the user's code: report it as theirs, in one line
                raise ScorerError(f"{self.label} raised {type(err).__name__}: {err}") from err
        if self.trl and isinstance(result, (list, tuple)):  # TRL's convention: None is "no reward" (NaN)
            result = [math.nan if value is None else value for value in result]
        return check_rewards(result, len(batch), self.label)

    def close(self) -> None:
        """Nothing to release."""


THRESHER_ARGUMENTS = ("prompts", "responses", "finish_reasons", "completions", "completion_ids")


def written_for_trl(function: Callable[..., Any]) -> bool:
    """TRL's reward functions take ``completions``; Thresher's own take ``responses``."""
    return "completions" in _parameters(function)


def _completion(rollout: Rollout) -> Any:
    """A response as TRL passes it: after a chat prompt, the assistant's message in a list."""
    chat = isinstance(rollout.prompt.given, list)
    return [{"role": "assistant", "content": rollout.text}] if chat else rollout.text


def required_parameters(function: Callable[..., Any]) -> list[str]:
    """The keyword-passable parameters ``function`` cannot be called without."""
    return [name for name, p in _parameters(function).items() if p.default is inspect.Parameter.empty]


def _parameters(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return {}
    return {name: p for name, p in parameters.items() if p.kind in kinds}


def rule_arguments(batch: list[Rollout], fields: list[str], trl: bool = False) -> dict[str, list[Any]]:
    """Everything a reward function may ask for, one list entry per rollout (``None`` where a row
    lacks one of the dataset ``fields``). ``trl``: ``prompts`` as TRL passes them (as the rows gave
    them, chats as message lists) rather than the text the model saw."""
    arguments: dict[str, list[Any]] = {
        "prompts": [r.prompt.given if trl and r.prompt.given is not None else r.prompt.text for r in batch],
        "responses": [r.text for r in batch],
        "finish_reasons": [r.finish_reason for r in batch],
        "completions": [_completion(r) for r in batch],
        "completion_ids": [list(r.response_ids) for r in batch],
    }
    for key in fields:
        arguments.setdefault(key, [r.prompt.extra.get(key) for r in batch])
    return arguments


def select_kwargs(function: Callable[..., Any], available: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``available`` that ``function`` declares (all of it for ``**kwargs``)."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return available
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in available.items() if k in names}


def check_rewards(result: Any, expected: int, label: str) -> list[float]:
    """One finite-or-not float per response, or a :class:`ScorerError` that says what is wrong."""
    if isinstance(result, torch.Tensor):
        result = result.detach().flatten().tolist()
    elif hasattr(result, "tolist"):  # numpy arrays
        result = result.tolist()
    if not isinstance(result, (list, tuple)):
        raise ScorerError(f"{label} returned {type(result).__name__}; expected a list of {expected} numbers")
    if len(result) != expected:
        raise ScorerError(f"{label} returned {len(result)} rewards for {expected} responses")
    rewards = []
    for position, value in enumerate(result):
        if not isinstance(value, numbers.Real):  # bools are Real: True/False are 1/0 rewards
            raise ScorerError(f"{label} returned a non-number at position {position}: {value!r}")
        try:
            rewards.append(float(value))
        except OverflowError:  # an int beyond float's range: infinite, handled like any non-finite reward
            rewards.append(math.inf if value > 0 else -math.inf)  # type: ignore[operator]  # an int here
    return rewards


def locate_module(spec: str, config_dir: Path | None) -> str:
    """``module:fn`` as given when the module imports; else, when ``module.py`` (dots as folders)
    is beside the config file or in the working directory, that file's absolute ``path.py:fn`` (so
    the run finds it again, from any directory). Anything else is left for the import to report."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or importlib.util.find_spec(target.split(".")[0]) is not None:
        return spec
    relative = Path(*target.split(".")).with_suffix(".py")
    for folder in (config_dir, Path.cwd()):
        if folder is not None and (folder / relative).is_file():
            return f"{(folder / relative).resolve()}:{attr}"
    return spec


def load_callable(spec: str, field: str) -> Callable[..., Any]:
    """Import ``module:attr`` or ``path/to/file.py:attr``; failures name the config field."""
    target, _, attr = spec.rpartition(":")
    # Importing runs the module's top level: sys.exit() there would end `thresher train` with status
    # 0 and nothing trained, and any other error would be a traceback. Both are config errors.
    if target.endswith(".py") and not Path(target).is_file():
        raise ConfigError([f"{field}: file {target!r} not found"])
    with guard_user_code(lambda what: ConfigError([f"{field}: importing module {target!r} {what}"])):
        try:
            module = _import_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
        except ImportError as err:
            raise ConfigError([f"{field}: cannot import module {target!r} ({err})"]) from None
        except Exception as err:  # the module's own code failed at import: report it as theirs
            raise ConfigError(
                [f"{field}: importing module {target!r} raised {type(err).__name__}: {_first_line(err)}"]
            ) from None
    function = getattr(module, attr, None)
    if function is None:
        raise ConfigError([f"{field}: module {target!r} has no attribute {attr!r}"])
    if not callable(function):
        raise ConfigError([f"{field}: {spec!r} is not callable"])
    return function


def _import_file(path: Path) -> Any:
    name = f"thresher_rule_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:  # a half-run module is not left behind for the next import to find
        sys.modules.pop(name, None)
        raise
    return module


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
