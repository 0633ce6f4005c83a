"""Pieces the trained heads share: RMSNorm, rotary embedding, soft-label loss, chain acceptance.

The heads train in float32 PyTorch (autograd) against targets the pipeline stored (train/): the
target's top-k next-token probabilities at each position, restricted to the head's draft
vocabulary (the tokens the target emits most, FR-Spec / VocabTrim style).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, weight: torch.Tensor | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(weight.clone().float() if weight is not None else torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # bfloat16 x under autocast


class TargetHead(nn.Module):
    """What every head shares: an output head over the draft vocabulary that starts as the target's
    own rows behind the target's final norm, the target's embeddings borrowed (never saved), and
    its settings (cfg) written into its card."""

    cfg: dict
    # Matrices that read the same input (names of nn.Linear attributes): packed for drafting, each
    # group is one product, one pass over the input instead of several calls of a few rows each.
    MERGED: tuple[tuple[str, ...], ...] = ()
    merged: dict[tuple[str, ...], nn.Module] = {}

    def products(self, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """x times each of the named matrices (one merged product when packed for drafting)."""
        merged = self.merged.get(names)
        if merged is None:
            return [getattr(self, n)(x) for n in names]
        return list(merged(x).split(merged.sizes, -1))

    def start_from_target(self, model, draft_ids: list[int], norm: RMSNorm) -> None:
        ids = torch.tensor(draft_ids, dtype=torch.long)
        with torch.no_grad():
            self.draft_ids.copy_(ids)
            self.head.weight.copy_(model.head_rows(ids))
            norm.weight.copy_(model.norm.float())
        self.attach(model)

    def attach(self, model) -> None:
        """Take the target's embeddings (needed to train; drafting asks the model for rows)."""
        self.embed = model.embed_tokens(torch.arange(model.config.vocab_size)).float()

    def config(self) -> dict:
        return dict(self.cfg)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [..., n, heads, d] at positions [..., n] (Hugging Face's half split)."""
    d = x.shape[-1]
    cos, sin = _rotary_table(d, theta, _table_length(positions), str(x.device))
    # (x_2, x_1) * (-sin, sin) is (-x_2, x_1) * (sin, sin) bit for bit, one operation fewer
    return x * cos[positions].unsqueeze(-2) + x.roll(d // 2, -1) * sin[positions].unsqueeze(-2)


def _table_length(positions: torch.Tensor) -> int:
    """Rows of the rotary table to cover the positions: a power of two, so the table is rebuilt rarely."""
    return 1 << max(int(positions.max()) if positions.numel() else 0, 255).bit_length()


@functools.lru_cache(maxsize=8)
def _rotary_table(d: int, theta: float, length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, d] of positions 0 .. length - 1 (each half repeats the angles; sin's first
    half negated): looked up, not recomputed, on every draft step."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.arange(length, device=device).float()[:, None] * inv
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([-angles.sin(), angles.sin()], -1)


def draft_targets(top_ids: torch.Tensor, top_probs: torch.Tensor, to_draft: torch.Tensor):
    """The target's distribution over the draft vocabulary from its stored top-k.

    top_ids, top_probs [..., K]; to_draft [vocab] maps a token id to its draft index or -1.
    Returns (draft indices [..., K] with -1 replaced by 0, weights [..., K] renormalised over the
    in-vocabulary entries, and a bool [...] saying whether any mass fell inside the vocabulary)."""
    index = to_draft[top_ids]
    inside = index >= 0
    weights = top_probs * inside
    total = weights.sum(-1, keepdim=True)
    return index.clamp(min=0), weights / total.clamp(min=1e-9), total.squeeze(-1) > 0


def soft_cross_entropy(logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k w_k log softmax(logits)[index_k] (logits [N, V], index/weights [N, K])."""
    logp = torch.log_softmax(logits, -1).gather(-1, index)
    return -(weights * logp).sum(-1).mean() if len(logits) else logits.sum()


def top1_match(logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Whether the head's most likely draft token is the target's most likely token (bool [N])."""
    target_best = index.gather(-1, weights.argmax(-1, keepdim=True)).squeeze(-1)
    return logits.argmax(-1) == target_best


def feature_regression(output: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between a head's output and the target's own state it should reproduce, both
    RMS-normalised (the output head reads them through a norm, so only their direction counts)."""
    if not len(output):
        return output.sum()
    norm = lambda x: F.rms_norm(x, (x.shape[-1],))  # noqa: E731
    return F.smooth_l1_loss(norm(output), norm(goal.float()))


def at_rows(valid: torch.Tensor, logits_of, index: torch.Tensor, weights: torch.Tensor, with_hits: bool):
    """The output head runs only where a label exists (a third to a half of the rows of a padded
    batch hold one; the head is the largest matrix). Returns (soft cross-entropy over the labelled
    rows, bool [...] of top-1 hits in valid's shape, or None without `with_hits`: training skips
    them, as an argmax over the draft vocabulary took 5% of an eagle step)."""
    logits = logits_of(valid)
    hits = None
    if with_hits:
        hits = torch.zeros_like(valid)
        hits[valid] = top1_match(logits, index[valid], weights[valid])
    return soft_cross_entropy(logits, index[valid], weights[valid]), hits


def chain_acceptance(correct: list[torch.Tensor], valid: list[torch.Tensor]) -> dict[str, float]:
    """Greedy acceptance of a draft chain, estimated teacher-forced. correct[j] and valid[j] are
    bool [B, T], aligned so that entry t is depth j + 1 of the chain drafted at position t: its
    token matches the target's argmax (inputs are the true tokens, which is what the target sees
    when every earlier node was accepted). Only chains whose every depth is known are counted.

    Returns accept@k (how often depth k is accepted when depth k - 1 was) and mean_accept_len
    (1 + expected accepted nodes per chain, vLLM's definition)."""
    counted = torch.stack(valid).all(0)
    chains = max(1, int(counted.sum()))
    out: dict[str, float] = {}
    alive, expected = counted, 0.0
    for j, ok in enumerate(correct):
        survivors = alive & ok
        out[f"accept@{j + 1}"] = float(survivors.sum()) / max(1, int(alive.sum()))
        expected += float(survivors.sum()) / chains
        alive = survivors
    out["mean_accept_len"] = 1.0 + expected
    return out


class PackedLinear(nn.Module):
    """A weight packed once for the engine's own GEMM (models/linear.py) in `dtype`: drafting
    streams the head's matrices every step, so bfloat16 halves that and the packed kernel beats
    PyTorch's on a few rows. Inference only; float32 in, float32 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        from ..models.linear import Linear

        self.dtype = dtype
        self.matmul = Linear(weight.detach().to(dtype))
        self.bias = None if bias is None else bias.detach().float()

    @classmethod
    def of(cls, linears: list[nn.Linear], dtype: torch.dtype) -> "PackedLinear":
        """Several linears that read the same input, stacked by output rows: one product."""
        biases = [lin.bias for lin in linears]
        packed = cls(torch.cat([lin.weight for lin in linears]), None if biases[0] is None else torch.cat(biases), dtype)
        packed.sizes = [lin.out_features for lin in linears]  # how to split its output
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).to(self.dtype))
        y = y if len(shape) == 2 else y.view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class PackedRMSNorm(nn.Module):
    """An RMSNorm for drafting: one native call (layer.c's norm) where PyTorch's takes 15-40 us on
    a row or two, measured on a 2-core Zen 3. Float32 in and out."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        from ..kernels import native_lib

        self.eps, self.weight, self.native = norm.eps, norm.weight.detach().float().contiguous(), native_lib()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps)
        from ..kernels import rms_norm

        if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():  # a draft step's rows
            return rms_norm(self.native, x, self.weight, self.eps, torch.float32)
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        return rms_norm(self.native, rows, self.weight, self.eps, torch.float32).view(x.shape)


def pack_for_drafting(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Pack a head for drafting (in place; returns it): its merged products (TargetHead.MERGED)
    first, then every other nn.Linear as a PackedLinear and every RMSNorm as a PackedRMSNorm."""
    if isinstance(module, TargetHead):
        module.merged = {names: PackedLinear.of([getattr(module, n) for n in names], dtype)
                         for names in module.MERGED}
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias, dtype))
        elif isinstance(child, RMSNorm):
            setattr(module, name, PackedRMSNorm(child))
        else:
            pack_for_drafting(child, dtype)
    return module
