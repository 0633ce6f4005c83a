"""Self-distillation: the target answers the training prompts itself, batched, saved as it goes.
(Or, with `--answers dataset`, the prompts' own replies stand in: dataset_answers.)

A drafter is judged by how often the target accepts its guesses, so it should learn the target's
own continuations, not the human or ChatGPT text the prompts came with. Most answers are greedy
(what greedy decoding will later verify); a share is sampled at a moderate temperature with a
seed of its own, which shows the head more of the target's distribution than its single argmax.

Requests run through the continuous-batching scheduler (plain `ar` decoding, BATCH at once), so
generation goes at the machine's batched throughput rather than one stream's: on this machine's
cost curve for SmolLM2-135M in bfloat16 a forward of 8 rows takes 34 ms, of 32 rows 81 ms, so 32
streams give about 1.7 times the tokens per second of 8. Throughput, not latency, is what counts
here, so a step may also read a long prompt chunk (PREFILL_TOKENS).
Each answer is appended to answers.jsonl (and flushed) as soon as it finishes: an interrupted
run loses only the answers in flight, and a resumed one asks only for those still missing.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..drafters import make_drafter
from ..errors import FastDecodeError
from ..runtime.sampling import SamplingParams
from ..scheduler import Scheduler

BATCH = 32  # sequences decoding at once: about 1 GB of KV cache at 1,300 tokens each for SmolLM2
PREFILL_TOKENS = 256  # prompt tokens a step may read


@dataclass
class Answer:
    index: int  # the prompt's line in prompts.jsonl
    prompt_ids: list[int]
    answer_ids: list[int]  # the target's answer, its EOS token included when it stopped on one
    sampled: bool  # sampled at a temperature (else greedy)
    finish: str  # "stop" or "length"


def sampling(index: int, seed: int, sampled_share: float, temperature: float, max_new_tokens: int) -> SamplingParams:
    """The sampling parameters of prompt `index`: sampled with probability `sampled_share`, decided
    and seeded by (seed, index) alone, so a resumed run asks exactly what the first one would have."""
    rng = random.Random(f"{seed}:{index}")
    if rng.random() < sampled_share:
        return SamplingParams(temperature=temperature, seed=rng.randrange(2**63), max_new_tokens=max_new_tokens)
    return SamplingParams(max_new_tokens=max_new_tokens)


def read_answers(path: Path) -> dict[int, Answer]:
    """The answers saved so far, by prompt index. A line torn by an interruption (the last one) is
    cut off the file, so that appending continues from a clean end."""
    answers: dict[int, Answer] = {}
    if not path.exists():
        return answers
    good = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                answer = Answer(**json.loads(line))
            except (ValueError, TypeError):
                break
            answers[answer.index] = answer
            good += len(line)
    if good < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return answers


def distill(llm, prompts: list[list[dict]], path: Path, max_new_tokens: int, sampled_share: float,
            temperature: float, seed: int) -> list[Answer]:
    """Every prompt's answer (in prompt order), generating only those not yet in `path`."""
    answers = read_answers(path)
    todo = [i for i in range(len(prompts)) if i not in answers]
    scheduler = Scheduler(llm.engine, max_batch=BATCH, step_tokens=PREFILL_TOKENS)
    pending = {}
    for i in todo:
        params = sampling(i, seed, sampled_share, temperature, max_new_tokens)
        request = scheduler.submit(llm.prompt_ids(prompts[i]), params, make_drafter("ar"))
        pending[id(request)] = (i, not params.greedy)
    finished_tokens, start, shown = 0, time.perf_counter(), 0.0
    with open(path, "a", encoding="utf-8") as out, \
            tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="answering", unit="prompt",
                 file=sys.stderr, dynamic_ncols=True) as bar:
        while not scheduler.idle:
            for request in scheduler.step():
                index, sampled = pending.pop(id(request))
                result = request.result
                answer = Answer(index, request.sequence.prompt, result.token_ids, sampled, result.finish_reason)
                out.write(json.dumps(asdict(answer)) + "\n")
                out.flush()
                answers[index] = answer
                finished_tokens += len(result.token_ids)
                bar.update()
            now = time.perf_counter()
            if now - shown > 1:  # the tokens of answers still in flight count too
                tokens = finished_tokens + sum(len(r.sequence.generated) for r in scheduler.running)
                bar.set_postfix_str(f"{tokens / (now - start):.0f} tok/s")
                shown = now
    return [answers[i] for i in range(len(prompts))]


def dataset_answers(tokenizer, prompts: list[tuple[list[dict], str]], prompt_ids: list[list[int]],
                    max_new_tokens: int) -> list[Answer]:
    """The source's own replies as answers (`--answers dataset`), in the tokens the target would
    have produced: the conversation with the reply, as the chat template writes it, less the
    prompt, up to and including the first end-of-turn token, at most max_new_tokens."""
    answers = []
    for index, ((messages, reply), ids) in enumerate(zip(prompts, prompt_ids)):
        turn = {"role": "assistant", "content": reply.strip()}  # a leading newline would merge into the prompt's last token
        full = tokenizer.encode_chat(messages + [turn], add_generation_prompt=False)
        if full[: len(ids)] != ids:
            raise FastDecodeError("--answers dataset: this model's chat template does not write a reply as a "
                                  "continuation of the prompt's tokens; train on the target's own answers (--answers target)")
        answer = full[len(ids):]
        end = next((i for i, t in enumerate(answer) if t in tokenizer.eos_ids), None)
        if end is not None:
            answer = answer[: end + 1]
        finish = "stop" if len(answer) <= max_new_tokens and end is not None else "length"
        answers.append(Answer(index, ids, answer[:max_new_tokens], False, finish))
    return answers
