"""Chi-square goodness of fit for the sampling tests (no SciPy needed)."""
from __future__ import annotations

import torch


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of observed `counts` under `probs` (categories with zero probability must be empty;
    categories with a small expected count are pooled so the test stays valid)."""
    counts, probs = counts.double(), probs.double()
    total = counts.sum()
    assert counts[probs == 0].sum() == 0, "a token with probability 0 was drawn"
    expected = probs * total
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    statistic = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


def two_sample_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """P-value that two count vectors over the same categories come from one distribution
    (chi-square test of homogeneity; categories empty in both are dropped)."""
    a, b = a.double(), b.double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    total = a.sum() + b.sum()
    pooled = (a + b) / total
    statistic = ((a - pooled * a.sum()) ** 2 / (pooled * a.sum())).sum() + ((b - pooled * b.sum()) ** 2 / (pooled * b.sum())).sum()
    dof = len(a) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))
