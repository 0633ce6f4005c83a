"""Per-request statistics, with vLLM's definitions of the speculative-decoding figures.

A draft is one non-empty proposal; mean acceptance length = 1 + accepted / drafts (the bonus token
counts, as Spec-Bench's "mean accepted tokens" does); acceptance rate = accepted / drafted.
With nothing drafted (plain decoding) every step yields exactly one token, so the mean acceptance
length is 1 and the acceptance rate is undefined (None, null in JSON).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt rows the prefix cache held (not prefilled) when the request began
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    forward_passes: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts whose node at depth k+1 was accepted
    accepted_lengths: list[int] = field(default_factory=list)  # per draft: tokens its verification kept (accepted + 1)

    def record_step(self, draft_size: int, accepted: int) -> None:
        self.forward_passes += 1
        if draft_size == 0:
            return
        self.drafts += 1
        self.draft_tokens += draft_size
        self.accepted_tokens += accepted
        self.accepted_lengths.append(accepted + 1)
        if len(self.accepted_per_position) < accepted:
            self.accepted_per_position += [0] * (accepted - len(self.accepted_per_position))
        for k in range(accepted):
            self.accepted_per_position[k] += 1

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.wall_time_s - self.prefill_time_s
        return (self.num_generated_tokens - 1) / decode_time if decode_time > 0 else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    def to_dict(self) -> dict:
        return {
            "wall_time_s": round(self.wall_time_s, 4),
            "prefill_time_s": round(self.prefill_time_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "forward_passes": self.forward_passes,
            "drafts": self.drafts,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4),
            "accepted_per_position": list(self.accepted_per_position),
            "accepted_lengths": list(self.accepted_lengths),
        }
