"""Prompt files: rendering, tokenization, errors that name file/line/field, and the prompt stream."""

from __future__ import annotations

import json

import pytest

from tests.helpers import cli_errors
from thresher.core.data import PromptStream, load_prompts
from thresher.core.errors import DataError
from thresher.core.types import Prompt


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_prompts_keep_extra_fields_and_tokenize_once(tmp_path, tiny_tokenizer):
    path = write_lines(
        tmp_path / "p.jsonl",
        [json.dumps({"prompt": "2+2?", "answer": 4, "id": "a"}), "", json.dumps({"prompt": "3+3?", "answer": 6})],
    )
    prompts, skipped = load_prompts(str(path), tiny_tokenizer, chat_template="never")
    assert skipped == 0
    assert [p.text for p in prompts] == ["2+2?", "3+3?"]
    assert prompts[0].extra == {"answer": 4, "id": "a"} and prompts[1].extra == {"answer": 6}
    assert list(prompts[0].token_ids) == tiny_tokenizer("2+2?")["input_ids"]
    assert [p.index for p in prompts] == [0, 1]


def test_chat_messages_use_the_tokenizer_template(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        path = write_lines(
            tmp_path / "c.jsonl",
            [
                json.dumps(
                    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
                ),
                json.dumps({"prompt": "plain"}),
            ],
        )
        prompts, _ = load_prompts(str(path), tokenizer, chat_template="auto")
        assert prompts[0].text == "<system>Be brief.\n<user>Hi\n<assistant>"
        assert prompts[1].text == "<user>plain\n<assistant>"  # plain prompts are wrapped as a user turn
        assert list(prompts[0].token_ids) == tokenizer(prompts[0].text, add_special_tokens=False)["input_ids"]
        never, _ = load_prompts(str(path), tokenizer, chat_template="never")
        assert never[1].text == "plain" and never[0].text == prompts[0].text
        # OpenAI's list-of-text-parts content renders like the same text given as a string
        parts = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
        write_lines(
            path, [json.dumps({"messages": [{"role": "system", "content": parts}, {"role": "user", "content": "Hi"}]})]
        )
        assert load_prompts(str(path), tokenizer)[0][0].text == prompts[0].text
    finally:
        tokenizer.chat_template = None


def test_a_utf8_byte_order_mark_is_accepted(tmp_path, tiny_tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "2+2?"}).encode() + b"\n")
    prompts, _ = load_prompts(str(path), tiny_tokenizer, chat_template="never")
    assert [p.text for p in prompts] == ["2+2?"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', '{"prompt": "broken"'], r"p.jsonl:2: malformed JSON"),
        (['{"prompt": "ok"}', '{"question": "x"}'], r"p.jsonl:2: missing field 'prompt' \(or a 'messages' list\)"),
        (['{"prompt": 3}'], r"p.jsonl:1: field 'prompt' must be a non-empty string"),
        (['{"prompt": "  "}'], r"p.jsonl:1: field 'prompt' must be a non-empty string"),
        (['["a list"]'], r"p.jsonl:1: expected a JSON object, got list"),
        (['{"messages": "hi"}'], r"p.jsonl:1: field 'messages' must be a list of \{role, content\} objects"),
        ([], r"p.jsonl: no prompts \(the file is empty\)"),
        ([b'{"prompt": "caf\xe9"}'], r"p.jsonl: not valid UTF-8 \(byte 15\)"),
        # "\ud800" is valid JSON for a lone surrogate, which is not text: it used to reach the tokenizer
        (
            ['{"prompt": "ok"}', '{"prompt": "bad \\ud800"}'],
            r"^\S*p.jsonl:2: field 'prompt' is not valid Unicode text: lone surrogate \\ud800 at character 4 "
            r"\(an unpaired \\uD800-\\uDFFF escape in the file\)$",
        ),
        (
            ['{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udfff"}]}]}'],
            r"p.jsonl:1: field 'messages'\[0\].content\[0\].text is not valid Unicode text: lone surrogate "
            r"\\udfff at character 1",
        ),
        (['{"prompt": "ok", "answer": ["7", "\\ud83d"]}'], r"p.jsonl:1: field 'answer'\[1\] is not valid Unicode"),
        # a role no chat template knows used to be rendered silently
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "hacker", "content": "x"}]}'],
            r"^\S*p.jsonl:1: messages\[1\].role 'hacker' is not a chat role; accepted: system, user, assistant, "
            r"tool$",
        ),
        (
            ['{"prompt": "ok"}', '{"messages": [{"role": "User", "content": "hi"}]}'],
            r"p.jsonl:2: messages\[0\].role 'User' is not a chat role",
        ),
    ],
)
def test_bad_prompt_files_name_file_line_and_field(tmp_path, tiny_tokenizer, lines, message):
    path = write_lines(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_prompts(str(path), tiny_tokenizer, chat_template="never")


def test_every_standard_chat_role_is_rendered(tmp_path, tiny_tokenizer):
    tiny_tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    try:
        roles = ["system", "user", "assistant", "tool", "user"]
        messages = [{"role": role, "content": str(i)} for i, role in enumerate(roles)]
        path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": messages})])
        prompts, _ = load_prompts(str(path), tiny_tokenizer)
        assert prompts[0].text == "<system>0<user>1<assistant>2<tool>3<user>4"
    finally:
        tiny_tokenizer.chat_template = None


def test_a_lone_surrogate_in_a_prompt_file_is_exit_2_naming_file_and_line(tmp_path, tiny_config, write_config, cli):
    """It used to be a TypeError traceback from the tokenizer."""
    path = write_lines(tmp_path / "train.jsonl", ['{"prompt": "1+1="}', '{"prompt": "2+\\ud800"}'])
    tiny_config["data"]["train"] = str(path)
    assert cli_errors(cli("train", write_config(tiny_config), "-q"), 2) == [
        f"error: {path}:2: field 'prompt' is not valid Unicode text: lone surrogate \\ud800 at character 2 (an "
        "unpaired \\uD800-\\uDFFF escape in the file)"
    ]


def test_missing_file_and_unknown_builtin(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl: prompt file not found"):
        load_prompts(str(tmp_path / "nope.jsonl"), tiny_tokenizer)
    with pytest.raises(DataError, match=r"builtin:nope: no such built-in prompt set; available: builtin:addition_"):
        load_prompts("builtin:nope", tiny_tokenizer)


def test_long_prompts_error_or_are_skipped(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "short"}), json.dumps({"prompt": "x" * 50})])
    too_long = r"p.jsonl:2: prompt is 50 tokens, over the limit of 10 \(data.max_prompt_tokens=10\)"
    with pytest.raises(DataError, match=too_long):
        load_prompts(str(path), tiny_tokenizer, chat_template="never", max_prompt_tokens=10)
    prompts, skipped = load_prompts(
        str(path), tiny_tokenizer, chat_template="never", max_prompt_tokens=10, on_long_prompt="skip"
    )
    assert [p.text for p in prompts] == ["short"] and skipped == 1


def make_prompts(n):
    return [Prompt(i, str(i), (i,)) for i in range(n)]


def test_stream_visits_every_prompt_once_per_epoch_in_a_seeded_order():
    stream = PromptStream(make_prompts(10), seed=3)
    first_epoch = [p.index for p in stream.next_batch(4) + stream.next_batch(4)]
    crossing = [p.index for p in stream.next_batch(4)]  # 2 from epoch 0, 2 from epoch 1
    assert sorted(first_epoch + crossing[:2]) == list(range(10))
    assert first_epoch != sorted(first_epoch)  # shuffled
    assert stream.state_dict() == {"epoch": 1, "position": 2, "consumed": 12}
    again = PromptStream(make_prompts(10), seed=3)
    assert [p.index for p in again.next_batch(12)] == first_epoch + crossing
    other_seed = PromptStream(make_prompts(10), seed=4)
    assert [p.index for p in other_seed.next_batch(8)] != first_epoch


def test_stream_resumes_from_its_state():
    stream = PromptStream(make_prompts(7), seed=1)
    stream.next_batch(5)
    state = stream.state_dict()
    expected = [p.index for p in stream.next_batch(9)]
    resumed = PromptStream(make_prompts(7), seed=1)
    resumed.load_state_dict(state)
    assert [p.index for p in resumed.next_batch(9)] == expected


def test_unshuffled_stream_keeps_file_order():
    stream = PromptStream(make_prompts(3), seed=1, shuffle=False)
    assert [p.index for p in stream.next_batch(5)] == [0, 1, 2, 0, 1]
