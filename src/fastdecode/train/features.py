"""Features and labels: the target's hidden states and next-token distribution over its own answers.

One teacher-forced forward of the target over each prompt + answer gives, for every row, the
residual stream after the layers the heads read (the union over head kinds: EAGLE-3's low, middle
and high layer, the last layer for Medusa and Hydra) and the target's distribution of the next
token, of which the `top_k` most likely ids and their probabilities are kept (the rest of the mass
is small). Short sequences share a forward (up to CHUNK_ROWS rows); a longer one runs in chunks of
CHUNK_ROWS over its own KV cache.

They are computed once and stored, not recomputed each epoch. Measured on the 2-core machine
(SmolLM2-135M, bfloat16, one thread, CPU seconds): the forward with capture and top-k costs 3.8 ms
a row, reading a stored row back into a training batch 0.01 ms; storing costs 4.5 KB a row.

A shard holds SHARD_SEQUENCES sequences (safetensors; hidden states in bfloat16, the target's own
dtype by default, so nothing is lost):

    tokens int32 [R]   hidden bfloat16 [R, layers, H]   top_ids int32 [R, K]   top_probs float16 [R, K]
    mask bool [R]: the next token (t + 1) is an answer token, i.e. row t's distribution is a label
    offsets int64 [S + 1]: where each sequence's rows begin

index.json, written last, lists the layers, the sequences (prompt index, split, shard, length) and
the draft vocabulary; its presence marks the stage done. Shards are written atomically and in a
fixed order, so an interrupted run keeps the shards it finished.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..models.segment import Segment
from ..runtime.kv_cache import KVCache
from ..files import atomic_write

CHUNK_ROWS = 512  # rows per target forward
SHARD_SEQUENCES = 64
INDEX = "index.json"


def draft_vocabulary(answers: list[list[int]], size: int, eos_ids, vocab_size: int) -> list[int]:
    """The `size` token ids the target emits most in its answers (ties by id), every EOS id among
    them, sorted: the output rows of a head's reduced vocabulary (as FR-Spec and VocabTrim do)."""
    counts = Counter(t for ids in answers for t in ids)
    eos = sorted(set(eos_ids))
    ranked = sorted((t for t in range(vocab_size) if t not in eos), key=lambda t: (-counts[t], t))
    return sorted(eos + ranked[: max(size - len(eos), 0)])


def write_features(model, sequences: list[tuple[list[int], int]], folder: Path, layers: tuple[int, ...],
                   top_k: int) -> None:
    """Shards for `sequences` (token ids, prompt length), skipping those already written."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = model.new_pool(rows=CHUNK_ROWS)
    shards = range(0, len(sequences), SHARD_SEQUENCES)
    todo = [s for s in shards if not _shard_path(folder, s // SHARD_SEQUENCES).exists()]
    total = sum(len(ids) for s in todo for ids, _ in sequences[s : s + SHARD_SEQUENCES])
    with tqdm(total=total, desc="features", unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True) as bar:
        for start in todo:
            part = sequences[start : start + SHARD_SEQUENCES]
            rows = _forward_all(model, pool, [ids for ids, _ in part], layers, top_k, bar)
            shard = {name: torch.cat([r[name] for r in rows]) for name in ("tokens", "hidden", "top_ids", "top_probs")}
            shard["mask"] = torch.cat([_label_mask(len(ids), prompt) for ids, prompt in part])
            shard["offsets"] = torch.tensor([0] + [len(ids) for ids, _ in part]).cumsum(0)
            atomic_write(_shard_path(folder, start // SHARD_SEQUENCES), lambda p: save_file(shard, str(p)))


def _label_mask(length: int, prompt: int) -> torch.Tensor:
    """Rows whose next token is an answer token: prompt - 1 .. length - 2."""
    mask = torch.zeros(length, dtype=torch.bool)
    mask[prompt - 1 : length - 1] = True
    return mask


def _forward_all(model, pool, sequences: list[list[int]], layers, top_k, bar) -> list[dict]:
    """Per sequence: its tokens, hidden states at `layers` and top-k next-token distribution."""
    caches = [KVCache(pool, len(ids)) for ids in sequences]
    parts: list[list[dict]] = [[] for _ in sequences]
    for group in _pack(sequences):
        segments = [Segment(torch.tensor(sequences[i][b : b + n]), torch.arange(b, b + n), caches[i], capture=layers)
                    for i, b, n in group]
        logits = model.forward_batch(segments)
        at = 0
        for (i, b, n), seg in zip(group, segments):
            probs, ids = logits[at : at + n].softmax(-1).topk(top_k, dim=-1)
            parts[i].append({"tokens": seg.tokens.int(), "hidden": seg.hidden.bfloat16(),
                             "top_ids": ids.int(), "top_probs": probs.half()})
            caches[i].commit(n)
            if b + n == len(sequences[i]):
                caches[i].release()  # its blocks go to the next sequences
            at += n
        bar.update(at)
    return [{k: torch.cat([p[k] for p in seq_parts]) for k in seq_parts[0]} for seq_parts in parts]


def _pack(sequences: list[list[int]]) -> list[list[tuple[int, int, int]]]:
    """The forwards, each a list of chunks (sequence, first row, rows) of at most CHUNK_ROWS rows in
    all: short sequences share a forward, a long one is cut into CHUNK_ROWS chunks. A sequence's
    chunks are in successive forwards, in order (its first chunks fill a forward each)."""
    forwards, current, rows = [], [], 0
    for i, ids in enumerate(sequences):
        for begin in range(0, len(ids), CHUNK_ROWS):
            n = min(CHUNK_ROWS, len(ids) - begin)
            if current and rows + n > CHUNK_ROWS:
                forwards.append(current)
                current, rows = [], 0
            current.append((i, begin, n))
            rows += n
    return forwards + [current] if current else forwards


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def write_index(folder: Path, layers, top_k: int, sequences: list[tuple[list[int], int]], splits: list[str],
                prompt_indices: list[int], draft_vocab: list[int]) -> None:
    index = {
        "layers": list(layers), "top_k": top_k, "draft_vocab": draft_vocab,
        "sequences": [{"prompt": p, "split": split, "shard": k // SHARD_SEQUENCES, "length": len(ids),
                       "prompt_length": n}
                      for k, ((ids, n), split, p) in enumerate(zip(sequences, splits, prompt_indices))],
    }
    atomic_write(folder / INDEX, lambda p: p.write_text(json.dumps(index)))


class FeatureSet:
    """The stored sequences of one split, read back a padded batch at a time (shards stay on disk,
    memory-mapped by safetensors)."""

    def __init__(self, folder: Path, split: str):
        index = json.loads((folder / INDEX).read_text())
        self.folder = folder
        self.layers: tuple[int, ...] = tuple(index["layers"])
        entries = index["sequences"]
        position = Counter()  # place of each sequence inside its shard
        self.where, self.lengths, self.answer_tokens = [], [], 0
        for e in entries:
            if e["split"] == split:
                self.where.append((e["shard"], position[e["shard"]]))
                self.lengths.append(e["length"])
                self.answer_tokens += e["length"] - e["prompt_length"]
            position[e["shard"]] += 1
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def _shard(self, shard: int):
        if shard not in self._open:
            f = safe_open(str(_shard_path(self.folder, shard)), framework="pt")
            self._open[shard] = (f, f.get_tensor("offsets").tolist())
        return self._open[shard]

    def batch(self, items: list[int], layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Sequences `items` padded to the longest: tokens [B, T], hidden float32 [B, T, len(layers), H]
        (the states of exactly `layers`, in that order), top_ids [B, T, K], top_probs [B, T, K],
        mask [B, T] (False on padding)."""
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not stored (stored: {list(self.layers)})")
        pick = [self.layers.index(i) for i in layers]
        T = max(self.lengths[i] for i in items)
        out: dict[str, list[torch.Tensor]] = {name: [] for name in ("tokens", "hidden", "top_ids", "top_probs", "mask")}
        for i in items:
            shard, place = self.where[i]
            f, offsets = self._shard(shard)
            a, b = offsets[place], offsets[place + 1]
            for name, rows in out.items():
                t = f.get_slice(name)[a:b]
                t = t[:, pick] if name == "hidden" else t
                rows.append(F.pad(t, (0, 0) * (t.dim() - 1) + (0, T - len(t))))
        dtypes = {"tokens": torch.long, "hidden": torch.float32, "top_ids": torch.long, "top_probs": torch.float32,
                  "mask": torch.bool}
        return {name: torch.stack(rows).to(dtypes[name]) for name, rows in out.items()}
