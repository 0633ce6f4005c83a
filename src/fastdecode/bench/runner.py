"""How the benchmark runs: every contender (fastdecode's methods, then other engines) answers every
turn of every question, interleaved answer by answer, so that machine drift hits them all alike.

Fairness rules, each kept here and nowhere else:
  * one process, one model load per engine, one thread count; prompts are token ids built once per
    turn with the target's chat template, so no engine tokenizes inside its timed call;
  * a warm-up answer per contender before each repeat (outside the question set, not recorded);
  * every contender's tokens are counted as its generated token ids, EOS included;
  * time is the wall time of the generate call, prefill included;
  * each repeat starts fastdecode's drafters afresh, so methods that learn from earlier answers do
    not learn the answers of the repeat before (within a repeat they learn, as in a server);
  * a multi-turn question feeds each contender's own earlier answer back as the assistant turn.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from ..drafters import make_drafter
from ..runtime.sampling import SamplingParams
from .questions import Question
from .stats import BASELINE

WARMUP_PROMPT = "Write a haiku about a cat sleeping in the sun."  # not a benchmark question
WARMUP_TOKENS = 16


@dataclass
class Answer:
    token_ids: list[int]
    time_s: float
    stats: dict | None  # the engine's statistics (fastdecode's methods only)


class MethodContender:
    """One of fastdecode's methods, on the shared model."""

    def __init__(self, llm, method: str, options: dict):
        self.llm, self.name, self.options = llm, method, options
        self.reference = None if method == BASELINE else BASELINE
        self.reset()

    def reset(self) -> None:
        """Forget what the drafter learned (a new repeat starts cold)."""
        self.drafter = make_drafter(self.name, self.llm.target, **self.options)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Answer:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        result = self.llm.engine.generate(prompt_ids, params, self.drafter)
        return Answer(list(result.token_ids), result.stats.wall_time_s, result.stats.to_dict())


class PeerContender:
    """Another engine (see peers.py), on the same model file."""

    def __init__(self, peer):
        self.peer, self.name, self.reference = peer, peer.name, peer.reference

    def reset(self) -> None:
        pass

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Answer:
        out = self.peer.generate(prompt_ids, max_new_tokens, temperature, seed)
        return Answer(list(out.token_ids), out.time_s, None)


def answer_seed(question: Question, turn: int, repeat: int) -> int:
    """One sampling seed per answer, the same for every contender (stable across processes)."""
    return zlib.crc32(f"{question.question_id}:{turn}:{repeat}".encode())


def make_record(q: Question, turn: int, repeat: int, contender, prompt_ids: list[int], answer: Answer) -> dict:
    """One line of results.jsonl (its keys are documented in stats.py)."""
    s = answer.stats or {}
    engine_stats = {k: s.get(k) for k in ("forward_passes", "prefill_time_s", "drafts", "draft_tokens",
                                          "accepted_tokens", "accepted_per_position", "accepted_lengths")}
    return {"question_id": q.question_id, "category": q.category, "group": q.group, "turn": turn, "repeat": repeat,
            "method": contender.name, "reference": contender.reference, "prompt_tokens": len(prompt_ids),
            "new_tokens": len(answer.token_ids), "time_s": answer.time_s, **engine_stats,
            "token_ids": answer.token_ids}


def total_answers(questions: list[Question], contenders: list, repeats: int) -> int:
    return repeats * len(contenders) * sum(len(q.turns) for q in questions)


def _prompt_ids(llm, messages: list[dict]) -> list[int]:
    """The conversation through the chat template; for a base model, which has none (gemma-3-270m),
    as plain text: the turns so far, a blank line apart, for the model to continue."""
    if llm.tokenizer.info.chat_template:
        return llm.prompt_ids(messages)
    return llm.prompt_ids("\n\n".join(m["content"] for m in messages) + "\n\n", raw=True)


def run(llm, questions: list[Question], contenders: list, *, max_new_tokens: int, temperature: float,
        repeats: int, on_warmup: Callable[[str], None] = lambda name: None) -> Iterator[dict]:
    """Yield one record per answer, in run order: repeat, question, turn, contender."""
    tokenizer = llm.tokenizer
    warmup_ids = llm.prompt_ids(WARMUP_PROMPT)
    for repeat in range(repeats):
        for c in contenders:
            c.reset()
            on_warmup(c.name)
            c.generate(warmup_ids, WARMUP_TOKENS, temperature, 0)
        for q in questions:
            conversations = {c.name: [] for c in contenders}  # each contender hears its own answers back
            for turn, text in enumerate(q.turns):
                for c in contenders:
                    messages = conversations[c.name]
                    messages.append({"role": "user", "content": text})
                    prompt_ids = _prompt_ids(llm, messages)
                    answer = c.generate(prompt_ids, max_new_tokens, temperature, answer_seed(q, turn, repeat))
                    messages.append({"role": "assistant", "content": tokenizer.decode(answer.token_ids)})
                    yield make_record(q, turn, repeat, c, prompt_ids, answer)
