"""Verification: which drafted nodes the target model accepts, plus its own next (bonus) token.

Pure functions over a DraftTree and the target's logits for the verify rows: row 0 is the root
(the last committed token), row i + 1 is draft node i; row r predicts the token after it.

Penalties and logit bias make a row's distribution depend on the drafted tokens before it:
`adjust(row, path_tokens)` then maps a row's raw logits to the ones plain decoding would use at that
position (runtime/penalties.py), and only the rows on the accepted path are ever adjusted.
"""
from __future__ import annotations

from typing import Callable

import torch

from .sampling import SamplingParams, sample, target_probabilities
from .tree import DraftTree


Adjust = Callable[[torch.Tensor, list[int]], torch.Tensor]


def row_logits(logits: torch.Tensor, row: int, tree: DraftTree, path: list[int], adjust: Adjust | None) -> torch.Tensor:
    """The logits plain decoding would sample from at verify row `row`, reached along `path`."""
    if adjust is None:
        return logits[row]
    return adjust(logits[row], [tree.tokens[node] for node in path])


def trusted_path(tree: DraftTree, eos_ids: frozenset[int]) -> list[int]:
    """The nodes a lossy drafter has accepted itself (tree.trusted), up to an end-of-sequence token.
    Empty for every lossless drafter: then verification alone decides."""
    path: list[int] = []
    for node in range(tree.trusted):
        path.append(node)
        if tree.tokens[node] in eos_ids:
            break
    return path


def verify_greedy(tree: DraftTree, logits: torch.Tensor, eos_ids: frozenset[int] = frozenset(),
                  adjust: Adjust | None = None) -> tuple[list[int], int]:
    """Longest root-to-leaf path whose every token is the target's argmax; returns (nodes, bonus).

    logits: [len(tree) + 1, vocab]. Nothing after an end-of-sequence token is accepted. A lossy
    drafter's trusted nodes are on the path whatever the argmax (trusted_path).
    """
    path = trusted_path(tree, eos_ids)
    row = path[-1] + 1 if path else 0
    best = int(row_logits(logits, row, tree, path, adjust).argmax())
    while not path or tree.tokens[path[-1]] not in eos_ids:
        parent = path[-1] if path else -1
        match = next((c for c in tree.children(parent) if tree.tokens[c] == best), None)
        if match is None:
            break
        path.append(match)
        row = match + 1
        best = int(row_logits(logits, row, tree, path, adjust).argmax())
    return path, best


def verify_sampling(
    tree: DraftTree,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    eos_ids: frozenset[int] = frozenset(),
    adjust: Adjust | None = None,
) -> tuple[list[int], int]:
    """Accepted nodes and a bonus token, distributed exactly as sampling from the target token by token.

    Recursive rejection sampling (SpecInfer; Chen et al. and Leviathan et al. for one child).
    At a node with target distribution p (after temperature / top-k / top-p / min-p), its children
    are tried in order. A child with token t drawn from the draft distribution q is accepted with
    probability min(1, p(t) / q(t)); on rejection p becomes the residual max(p - q, 0), renormalised,
    and the next sibling is tried against it. A child without draft probabilities is a point mass
    (q = 1 at t): accepted with probability p(t), else t is removed from p. When no child is
    accepted the bonus token is sampled from what is left of p, so every emitted token is an exact
    sample of the target given the tokens before it. This holds whatever rule chose the children,
    as long as it never looks at the verifier's random draws and a child's q is the distribution
    its token was drawn from given what the drafter knew (its earlier siblings included: children
    drawn without replacement carry q with the earlier ones removed). A row of zeros is a point mass.
    A lossy drafter's trusted nodes are taken first, unverified (trusted_path): that breaks exactness.
    """
    path = trusted_path(tree, eos_ids)
    if path and tree.tokens[path[-1]] in eos_ids:
        return path, tree.tokens[path[-1]]
    node = path[-1] if path else -1
    row = node + 1
    while True:
        p = target_probabilities(row_logits(logits, row, tree, path, adjust)[None], params)[0]
        accepted = None
        for child in tree.children(node):
            token = tree.tokens[child]
            q = None if tree.draft_probs is None else tree.draft_probs[child]
            if q is not None and not q[token] > 0:  # a point mass among sampled siblings
                q = None
            ratio = p[token] if q is None else p[token] / q[token]
            if torch.rand((), generator=generator) < ratio:
                accepted = child
                break
            residual = p.clone() if q is None else (p - q).clamp_(min=0.0)
            if q is None:
                residual[token] = 0.0
            # A rejection implies the residual has mass; only float rounding (q equal to p up to the
            # last bits) can empty it, and then p itself is the right distribution to go on with.
            if residual.sum() > 0:
                p = residual / residual.sum()
        if accepted is None:
            return path, int(sample(p[None], generator)[0])
        path.append(accepted)
        if tree.tokens[accepted] in eos_ids:  # nothing after the end is accepted; the bonus is never used
            return path, tree.tokens[accepted]
        node, row = accepted, accepted + 1
