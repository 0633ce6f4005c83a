"""This machine's forward-latency curve: seconds for one forward of k new tokens over a cache.

Draft sizes come from it, not from GPU papers: on a 2-core CPU a forward of 8 tokens costs about
as much as one, while 64 cost several times more. `fastdecode calibrate` measures the full curve
(1 to 64 tokens against a realistic cache) and stores it per model, dtype, weight format and CPU
(quantized weights make one token cheaper but not sixteen, so the curve changes shape with the
format); without a stored curve the first speculative request measures a short one (about a second).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write
from ..models.cache_dir import cache_root

FULL_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
QUICK_SIZES = (1, 4, 8, 16, 32, 64)
CONTEXT = 512  # cache rows behind the measured forwards: a typical prompt plus answer


@dataclass
class CostCurve:
    sizes: list[int]  # new tokens per forward, increasing
    seconds: list[float]  # latency of each (the fastest measured), non-decreasing

    def cost(self, n: int) -> float:
        """Seconds for a forward of n new tokens, linear between measured sizes (and beyond the last)."""
        i = min(max(bisect_left(self.sizes, n), 1), len(self.sizes) - 1)
        (a, b), (ta, tb) = self.sizes[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return max(ta + (tb - ta) * (n - a) / (b - a), self.seconds[0])

    def ceiling(self, acceptance: float, batch: int = 1) -> tuple[float, int]:
        """The most a chain of drafts can speed plain decoding up on this curve: (speedup, drafts).

        A model, not a measurement: drafts cost nothing to propose, and each is accepted with
        probability `acceptance` once its parent was. With d drafts a sequence verifies d + 1 rows
        and keeps 1 + a + ... + a^d tokens on average; `batch` sequences share each forward (the
        server's continuous batching), against plain decoding of as many. At acceptance 1 this
        bounds every lossless method on this machine: d + 1 rows never yield more than d + 1
        tokens, whatever proposed them (trees included)."""
        best = (1.0, 0)
        for drafts in range(1, self.sizes[-1] // batch):
            tokens = sum(acceptance**i for i in range(drafts + 1))
            speedup = tokens * self.cost(batch) / self.cost(batch * (drafts + 1))
            if speedup > best[0]:  # ties go to fewer drafts
                best = (speedup, drafts)
        return best

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "seconds": self.seconds}


def measure(model, sizes=FULL_SIZES, repeats: int = 5, context: int = CONTEXT, progress=None) -> CostCurve:
    """Latency of forwards of each size after `context` cached tokens: the fastest of `repeats`.

    The fastest, not the median: other work on a shared machine only ever slows a forward down,
    and the stored curve sizes every later draft. This session's quick curve, measured as a training
    run ended (median of 3), held 9.5 ms for one row and 19.3 for sixteen, against 6.2 and 18.5
    measured again on the quiet machine: draft rows looked about half as dear as they are and trees
    grew; on 12 Spec-Bench questions `ngram` ran at 0.94x of `ar` with it and 1.04x with the new one
    (`auto` 0.98x and 1.13x). The fastest run resists a moment's disturbance, not sustained load:
    after measuring on a busy machine, run `fastdecode calibrate` again."""
    g = torch.Generator().manual_seed(0)
    context = max(1, min(context, model.config.max_position_embeddings - max(sizes)))  # small test models
    cache = model.new_cache(context + max(sizes))
    vocab = model.config.vocab_size
    model.forward(torch.randint(0, vocab, (context,), generator=g), torch.arange(context), cache, last_logits_only=True)
    cache.commit(context)
    seconds = []
    for n in sizes:
        tokens = torch.randint(0, vocab, (n,), generator=g)
        positions = torch.arange(context, context + n)
        model.forward(tokens, positions, cache)  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.forward(tokens, positions, cache)
            runs.append(time.perf_counter() - start)
        seconds.append(min(runs))
        if progress:
            progress(n)
    for i in range(1, len(seconds)):  # noise must not make a bigger forward look cheaper
        seconds[i] = max(seconds[i], seconds[i - 1])
    return CostCurve(list(sizes), seconds)


def curve_path(model_name: str, dtype: torch.dtype, weight_format: str) -> Path:
    """Per model, dtype, weight format (model.weight_format, e.g. "Q4_1+Q8_0"), CPU and kernel
    build and path (AMX or not): faster kernels change the curve."""
    from ..kernels import build_key, kernel_description

    cpu = hashlib.sha256(f"{build_key()}|{os.cpu_count()}|{kernel_description()}".encode()).hexdigest()[:8]
    safe = model_name.replace("/", "_")
    folder = os.environ.get("FASTDECODE_CALIBRATION")  # the curves alone elsewhere (the tests' do)
    folder = Path(folder).expanduser() if folder else cache_root() / "calibration"
    return folder / f"{safe}-{str(dtype).removeprefix('torch.')}-{weight_format}-{cpu}.json"


def save(curve: CostCurve, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(curve.to_dict())))


def load_or_measure(model, model_name: str) -> CostCurve:
    """The stored curve for this model, dtype, weight format and CPU, or a quick measurement (stored too)."""
    path = curve_path(model_name, model.dtype, model.weight_format)
    try:
        data = json.loads(path.read_text())
        return CostCurve(list(data["sizes"]), list(data["seconds"]))
    except (OSError, ValueError, KeyError):
        pass
    curve = measure(model, QUICK_SIZES, repeats=3)
    save(curve, path)
    return curve
