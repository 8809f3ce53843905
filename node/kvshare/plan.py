"""Whether to fetch a peer's prefix cache or compute it here, from the node's own measured rates. Pure."""

from __future__ import annotations

from dataclasses import dataclass


class RateMeter:
    """A moving average of a rate (units per second) from observed (amount, seconds) pairs; None until the
    first observation. Recent observations weigh more, so the estimate follows a changing load."""

    def __init__(self, weight: float = 0.3) -> None:
        if not 0 < weight <= 1:
            raise ValueError("weight must be in (0, 1]")
        self.weight = weight
        self.rate: float | None = None
        self.samples = 0

    def observe(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:
            return  # nothing measurable (an empty or instantaneous step) says nothing about the rate
        rate = amount / seconds
        self.rate = rate if self.rate is None else (1 - self.weight) * self.rate + self.weight * rate
        self.samples += 1


@dataclass(frozen=True)
class FetchPlan:
    fetch: bool
    reason: str
    deadline_s: float = 0.0  # give up on the fetch (and compute locally) after this long
    estimated_fetch_s: float | None = None
    estimated_compute_s: float | None = None


def plan_fetch(
    prefix_tokens: int,
    bytes_per_token: int,
    compute_tokens_per_s: float | None,
    fetch_bytes_per_s: float | None,
    *,
    min_tokens: int = 1,
    overhead_s: float = 0.02,
    unmeasured_deadline_s: float = 30.0,
    min_deadline_s: float = 0.05,
) -> FetchPlan:
    """Fetch when moving the prefix's bytes is expected to take less than computing its tokens here.

    The deadline is the local compute time of the prefix: a fetch that takes longer has already lost, so it
    is abandoned and the node computes (at worst about twice the local time). With no local rate measured yet
    the fetch is tried under a generous deadline: its outcome gives the first measurement."""
    if prefix_tokens < max(1, min_tokens):
        return FetchPlan(False, f"shared prefix of {prefix_tokens} tokens is under the minimum of {min_tokens}")
    fetch_s = None
    if fetch_bytes_per_s:
        fetch_s = overhead_s + prefix_tokens * bytes_per_token / fetch_bytes_per_s
    if not compute_tokens_per_s:
        return FetchPlan(True, "no local prefill rate measured yet", unmeasured_deadline_s, fetch_s, None)
    compute_s = prefix_tokens / compute_tokens_per_s
    if fetch_s is not None and fetch_s >= compute_s:
        return FetchPlan(
            False, f"fetching ~{fetch_s:.3f}s is slower than computing ~{compute_s:.3f}s here", 0.0, fetch_s, compute_s
        )
    return FetchPlan(True, "fetching is expected to be faster", max(compute_s, min_deadline_s), fetch_s, compute_s)
