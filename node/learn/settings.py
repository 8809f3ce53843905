"""The learning protocol's settings; each is also a `learn_<name>` key of the node config (no heavy imports:
the config loads this on nodes that run no model)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LearnSettings:
    round_deadline_s: float = 900.0  # a round not finished by then closes with the rewards it has
    round_interval_s: float = 60.0  # least time between the starts of two rounds
    takeover_s: float = 30.0  # the i-th matchmaker candidate acts after i of these
    member_ttl_s: float = 120.0  # membership records expire unless refreshed
    transfer_prompts: int = 32  # public prompts a teacher answers per round
    max_tokens: int = 256  # per teacher answer
    teacher_votes: int = 1  # samples per transfer prompt; >1: a teacher sends only answers most samples agree on
    local_steps: int = 60  # training steps on the node's own data
    round_steps: int = 30  # training steps of a student per round
    lr: float = 1e-3
    latency_target_s: float = 0.5  # per token, for requests served while a shadow trains
    min_training_share: float = 0.05  # of the engine's time, for training under load that leaves it no room
    # Shared validation examples per category of the built-in task family. The matchmaker's profiles are
    # per-category accuracies: with 4, the better validator of a pair was the better agent in 71% of pairs,
    # with 16 in 86% (bench/profile_noise.py).
    public_validation: int = 16
    # The built-in family of the shared validation and transfer sets (tasks.FAMILIES). "learnable": on "hard" a
    # teacher answers its own slice mostly wrong, so peers barely help (the distillation benchmark).
    task_family: str = "learnable"
    transfer_file: str = ""  # a given public transfer set, JSONL of {"prompt"} rows; empty: the shipped one
    tick_s: float = 1.0  # not a config key: how often the node looks at the ledger's learning records
    val_fraction: float = 0.2  # not a config key
