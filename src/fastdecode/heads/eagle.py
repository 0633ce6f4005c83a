"""An EAGLE-3-style draft head: one decoder layer that reads the target's own hidden states.

EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty";
EAGLE-3, 2025, "Scaling up Inference Acceleration of Large Language Models via Training-Time
Test") drafts at the feature level. For the pair at position t,

    f_t = fc([h_low_t ; h_mid_t ; h_high_t])           the target's states after three layers, fused
    g_t = layer(norm(embed(x_{t+1})) ; norm(f_t))        one decoder layer: attention over the pairs
                                                          before it (its own KV cache), then an MLP
    q(x_{t+2}) = softmax(head(norm(g_t)))                over the draft vocabulary only

so the head sees what the target "thought" at t and the token it chose, and predicts the token
after. To draft further it feeds its own output back: the pair at t + 1 is (g_t, the drafted
token), since the target's state at t + 1 is not known until verification. Training-time test
(TTT) trains exactly that: step 0 reads the target's states, step j reads the head's own outputs
of step j - 1, and pair t at step j attends to the true pairs up to t - j plus its own chain of
drafted pairs (t - j + 1 .. t, one per earlier step), as the drafting tree will. Later steps are
weighted 0.8^j, as in EAGLE-3.

Sizes for the default model (hidden 576): fc 1.0M, the layer 4.0M (its q/k/v read 2 x hidden),
the head 8,192 x 576 = 4.7M (initialised from the target's output head rows): about 10M
parameters, 19 MB in bfloat16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import RMSNorm, TargetHead, at_rows, chain_acceptance, draft_targets, feature_regression, rotary

TTT_DECAY = 0.8
REGRESSION = 5.0  # weight of the feature regression against the soft cross-entropy


def ttt_mask(T: int, j: int, device) -> torch.Tensor:
    """Which keys pair t may attend to at training-time test's step j: [T, (j + 1) T], the true
    pairs up to t - j, then per step i = 1..j the column t of its shifted keys (pair t - j + i,
    when it exists). No row is empty: every pair sees at least its own pair of step j."""
    rows = torch.arange(T, device=device)[:, None]
    blocks = [torch.arange(T, device=device)[None, :] <= rows - j]
    for i in range(1, j + 1):
        blocks.append(torch.eye(T, dtype=torch.bool, device=device) & (rows >= j - i))
    return torch.cat(blocks, 1)


class EagleHead(TargetHead):
    kind = "eagle"
    MERGED = (("q", "k", "v"), ("gate", "up"))

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg, kind=self.kind)
        h, hd = cfg["hidden_size"], cfg["head_dim"]
        self.heads, self.kv_heads, self.head_dim = cfg["num_heads"], cfg["num_kv_heads"], hd
        self.layers = tuple(cfg["layers"])
        # Training also reads the target's last state one position on: what the layer's output
        # should become (EAGLE's feature regression), a dense signal that a short CPU run needs.
        self.train_layers = self.layers + (cfg["num_layers"] - 1,)
        eps = cfg["rms_norm_eps"]
        self.fc = nn.Linear(len(self.layers) * h, h, bias=False)
        self.embed_norm = RMSNorm(h, eps)
        self.feature_norm = RMSNorm(h, eps)
        self.q = nn.Linear(2 * h, self.heads * hd, bias=False)
        self.k = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.v = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.o = nn.Linear(self.heads * hd, h, bias=False)
        self.mlp_norm = RMSNorm(h, eps)
        self.gate = nn.Linear(h, cfg["intermediate_size"], bias=False)
        self.up = nn.Linear(h, cfg["intermediate_size"], bias=False)
        self.down = nn.Linear(cfg["intermediate_size"], h, bias=False)
        self.norm = RMSNorm(h, eps)
        self.head = nn.Linear(h, cfg["draft_vocab_size"], bias=False)
        self.register_buffer("draft_ids", torch.zeros(cfg["draft_vocab_size"], dtype=torch.long))
        # The target's token embeddings: read, never trained, never saved (the target has them).
        self.register_buffer("embed", torch.zeros(0), persistent=False)
        for lin in (self.fc, self.q, self.k, self.v, self.gate, self.up):
            nn.init.normal_(lin.weight, std=0.02)
        # The layer starts as the identity on its feature (zero output projections of the attention
        # and the MLP), and the feature as the target's highest state read (see from_target): at
        # step 0 the head then predicts what the target's own head would make of that state, a
        # sensible start that a CPU budget of a few hundred steps can improve, where a random start
        # spent them unlearning confident nonsense.
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.down.weight)

    @classmethod
    def from_target(cls, model, draft_ids: list[int], ttt_steps: int = 4) -> "EagleHead":
        c = model.config
        n = c.num_layers
        cfg = dict(hidden_size=c.hidden_size, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                   head_dim=c.head_dim, intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
                   rope_theta=c.rope_theta, vocab_size=c.vocab_size, draft_vocab_size=len(draft_ids), num_layers=n,
                   layers=[2, n // 2, n - 3] if n > 5 else list(range(n))[:3], ttt_steps=ttt_steps)
        head = cls(cfg)
        head.start_from_target(model, draft_ids, head.norm)
        with torch.no_grad():
            h = c.hidden_size
            head.fc.weight[:, -h:] += torch.eye(h)  # the feature starts as the highest layer's state
        return head

    # ---- the computation, shared by training and drafting ---------------------------------------

    def fuse(self, states: torch.Tensor) -> torch.Tensor:
        """[..., len(layers), H] target states -> [..., H] feature."""
        return self.fc(states.flatten(-2))

    def project(self, feature: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor):
        """The attention inputs of pairs (feature, embedding of the next token): q [..., n, heads, d],
        k and v [..., n, kv_heads, d], with rotary embedding at `positions` applied to q and k."""
        x = torch.cat([self.embed_norm(token_embeds), self.feature_norm(feature)], -1)
        shape = x.shape[:-1]
        q, k, v = self.products(("q", "k", "v"), x)
        q = q.view(*shape, self.heads, self.head_dim)
        k, v = (t.view(*shape, self.kv_heads, self.head_dim) for t in (k, v))
        theta = self.cfg["rope_theta"]
        return rotary(q, positions, theta), rotary(k, positions, theta), v

    def finish(self, feature: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's output g from its input feature and the attention result [..., heads * d]."""
        x = feature + self.o(attended)
        h = self.mlp_norm(x)
        gate, up = self.products(("gate", "up"), h)
        return x + self.down(F.silu(gate) * up)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (index j is token draft_ids[j])."""
        return self.head(self.norm(g))

    # ---- training --------------------------------------------------------------------------------

    def _unroll(self, batch: dict):
        """Training-time test over a padded batch: per step j, the layer's output at every pair, and
        the pairs that count (the chain start t - j exists and the target of pair t is trained)."""
        tokens, mask = batch["tokens"], batch["mask"]
        states, last = batch["hidden"][..., :-1, :], batch["hidden"][..., -1, :]
        B, T = tokens.shape
        device = tokens.device
        positions = torch.arange(T, device=device).expand(B, T)
        next_embeds = self.embed[F.pad(tokens[:, 1:], (0, 1))]  # pair t reads token t + 1
        # Pair t predicts token t + 2, whose target distribution is stored at position t + 1.
        target_ids, target_probs = batch["top_ids"][:, 1:], batch["top_probs"][:, 1:]
        to_draft = torch.full((self.cfg["vocab_size"],), -1, dtype=torch.long, device=device)
        to_draft[self.draft_ids] = torch.arange(len(self.draft_ids), device=device)
        index, weights, inside = draft_targets(target_ids, target_probs, to_draft)
        index, weights = F.pad(index, (0, 0, 0, 1)), F.pad(weights, (0, 0, 0, 1))
        trained = F.pad(mask[:, 1:] & inside, (0, 1))
        feature = self.fuse(states)
        keys, values, outputs = [], [], []
        for j in range(self.cfg["ttt_steps"]):
            q, k, v = self.project(feature, next_embeds, positions)
            keys.append(k.transpose(1, 2))  # [B, kv_heads, T, d]
            values.append(v.transpose(1, 2))
            # Pair t attends to the true pairs up to t - j, and to the chain of pairs drafted at
            # steps 1..j, one each: step i's pair t - j + i. As one attention over the keys of
            # every step laid side by side, each step's shifted so that its column t holds pair
            # t - j + i: a fused kernel then never writes the T x T scores out.
            def side_by_side(steps: list[torch.Tensor], j: int = j) -> torch.Tensor:
                return torch.cat([steps[0]] + [F.pad(x, (0, 0, j - i, 0))[..., :T, :]
                                               for i, x in enumerate(steps[1:], start=1)], 2)

            attended = F.scaled_dot_product_attention(q.transpose(1, 2), side_by_side(keys), side_by_side(values),
                                                      attn_mask=ttt_mask(T, j, device), enable_gqa=True)
            g = self.finish(feature, attended.transpose(1, 2).reshape(B, T, -1))
            valid = trained & (positions >= j)
            outputs.append((g, valid))
            feature = F.pad(g[:, :-1], (0, 0, 1, 0))  # pair t of the next step reads g of pair t - 1
        goal = F.pad(last[:, 1:], (0, 0, 0, 1))  # pair t's output should be the target's state at t + 1
        return outputs, index, weights, goal

    def _scored(self, batch: dict, with_hits: bool):
        """Per step: its loss (soft cross-entropy plus REGRESSION x the feature regression) and its
        top-1 hits (None without `with_hits`), the output head run at labelled pairs only."""
        outputs, index, weights, goal = self._unroll(batch)
        scored = []
        for g, valid in outputs:
            ce, hits = at_rows(valid, lambda rows, g=g: self.logits(g[rows]), index, weights, with_hits)
            reg = feature_regression(g[valid], goal[valid])
            scored.append((ce + REGRESSION * reg, hits, valid))
        return scored

    def loss(self, batch: dict):
        total, metrics = 0.0, {}
        for j, (step_loss, _, _) in enumerate(self._scored(batch, with_hits=False)):
            total = total + TTT_DECAY**j * step_loss
            metrics[f"loss@{j + 1}"] = float(step_loss.detach())
        return total, metrics

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        # Step j's pair t is depth j + 1 of the chain drafted at pair t - j: align on the start.
        correct, valid = [], []
        for j, (_, hits, ok) in enumerate(self._scored(batch, with_hits=True)):
            correct.append(F.pad(hits[:, j:], (0, j)))
            valid.append(F.pad(ok[:, j:], (0, j)))
        return chain_acceptance(correct, valid)
