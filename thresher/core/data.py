"""Prompt datasets: render chat templates, tokenize once, and hand out batches.

A row is ``{"prompt": "..."}`` (the field name is configurable) or ``{"messages": [...]}`` (so is
that one) rendered with the tokenizer's chat template; every other field is kept as ``Prompt.extra``
and reaches the scorer (a reference answer, a test case). Rows come from :mod:`thresher.core.datasource`
(JSONL, CSV, Parquet, a ``datasets`` save); errors name the file, the line or row, and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from thresher.core.datasource import read_rows, resolve_data_path
from thresher.core.errors import DataError
from thresher.core.pool import PromptPool, visits_of
from thresher.core.types import Prompt

# The roles of the OpenAI chat format that chat templates render. A template given any other role
# either drops the message or renders it as if it were a known one, silently; a misspelt role
# ("assitant") or a foreign one is a mistake in the file, so it is an error naming it.
CHAT_ROLES = ("system", "user", "assistant", "tool")


def use_chat_template(mode: str, tokenizer: Any) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise DataError("data.chat_template: 'always' but the tokenizer has no chat template")
    return mode == "always" or (mode == "auto" and has_template)


def load_prompts(
    source: str,
    tokenizer: Any,
    *,
    field: str = "prompt",
    messages_field: str = "messages",
    chat_template: str = "auto",
    max_prompt_tokens: int | None = None,
    limit_name: str = "",
    on_long_prompt: str = "error",
) -> tuple[list[Prompt], int]:
    """Read, render and tokenize a prompt source. Returns ``(prompts, number_skipped_as_too_long)``."""
    templated = use_chat_template(chat_template, tokenizer)
    rows = read_rows(source, field=field, messages_field=messages_field)
    prompts: list[Prompt] = []
    skipped = 0
    for where, row in rows:
        _check_unicode(row, where)
        text, from_messages = _prompt_text(row, field, messages_field, where)
        given = [dict(m) for m in row[messages_field]] if from_messages else text
        if from_messages or templated:
            messages = row[messages_field] if from_messages else [{"role": "user", "content": text}]
            text = _render_chat(tokenizer, messages, where)
            token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            token_ids = tokenizer(text)["input_ids"]
        if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
            if on_long_prompt == "skip":
                skipped += 1
                continue
            limit = limit_name or f"data.max_prompt_tokens={max_prompt_tokens}"
            raise DataError(
                f"{where}: prompt is {len(token_ids)} tokens, over the limit of {max_prompt_tokens} ({limit}); "
                "set data.on_long_prompt: skip to drop such prompts"
            )
        extra = {k: v for k, v in row.items() if k not in (field, messages_field)}
        prompts.append(Prompt(index=len(prompts), text=text, token_ids=tuple(token_ids), extra=extra, given=given))
    if not prompts:
        raise DataError(f"{resolve_data_path(source)}: every prompt was skipped as too long")
    return prompts, skipped


def _prompt_text(row: dict[str, Any], field: str, messages_field: str, where: str) -> tuple[str, bool]:
    if field in row:
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {field!r} must be a non-empty string")
        return value, False
    if messages_field in row:
        messages = row[messages_field]
        if not (isinstance(messages, list) and messages and all(_is_message(m) for m in messages)):
            raise DataError(f"{where}: field {messages_field!r} must be a list of {{role, content}} objects")
        for index, message in enumerate(messages):
            if message["role"] not in CHAT_ROLES:
                raise DataError(
                    f"{where}: {messages_field}[{index}].role {message['role']!r} is not a chat role; "
                    f"accepted: {', '.join(CHAT_ROLES)}"
                )
            message["content"] = _message_text(message["content"], f"{where}: {messages_field}[{index}].content")
        return "", True
    raise DataError(f"{where}: missing field {field!r} (or a {messages_field!r} list)")


def _check_unicode(row: dict[str, Any], where: str) -> None:
    """JSON's ``"\\ud800"`` escape decodes to a lone surrogate, a string that is not Unicode text:
    the tokenizer rejects it with a TypeError, and a reward function or log writer would fail on it
    later. Found here, for every field, it is one line naming the row and the field."""
    for name, value in row.items():
        found = _surrogate(value, repr(name))
        if found is not None:
            path, position, char = found
            raise DataError(
                f"{where}: field {path} is not valid Unicode text: lone surrogate \\u{ord(char):04x} at "
                f"character {position} (an unpaired \\uD800-\\uDFFF escape in the file)"
            )


def _surrogate(value: Any, path: str) -> tuple[str, int, str] | None:
    """``(path, position, character)`` of the first lone surrogate in a string, list or dict value."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return path, err.start, value[err.start]
        return None
    if isinstance(value, list):
        items: Any = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        items = ((f"{path}.{key}" if isinstance(key, str) else f"{path}[{key!r}]", item) for key, item in value.items())
    else:
        return None
    for inner, item in items:
        found = _surrogate(item, inner)
        if found is not None:
            return found
    return None


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message


def _message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of text parts joined in order."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for position, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                got = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(
                    f"{where}[{position}]: only text parts ({{type: text, text: ...}}) are supported, got {got!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{where}: must be a string or a list of text parts, got {type(content).__name__}")


def _render_chat(tokenizer: Any, messages: list[dict[str, Any]], where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' rows need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass
class PromptStream:
    """Hands out training prompts in seeded epochs; its position is two integers, so resuming exact.

    Epoch ``e`` visits the prompts in the permutation seeded by ``(seed, e)``; a batch that crosses
    an epoch boundary continues into the next epoch's order. With a prompt ``pool``
    (``rs.prompt_pool``) the stream passes over the prompts that rest, counting them in ``skipped``;
    when every prompt rests for good, it hands out what it found (possibly nothing) and is ``dry``.
    """

    prompts: list[Prompt]
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    pool: PromptPool | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # the last batch's passed-over prompts, by reason
    dry: bool = False

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def next_batch(self, size: int) -> list[Prompt]:
        if self.pool is not None:
            return self._next_from_pool(size, self.pool)
        batch: list[Prompt] = []
        order = self._order(self.epoch)
        while len(batch) < size:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            take = min(size - len(batch), len(order) - self.position)
            batch.extend(self.prompts[i] for i in order[self.position : self.position + take])
            self.position += take
        return batch

    def _next_from_pool(self, size: int, pool: PromptPool) -> list[Prompt]:
        """The next ``size`` prompts that do not rest. An epoch with none left to visit ends; when
        no resting prompt will ever come back, the batch is what was found and the stream is dry."""
        batch: list[Prompt] = []
        self.skipped = {"solved": 0, "hopeless": 0}
        order = self._order(self.epoch)
        found_this_epoch = self.position > 0  # the epoch began in an earlier batch: assume it found some
        while len(batch) < size:
            if self.position == len(order):
                if not found_this_epoch and pool.all_resting():
                    due = pool.next_revisit_epoch()
                    if due is None:
                        self.dry = True
                        break
                    self.epoch = max(self.epoch + 1, due)  # nothing to visit before then
                else:
                    self.epoch += 1
                self.position, found_this_epoch = 0, False
                order = self._order(self.epoch)
                continue
            index = order[self.position]
            self.position += 1
            why = pool.resting(index, self.epoch)
            if why is not None:
                self.skipped[why] += 1
                continue
            pool.visiting(index, self.epoch)
            batch.append(self.prompts[index])
            found_this_epoch = True
        return batch

    def record(self, prompts: list[Prompt], rewards: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor) -> None:
        """Book a step's outcome for each of its prompts in the pool (nothing without one)."""
        if self.pool is None:
            return
        for prompt, visit in zip(prompts, visits_of(rewards, valid, kept), strict=True):
            self.pool.record(prompt.index, visit)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position, "consumed": self.consumed}
        if self.pool is not None:
            state["pool"] = self.pool.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.pool is not None:
            if "pool" not in state:
                raise ValueError("the checkpoint has no prompt pool state (rs.prompt_pool was added after it)")
            self.pool.load_state_dict(state["pool"])

    def exhausted(self) -> bool:
        """Every prompt rests and none will come back: there is no next batch."""
        pool = self.pool
        return pool is not None and pool.all_resting() and pool.next_revisit_epoch() is None

    @property
    def consumed(self) -> int:
        return self.epoch * len(self.prompts) + self.position
