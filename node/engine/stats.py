"""Moving averages of the engine's throughput and service time; they feed the ledger profile."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MovingAverage:
    """Exponential moving average; the first sample sets the value."""

    weight: float = 0.1
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - self.weight) * self.value + self.weight * sample


@dataclass
class EngineStats:
    requests_served: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    # Aggregate decode throughput of the whole batch, per decode step.
    tokens_per_s: MovingAverage = field(default_factory=MovingAverage)
    # Submission to final token, per request.
    service_time_s: MovingAverage = field(default_factory=MovingAverage)

    def record_step(self, tokens: int, seconds: float) -> None:
        self.tokens_generated += tokens
        if seconds > 0:
            self.tokens_per_s.add(tokens / seconds)

    def record_request(self, seconds: float) -> None:
        self.requests_served += 1
        self.service_time_s.add(seconds)

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "requests_served": self.requests_served,
            "requests_failed": self.requests_failed,
            "tokens_generated": self.tokens_generated,
            "tokens_per_s": self.tokens_per_s.value,
            "mean_service_time_s": self.service_time_s.value,
        }
