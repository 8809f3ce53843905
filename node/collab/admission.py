"""Admission control for collaborative work: a node takes on work only while its queue stays stable.

Distributed mixture-of-agents keeps a node's queue stable only while

    alpha * ((K + 1) * M + 1) * lambda < 1

where alpha is the node's mean service time per job, lambda the rate of user prompts per device, K the
peers asked per layer and M the proposer layers (each prompt costs (K+1)*M proposals and one aggregation).
Near 1 the mean queue explodes (simulated: 1.0 / 3.5 / 17 / 504 jobs at rho 0.5 / 0.8 / 0.95 / 1.1), so we
admit only under a configurable bound (default 0.8) and keep a hard cap on the queue as a backstop.

Two decisions, both pure (the clock is passed in):
- `plan_round`: the origin of a prompt lowers K first, then M, and refuses with a retry-after when even
  K = M = 1 would cross the bound.
- `admit_job`: a node asked to run one job admits it while alpha * lambda_jobs stays under the bound and the
  queue has room, else answers overloaded with a retry-after.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

DEFAULT_BOUND = 0.8
DEFAULT_WINDOW_S = 2.0
# A rate measured over a window shorter than a few service times says nothing (one 25 s job in a 2 s window
# reads as rho 12): the window stretches to hold at least this many jobs at the bound.
JOBS_PER_WINDOW = 5
MAX_WINDOW_S = 600.0
MAX_EVENTS = 100_000
DEFAULT_MAX_QUEUE = 8
MIN_RETRY_AFTER_S = 0.05


def jobs_per_prompt(k: int, m: int) -> int:
    """Inference jobs one collaborative prompt causes across the mesh: (K+1) proposers in M layers, 1 aggregation."""
    return (k + 1) * m + 1


def utilisation(alpha_s: float, k: int, m: int, prompt_rate: float) -> float:
    """rho = alpha * ((K+1)*M+1) * lambda: the per-device load a prompt rate causes."""
    return alpha_s * jobs_per_prompt(k, m) * prompt_rate


@dataclass
class RateWindow:
    """Event times over a horizon; counts and rates over any window up to it."""

    horizon_s: float = MAX_WINDOW_S
    times: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))

    def expire(self, now: float) -> None:
        while self.times and self.times[0] <= now - self.horizon_s:
            self.times.popleft()

    def count(self, now: float, window_s: float) -> int:
        self.expire(now)
        n = 0
        for t in reversed(self.times):  # newest first: stops at the window's edge
            if t <= now - window_s:
                break
            n += 1
        return n

    def rate(self, now: float, window_s: float) -> float:
        return self.count(now, window_s) / window_s

    def add(self, now: float) -> None:
        self.expire(now)
        self.times.append(now)

    def wait_until_at_most(self, now: float, window_s: float, allowed: int) -> float:
        """Seconds until no more than `allowed` events remain in the window (0 if already so)."""
        n = self.count(now, window_s)
        excess = n - max(allowed, 0)
        if excess <= 0:
            return 0.0
        oldest_in_window = len(self.times) - n
        return max(self.times[oldest_in_window + excess - 1] + window_s - now, 0.0)


@dataclass
class ServiceTime:
    """Exponential moving average of job service times; None until the first job finished."""

    weight: float = 0.2
    mean_s: float | None = None

    def add(self, seconds: float) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            return
        self.mean_s = seconds if self.mean_s is None else (1 - self.weight) * self.mean_s + self.weight * seconds


@dataclass(frozen=True)
class RoundPlan:
    """What the origin may run: K peers per layer, M layers, and the utilisation that predicts."""

    k: int
    m: int
    rho: float
    degraded: bool


@dataclass(frozen=True)
class Overloaded:
    """Refusal: try again after `retry_after_s`; `reason` says which limit was hit."""

    retry_after_s: float
    reason: str


@dataclass
class AdmissionController:
    """One node's admission state. `concurrency` jobs run at once, so alpha = service time / concurrency."""

    bound: float = DEFAULT_BOUND
    max_queue: int = DEFAULT_MAX_QUEUE
    concurrency: int = 1
    window_s: float = DEFAULT_WINDOW_S
    enabled: bool = True
    service: ServiceTime = field(default_factory=ServiceTime)
    admitted_jobs: RateWindow = field(default_factory=RateWindow)
    started_rounds: RateWindow = field(default_factory=RateWindow)
    queue_length: int = 0  # admitted jobs waiting or running
    max_queue_seen: int = 0
    admitted_total: int = 0
    rejected_total: int = 0
    rounds_degraded: int = 0
    rounds_rejected: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.bound <= 1:
            raise ValueError("the admission bound must be in (0, 1]")
        if self.max_queue < 1 or self.concurrency < 1 or self.window_s <= 0:
            raise ValueError("max_queue and concurrency must be at least 1 and the window positive")

    def window_for(self, busy_s: float) -> float:
        """The measuring window for work that keeps the node busy `busy_s` per event."""
        return min(MAX_WINDOW_S, max(self.window_s, JOBS_PER_WINDOW * busy_s / self.bound))

    @property
    def alpha_s(self) -> float:
        """Mean time the node is busy per job (0 until measured: nothing known, nothing refused on rate)."""
        return (self.service.mean_s or 0.0) / self.concurrency

    # -- one job asked of this node ------------------------------------------------------------
    def admit_job(self, now: float, force: bool = False) -> Overloaded | None:
        """Admit one job (counting it in the queue) or refuse it. Call `job_done` for every admitted job.

        `force` admits without checks: the origin's own share of a round it already admitted."""
        if self.enabled and not force:
            refusal = self._job_refusal(now)
            if refusal is not None:
                self.rejected_total += 1
                return refusal
        self.admitted_jobs.add(now)
        self.admitted_total += 1
        self.queue_length += 1
        self.max_queue_seen = max(self.max_queue_seen, self.queue_length)
        return None

    def _job_refusal(self, now: float) -> Overloaded | None:
        alpha = self.alpha_s
        if self.queue_length >= self.max_queue:
            # The queue drains one job per alpha seconds.
            wait = max(alpha * (self.queue_length - self.max_queue + 1), MIN_RETRY_AFTER_S)
            return Overloaded(wait, f"queue full ({self.queue_length} of {self.max_queue})")
        if alpha > 0:
            window = self.window_for(alpha)
            rho = alpha * (self.admitted_jobs.count(now, window) + 1) / window
            if rho >= self.bound:
                allowed = math.ceil(self.bound * window / alpha) - 2  # leave room for this job
                wait = max(self.admitted_jobs.wait_until_at_most(now, window, allowed), MIN_RETRY_AFTER_S)
                return Overloaded(wait, f"utilisation {rho:.2f} would reach the bound {self.bound}")
        return None

    def job_done(self, service_time_s: float | None) -> None:
        """An admitted job left the queue; `service_time_s` is its running time (None if it never ran)."""
        self.queue_length = max(self.queue_length - 1, 0)
        if service_time_s is not None:
            self.service.add(service_time_s)

    # -- one prompt originated here ------------------------------------------------------------
    def plan_round(self, now: float, k: int, m: int, alpha_s: float | None = None) -> RoundPlan | Overloaded:
        """Largest (K, M) at or below the request whose utilisation stays under the bound: K first, then M.

        `alpha_s` overrides the node's own (the slowest selected peer's, for mixed hardware: alpha_max)."""
        if k < 1 or m < 1:
            raise ValueError("K and M must be at least 1")
        alpha = max(self.alpha_s, alpha_s or 0.0)
        window = self.window_for(alpha * jobs_per_prompt(1, 1))
        rate = (self.started_rounds.count(now, window) + 1) / window
        if not self.enabled or alpha <= 0:
            self.started_rounds.add(now)
            return RoundPlan(k, m, utilisation(alpha, k, m, rate), degraded=False)
        candidates = [(kk, m) for kk in range(k, 0, -1)] + [(1, mm) for mm in range(m - 1, 0, -1)]
        for kk, mm in candidates:
            rho = utilisation(alpha, kk, mm, rate)
            if rho < self.bound:
                self.started_rounds.add(now)
                degraded = (kk, mm) != (k, m)
                self.rounds_degraded += degraded
                return RoundPlan(kk, mm, rho, degraded)
        self.rounds_rejected += 1
        # Wait until the smallest round fits: rounds in window < bound * W / (alpha * jobs(1,1)) - 1.
        allowed = math.ceil(self.bound * window / (alpha * jobs_per_prompt(1, 1))) - 2
        wait = max(self.started_rounds.wait_until_at_most(now, window, allowed), MIN_RETRY_AFTER_S)
        return Overloaded(wait, f"utilisation {utilisation(alpha, 1, 1, rate):.2f} at K=M=1 reaches {self.bound}")

    def admitted_rate(self, now: float) -> float:
        return self.admitted_jobs.rate(now, self.window_for(self.alpha_s))

    def stats(self, now: float) -> dict[str, float | int | bool | None]:
        return {
            "enabled": self.enabled,
            "bound": self.bound,
            "queue_length": self.queue_length,
            "queue_capacity": self.max_queue,
            "max_queue_seen": self.max_queue_seen,
            "admitted": self.admitted_total,
            "admitted_rate": self.admitted_rate(now),
            "rejected": self.rejected_total,
            "rounds_degraded": self.rounds_degraded,
            "rounds_rejected": self.rounds_rejected,
            "mean_service_time_s": self.service.mean_s,
            "utilisation": self.alpha_s * self.admitted_rate(now),
        }
