"""Medusa and Hydra heads: several tokens ahead from the target's last hidden state, in one pass.

Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads"): head k (1..K) is a residual block on the target's last hidden state h_t (after
its final norm), followed by an output head, and predicts token t + k + 1: the target's own head
predicts t + 1, head 1 the token after that, and so on. The heads do not see each other's
guesses, so the tree is built from each head's top candidates.

Hydra (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding"):
head k also reads the embeddings of the tokens before the one it predicts, x_{t+1} .. x_{t+k}
(the target's token, then the drafted path), so a branch of the tree is drafted conditioned on
itself. Its input layer maps [h_t ; e(x_{t+1}) ; ... ; e(x_{t+k})] to the hidden size.

Both share one output head over the draft vocabulary (initialised from the target's rows) and read
the state after the target's last layer, normed by the target's final norm (kept frozen).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import RMSNorm, TargetHead, at_rows, chain_acceptance, draft_targets, feature_regression

REGRESSION = 5.0  # weight of the regression to the target's later state against the soft cross-entropy


class MedusaHeads(TargetHead):
    kind = "medusa"
    sequential = False  # Hydra: True

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg, kind=self.kind)
        h, k = cfg["hidden_size"], cfg["num_heads_ahead"]
        self.layers = tuple(cfg["layers"])
        self.train_layers = self.layers  # the same last state, k + 1 places on, is what head k regresses to
        self.target_norm = RMSNorm(h, cfg["rms_norm_eps"])
        self.target_norm.weight.requires_grad_(False)
        widths = [(i + 2 if self.sequential else 1) * h for i in range(k)]
        self.blocks = nn.ModuleList(nn.Linear(w, h) for w in widths)
        self.head = nn.Linear(h, cfg["draft_vocab_size"], bias=False)
        self.register_buffer("draft_ids", torch.zeros(cfg["draft_vocab_size"], dtype=torch.long))
        self.register_buffer("embed", torch.zeros(0), persistent=False)
        for block in self.blocks:  # start as the identity on h: head k first guesses what h predicts
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    @classmethod
    def from_target(cls, model, draft_ids: list[int], heads_ahead: int = 4):
        c = model.config
        cfg = dict(hidden_size=c.hidden_size, rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
                   draft_vocab_size=len(draft_ids), num_heads_ahead=heads_ahead, layers=[c.num_layers - 1])
        head = cls(cfg)
        head.start_from_target(model, draft_ids, head.target_norm)
        return head

    def base(self, states: torch.Tensor) -> torch.Tensor:
        """[..., 1, H] state after the target's last layer -> the normed hidden the heads read."""
        return self.target_norm(states[..., 0, :])

    def ahead(self, k: int, hidden: torch.Tensor, path_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the draft vocabulary for the token k + 1 ahead (head k, 0-based) from the normed
        hidden [..., H] and, for Hydra, the embeddings [..., k + 1, H] of the tokens before it."""
        return self.head(self.guess(k, hidden, path_embeds))

    def guess(self, k: int, hidden: torch.Tensor, path_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Head k's guess of the target's normed last state k + 1 places on (what its output head reads)."""
        x = hidden if not self.sequential else torch.cat([hidden, path_embeds.flatten(-2)], -1)
        return hidden + F.silu(self.blocks[k](x))

    def _scored(self, batch: dict, with_hits: bool):
        """Per head: its loss, its top-1 hits (None without `with_hits`) and the positions that
        count, aligned on the position each head drafts from; the output head runs at labelled
        positions only."""
        tokens, mask = batch["tokens"], batch["mask"]
        B, T = tokens.shape
        to_draft = torch.full((self.cfg["vocab_size"],), -1, dtype=torch.long, device=tokens.device)
        to_draft[self.draft_ids] = torch.arange(len(self.draft_ids), device=tokens.device)
        hidden = self.base(batch["hidden"])
        out = []
        for k in range(len(self.blocks)):
            # Head k at position t predicts token t + k + 2, whose distribution is stored at t + k + 1.
            shift = k + 1
            index, weights, inside = draft_targets(batch["top_ids"][:, shift:], batch["top_probs"][:, shift:], to_draft)
            valid = F.pad(mask[:, shift:] & inside, (0, shift))
            index, weights = F.pad(index, (0, 0, 0, shift)), F.pad(weights, (0, 0, 0, shift))

            guesses = {}

            def logits_of(rows, k=k):
                path = None
                if self.sequential:  # tokens t + 1 .. t + k + 1 of each labelled position t
                    b, t = rows.nonzero(as_tuple=True)
                    path = torch.stack([self.embed[tokens[b, (t + 1 + i).clamp(max=T - 1)]] for i in range(k + 1)], -2)
                guesses["v"] = self.guess(k, hidden[rows], path)
                return self.head(guesses["v"])

            ce, hits = at_rows(valid, logits_of, index, weights, with_hits)
            goal = F.pad(hidden[:, shift:], (0, 0, 0, shift))  # the normed last state at t + k + 1
            reg = feature_regression(guesses["v"], goal[valid])
            out.append((ce + REGRESSION * reg, hits, valid))
        return out

    def loss(self, batch: dict):
        total, metrics = 0.0, {}
        for k, (head_loss, _, _) in enumerate(self._scored(batch, with_hits=False)):
            total = total + head_loss
            metrics[f"loss@{k + 1}"] = float(head_loss.detach())
        return total, metrics

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        scored = self._scored(batch, with_hits=True)
        return chain_acceptance([hits for _, hits, _ in scored], [valid for _, _, valid in scored])


class HydraHeads(MedusaHeads):
    kind = "hydra"
    sequential = True
