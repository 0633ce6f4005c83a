"""Pieces the trained heads share: RMSNorm, rotary embedding, soft-label loss, chain acceptance.

The heads train in float32 PyTorch (autograd) against targets the pipeline stored (train/): the
target's top-k next-token probabilities at each position, restricted to the head's draft
vocabulary (the tokens the target emits most, FR-Spec / VocabTrim style).
"""
from __future__ import annotations

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
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = positions.float()[..., None] * inv  # [..., n, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1).unsqueeze(-2)
    sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(-2)
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


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


def at_rows(valid: torch.Tensor, logits_of, index: torch.Tensor, weights: torch.Tensor):
    """The output head runs only where a label exists (a third to a half of the rows of a padded
    batch hold one; the head is the largest matrix). Returns (soft cross-entropy over the labelled
    rows, bool [...] of top-1 hits in valid's shape)."""
    logits = logits_of(valid)
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
    """An nn.Linear's weight packed once for the engine's own GEMM (models/linear.py) in `dtype`:
    drafting streams the head's matrices every step, so bfloat16 halves that and the packed
    kernel beats PyTorch's on a few rows. Inference only; float32 in, float32 out."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        from ..models.linear import Linear

        self.dtype = dtype
        self.matmul = Linear(linear.weight.detach().to(dtype))
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).to(self.dtype)).float().view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def pack_for_drafting(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every nn.Linear in `module` by a PackedLinear (in place; returns the module)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child, dtype))
        else:
            pack_for_drafting(child, dtype)
    return module
