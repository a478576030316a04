"""The minimization's whole state, saved after every decision (:mod:`selfscale.minimize.loop`
runs it): the snapshot network, the strategy's and the loop's bookkeeping, the decision log."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from selfscale.config import MinimizeConfig
from selfscale.minimize.proposal import Candidate
from selfscale.train import TrainState


@dataclass
class Minimization:
    """The minimization's whole state (its checkpoint)."""

    config: MinimizeConfig
    current: TrainState
    """The last accepted network: the snapshot a failed change steps back to."""
    origin: list[list[int]]
    """For each current layer: [original layer index, original mask indices …]."""
    orig_widths: list[int]
    base_scores: dict[str, float]
    reference: float
    rng: np.random.Generator
    step: int = 0
    phase: str = "free"
    free: list[tuple[int, int]] = field(default_factory=list)
    """Nearly dead masks found at the start, tried first without retraining (minimize.finish)."""
    finetune: dict[str, Any] | None = None
    """Once the fine-tune started: its start step, length, and the scores before it."""
    failed: list[Candidate] = field(default_factory=list)
    tested: list[tuple[int, int]] = field(default_factory=list)
    tried_layers: list[int] = field(default_factory=list)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    steps_trained: int = 0
    seconds: float = 0.0
    standing: float = 1.0
    """--judge paired, --reference base: the snapshot's judged ratio to the base (the product of
    the paired ratios of the changes kept so far)."""
    paired: dict[str, Any] | None = None
    """--judge paired: the snapshot retrained (unchanged, on the trials' batches), by length."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "current": self.current.to_dict(),
            "origin": self.origin,
            "orig_widths": self.orig_widths,
            "base_scores": self.base_scores,
            "reference": self.reference,
            "rng": self.rng.bit_generator.state,
            "step": self.step,
            "phase": self.phase,
            "free": [list(f) for f in self.free],
            "finetune": self.finetune,
            "failed": [c.to_plain() for c in self.failed],
            "tested": [list(t) for t in self.tested],
            "tried_layers": self.tried_layers,
            "strategy_state": self.strategy_state,
            "log": self.log,
            "steps_trained": self.steps_trained,
            "seconds": self.seconds,
            "standing": self.standing,
            "paired": self.paired,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], device: torch.device) -> Minimization:
        rng = np.random.default_rng()
        rng.bit_generator.state = raw["rng"]
        return cls(
            config=MinimizeConfig(**raw["config"]),
            current=TrainState.from_dict(raw["current"], device),
            origin=[list(o) for o in raw["origin"]],
            orig_widths=list(raw["orig_widths"]),
            base_scores=dict(raw["base_scores"]),
            reference=float(raw["reference"]),
            rng=rng,
            step=int(raw["step"]),
            phase=str(raw["phase"]),
            free=[(int(a), int(b)) for a, b in raw["free"]],
            finetune=raw["finetune"],
            failed=[Candidate.from_plain(item) for item in raw["failed"]],
            tested=[(int(a), int(b)) for a, b in raw["tested"]],
            tried_layers=[int(x) for x in raw["tried_layers"]],
            strategy_state=dict(raw["strategy_state"]),
            log=list(raw["log"]),
            steps_trained=int(raw["steps_trained"]),
            seconds=float(raw.get("seconds", 0.0)),
            standing=float(raw.get("standing", 1.0)),
            paired=raw.get("paired"),
        )


def clone_state(state: TrainState) -> TrainState:
    """An independent copy: weights, switches, optimizer, generators, step and history."""
    device = next(state.model.parameters()).device
    return TrainState.from_dict(copy.deepcopy(state.to_dict()), device)
