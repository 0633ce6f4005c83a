"""`lud`: Lexical Unit Decoding, the target itself guessing the next tokens in the verify forward.

Sun et al. 2024, "Decoding at the Speed of Thought: Harnessing Parallel Decoding of Lexical Units
for LLMs"; trained here as Parallel Prompt Decoding trains (Chen et al. 2024): the target frozen,
only the placeholders' inputs learned (heads/lud.py, `fastdecode train --heads lud`).

Each verify forward holds the root, the draft chain, and k placeholder rows hanging after the root
(Drafter.placeholders): placeholder j (1..k) sits at the root's position n + j, sees the committed
text, the root and placeholders 1..j, and its logits guess token n + j + 1. No draft row sees a
placeholder, and every kernel treats rows independently, so verification is plain decoding's.

Which guesses become the next draft. The step keeps a drafted tokens and adds the bonus, so the
next root is token n + a + 1 and the next draft starts at n + a + 2: placeholder a + 1's guess,
then a + 2's, up to k's. Why hang the placeholders after the root and not after the draft: the
root is the only row certain to be committed, so its chain is always usable, at the price of
guessing from a context that lacks the a + 1 tokens this step adds; hanging a chain after every
draft node would condition on them but multiply the placeholder rows by the draft's length, and
on a CPU each row costs (runtime/cost_curve.py). When all k guesses are used up (a = k) the next
step drafts nothing and only refills its guesses: with one placeholder, the default on a CPU, that
is every step after an accepted draft token. `hang_above` covers that case: when the draft's first
node scores above it, a second chain hangs after that node (DraftTree.hangs), and if the node is
accepted the next draft comes from that chain, which saw it. On a 2-core Xeon (AMX path, 24
Spec-Bench questions, 128 tokens) hanging it always drafted on 88% of the steps instead of 69% and
raised the tokens per forward from 1.29 to 1.34, but the sixth row cost more than that gained:
1.00-1.01x of ar, against 1.03-1.04x never hanging and 1.03-1.04x hanging above 0.3-0.5. So by
default it never hangs (1.0); where rows are nearly free, as on a GPU, 0 should pay.

Greedy drafts are the guesses' argmax; sampled drafts are drawn from the guesses' distributions
after the request's temperature / top-k / top-p, which go along as draft probabilities, so
rejection sampling keeps the output exact (runtime/verify.py). A node's score is its calibrated
probability (acceptance.Calibration, per placeholder) times its parent's; the engine cuts the chain
where it stops paying, counting the placeholder rows as a fixed cost of the step.

`lud-confidence` is the paper's own rule and is LOSSY: guesses whose probability is at least
`threshold` are accepted without verification (DraftTree.trusted), the rest verified as above.
"""
from __future__ import annotations

import torch

from ..runtime.sampling import is_int, is_number, target_probabilities
from ..runtime.tree import DraftTree
from .acceptance import Calibration
from .base import DecodeState, StepResult, Target, check_options
from .trained import load_trained

# Placeholder rows per step. Each is a verify row every step, paid whether its guess is used or not:
# on a 2-core Xeon (AMX path; 1 row 9.5 ms, 2 rows 1.08x) one paid best on 18 Spec-Bench questions,
# 1.09x of ar against 0.96x with two (top_k 3), and with three 0.90x (top_k 1). A GPU, where rows
# are nearly free, wants all the file was trained with.
PLACEHOLDERS = 1


class LUD:
    name = "lud"
    summary = "Lexical Unit Decoding: trained placeholder rows in the verify forward guess the next tokens (needs a trained file)"
    lossless = True
    needs_target = True

    def __init__(self, target: Target, head: str | None = None, placeholders: int = PLACEHOLDERS, top_k: int = 3,
                 hang_above: float = 1.0):
        trained_file, self.card, path = load_trained("lud", target, head, noun="file", method=self.name)
        trained = trained_file.count
        check_options(self.name, [(lambda: is_int(placeholders) and 1 <= placeholders <= trained,
                                   f"placeholders must be an integer from 1 to {trained}, the count {path} was trained with"),
                                  (lambda: is_int(top_k) and 1 <= top_k <= 16, "top_k must be an integer from 1 to 16"),
                                  (lambda: is_number(hang_above) and 0 <= hang_above <= 1, "hang_above must be in [0, 1]")])
        self.top_k, self.hang_above = top_k, hang_above
        self.placeholders = trained_file.shifts.detach()[:placeholders].float().contiguous()
        self.eos_ids = target.tokenizer.eos_ids
        self.calibration = Calibration()  # kept across requests
        self.begin([])

    def begin(self, prompt_ids: list[int]) -> None:
        self._guesses: torch.Tensor | None = None  # [m, vocab]: logits for the tokens after the next root
        self._first = 0  # the placeholder that made _guesses[0]
        self._proposed: list[tuple] = []  # (calibration context, probability) per proposed node
        self.generator = None

    def propose(self, state: DecodeState, budget: int) -> DraftTree:
        if budget <= 0 or self._guesses is None or not len(self._guesses):
            self._proposed = []
            return DraftTree()
        params = state.params
        if not params.greedy and self.generator is None:  # the drafter's own stream, never the verifier's
            self.generator = torch.Generator().manual_seed(((params.seed or 0) * 7919 + 31) % 2**63)
        chain, siblings = [], []  # (token, its probability, its q row or None, calibration context)
        for j, logits in enumerate(self._guesses[:budget]):
            context = (params.greedy, self._first + j)
            drawn = [(*c, context) for c in self._candidates(logits, params, self.top_k if j == 0 else 1)]
            chain.append(drawn[0])
            siblings += drawn[1:]
            if drawn[0][0] in self.eos_ids:
                break
        siblings = siblings[: budget - len(chain)]
        nodes = chain + siblings  # the chain first (trusted nodes must lead), then the first guess's alternatives
        scores = []
        for i, (_, q, _, context) in enumerate(nodes):
            above = scores[i - 1] if 0 < i < len(chain) else 1.0
            scores.append(above * self.calibration.rate(context, q))
        self._proposed = [(context, q) for _, q, _, context in nodes]
        rows = [row for _, _, row, _ in nodes]
        tree = DraftTree([t for t, *_ in nodes], list(range(-1, len(chain) - 1)) + [-1] * len(siblings), scores=scores,
                         draft_probs=None if params.greedy else torch.stack(rows),
                         hangs=[-1, 0] if scores[0] > self.hang_above else None)  # a chain after the first node too
        return self._trust(tree, [q for _, q, _, _ in chain])

    def _candidates(self, logits: torch.Tensor, params, k: int) -> list[tuple[int, float, torch.Tensor | None]]:
        """The k most likely tokens of a guess under greedy, each with its probability; under sampling
        k draws without replacement from the guess's distribution, each with the distribution it was
        drawn from (the earlier draws removed), as exact rejection sampling needs."""
        if params.greedy:
            top = torch.softmax(logits.float(), -1).topk(k)
            return [(int(t), float(q), None) for q, t in zip(top.values, top.indices)]
        q = target_probabilities(logits.float()[None], params)[0]
        drawn = []
        for _ in range(k):
            if not q.sum() > 0:
                break
            q = q / q.sum()
            token = int(torch.multinomial(q, 1, generator=self.generator))
            drawn.append((token, float(q[token]), q.clone()))
            q[token] = 0.0
        return drawn

    def _trust(self, tree: DraftTree, probs: list[float]) -> DraftTree:
        """The lossless method trusts nothing: every node is verified."""
        return tree

    def guessed(self, placeholder_logits: torch.Tensor) -> None:
        """After the prompt: the placeholders hung after its last token, so the first step's root
        (the first generated token) is what the root row predicted, and guess 1 is its successor."""
        self._first, self._guesses = 0, placeholder_logits

    def observe(self, result: StepResult) -> None:
        if len(result.tree) == len(self._proposed):
            taken = set(result.accepted)
            for node in result.tried():
                self.calibration.record(*self._proposed[node], node in taken)
        self._guesses = None
        if result.placeholder_logits is not None:  # from the deepest accepted chain, one past the next root
            path = [-1] + result.accepted
            depth = max(d for d, node in enumerate(path) if node in result.placeholder_logits)
            self._first = len(path) - 1 - depth
            self._guesses = result.placeholder_logits[path[depth]][self._first :]


class LUDConfidence(LUD):
    name = "lud-confidence"
    summary = "LUD as published: guesses at least `threshold` likely are accepted unverified (needs a trained file)"
    lossless = False

    def __init__(self, target: Target, head: str | None = None, placeholders: int = PLACEHOLDERS, top_k: int = 3,
                 hang_above: float = 1.0, threshold: float = 0.8):
        check_options(self.name, [(lambda: is_number(threshold) and 0 < threshold <= 1, "threshold must be in (0, 1]")])
        super().__init__(target, head, placeholders, top_k, hang_above)
        self.threshold = threshold

    def _trust(self, tree: DraftTree, probs: list[float]) -> DraftTree:
        """The chain's first nodes, while each is at least `threshold` likely, are taken as they are."""
        trusted = next((i for i, p in enumerate(probs) if p < self.threshold), len(probs))
        tree.trusted = trusted
        tree.keep = [i < trusted for i in range(len(tree))]
        return tree
