"""What a reply cost: the timings `LanguageModel.stats` keeps, and the token counts a reply reports (OpenAI's `usage`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values the cache already held (not prefilled)
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    accepted_tokens: int = 0  # drafted tokens the model confirmed (speculative decoding)
    rejected_tokens: int = 0  # drafted tokens verified and thrown away
    speculative_passes: int = 0  # verification passes (each one forward pass over the drafted tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        new = self.prompt_tokens - self.cached_tokens
        return new / self.time_to_first_token_s if self.time_to_first_token_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes out of prefill; the rest each cost one decode step (or share a verification pass).
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    speculative_passes: int = 0

    @classmethod
    def of(cls, stats: GenerationStats) -> "Usage":
        return cls(stats.prompt_tokens, stats.generated_tokens, stats.cached_tokens, stats.accepted_tokens, stats.rejected_tokens,
                   stats.speculative_passes)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        """OpenAI's usage object (Predicted Outputs' counts in `completion_tokens_details`, with edgeq's pass count)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"accepted_prediction_tokens": self.accepted_prediction_tokens,
                                              "rejected_prediction_tokens": self.rejected_prediction_tokens,
                                              "speculative_passes": self.speculative_passes}}
