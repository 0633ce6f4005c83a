"""What the benchmark asks: questions in Spec-Bench's schema, their task groups, and a seeded sample.

A question file is JSON lines, one object per question: `question_id` (integer or string, unique),
`category` and `turns` (a non-empty list of user messages; later turns are asked after the model's
own earlier answers). Other fields are ignored. Spec-Bench's categories fall into six task groups:
the eight MT-bench categories form "mt_bench"; translation, summarization, qa, math_reasoning and
rag are groups of their own.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastDecodeError

GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")  # Spec-Bench's order
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
GROUP_OF = {**{c: "mt_bench" for c in MT_BENCH_CATEGORIES}, **{g: g for g in GROUPS[1:]}}

SPEC_BENCH = "spec-bench"  # the --questions value naming Spec-Bench's file
SPEC_BENCH_ENV = "FASTDECODE_SPEC_BENCH"
BUILTIN = Path(__file__).with_name("questions.jsonl")  # fastdecode's own small set, in the same schema


class QuestionError(FastDecodeError):
    """A missing or malformed question file; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    group: str
    turns: tuple[str, ...]


def spec_bench_candidates() -> list[tuple[Path, str]]:
    """Where Spec-Bench's question file is looked for, in order, each with why it is looked at there."""
    repo_root = Path(__file__).resolve().parents[3]  # src/fastdecode/bench/ -> the repository
    places = [(repo_root.parent / "shared" / "data" / "spec_bench" / "question.jsonl", "beside the repository")]
    if os.environ.get(SPEC_BENCH_ENV):
        places.insert(0, (Path(os.environ[SPEC_BENCH_ENV]), f"${SPEC_BENCH_ENV}"))
    return places


def questions_path(spec: str | None) -> Path:
    """The file behind a --questions value: None is the built-in set, "spec-bench" Spec-Bench's file."""
    if spec is None:
        return BUILTIN
    if spec != SPEC_BENCH:
        return Path(spec)
    places = spec_bench_candidates()
    for path, _ in places:
        if path.is_file():
            return path
    looked = "; ".join(f"{path} ({why})" for path, why in places)
    raise QuestionError(f"Spec-Bench's question.jsonl not found; looked at: {looked}. "
                        f"Set ${SPEC_BENCH_ENV} to its path or pass --questions FILE")


def load_questions(path: str | Path) -> list[Question]:
    """Every question of a JSON-lines file, in file order. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise QuestionError(f"question file not found: {path}")
    questions, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                q = _parse(line, f"{path}, line {lineno}")
                if q.question_id in seen:
                    raise QuestionError(f"{path}, line {lineno}: duplicate question_id {q.question_id!r}")
                seen.add(q.question_id)
                questions.append(q)
    if not questions:
        raise QuestionError(f"{path} holds no questions")
    return questions


def _parse(line: str, where: str) -> Question:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QuestionError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise QuestionError(f"{where}: expected a JSON object")
    missing = [k for k in ("question_id", "category", "turns") if k not in obj]
    if missing:
        raise QuestionError(f"{where}: missing {', '.join(missing)}")
    qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise QuestionError(f"{where}: question_id must be an integer or a string")
    if not isinstance(category, str) or category not in GROUP_OF:
        raise QuestionError(f"{where}: unknown category {category!r}; known: {', '.join(GROUP_OF)}")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
        raise QuestionError(f"{where}: turns must be a non-empty list of non-empty strings")
    return Question(qid, category, GROUP_OF[category], tuple(turns))


def sample_questions(questions: list[Question], per_group: int, seed: int = 0) -> list[Question]:
    """`per_group` questions from each task group (all of a group when 0 or when it holds fewer),
    groups in Spec-Bench's order, each group in file order. Each group draws from its own generator,
    seeded by (seed, group), so a group's sample does not depend on which other groups the file holds."""
    if per_group < 0:
        raise ValueError("per_group must be >= 0")
    sampled = []
    for group in GROUPS:
        members = [q for q in questions if q.group == group]
        if 0 < per_group < len(members):
            picked = sorted(random.Random(f"{seed}:{group}").sample(range(len(members)), per_group))
            members = [members[i] for i in picked]
        sampled += members
    return sampled
