"""What a selection strategy sees (the context) and what it proposes (a candidate), plus the
strategy interface and its registry. Proposing is separate from applying: strategies never touch
the network; the minimization loop applies, retrains, judges and reports back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from torch import Tensor

from selfscale.errors import ConfigError
from selfscale.model import FCN


@dataclass(frozen=True)
class Candidate:
    """One proposed alteration: disable mask ``mask`` of layer ``layer``, or remove hidden layer
    ``layer`` (``kind='layer'``, ``mask=None``). Indices refer to the *current* network."""

    kind: Literal["mask", "layer"]
    layer: int
    mask: int | None = None

    def describe(self) -> str:
        if self.kind == "layer":
            return f"layer {self.layer + 1}"
        return f"layer {self.layer + 1} mask {self.mask + 1}"


@dataclass
class SelectionContext:
    """Everything a strategy may look at when it proposes the next candidate."""

    model: FCN
    """The current accepted network, with its switches (read only)."""
    prunable: list[tuple[int, int]]
    """(layer, mask) pairs that may be disabled now: enabled, not in the output layer, and not
    the last enabled mask of their layer. Always sorted by (layer, mask)."""
    failed: set[Candidate]
    """Candidates stepped back since the last kept change; never propose one of them again until
    a change is kept (the loop also refuses them)."""
    step: int
    """Minimization steps (decisions) made so far."""
    rng: np.random.Generator
    """The loop's seeded generator (saved with the minimization state)."""
    batches: Callable[[], Iterator[tuple[Tensor, Tensor]]]
    """Yields (input, target) eval batches on the model's device, for data-driven strategies."""
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    """The training loss, for gradient-based importance (taylor)."""
    trial: Callable[[Candidate], float] | None = None
    """Score of the network after applying ``candidate`` and a short retrain; the network is
    restored afterwards (used by the oracle strategy)."""


class Strategy(ABC):
    """A selection strategy (thesis 2.4.3): proposes a candidate or ``None`` to stop."""

    name: ClassVar[str]

    @abstractmethod
    def propose(self, ctx: SelectionContext) -> Candidate | None:
        """The next candidate to try, or None when the strategy's stop criterion is met."""

    def update(self, candidate: Candidate, kept: bool) -> None:
        """Told after every decision whether ``candidate`` was kept or stepped back."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings, lists, dicts) to resume the strategy exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""


@dataclass
class StrategyOptions:
    """Options shared by the strategies (each uses the ones that concern it)."""

    patience: int = 2
    """Ranked strategies stop after this many consecutive step-backs (thesis cosmax: 2); after
    the k-th consecutive failure the (k+1)-th ranked mask is tried."""
    max_steps: int = 10
    """random: stop after this many minimization steps (thesis 4.3: 10)."""
    oracle_steps: int = 200
    """oracle: length of the short retrain used to try each enabled mask."""

    def __post_init__(self) -> None:
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ConfigError(f"--patience: must be a positive integer, got {self.patience!r}")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ConfigError(f"--random-steps: must be a positive integer, got {self.max_steps!r}")
        if not (isinstance(self.oracle_steps, int) and self.oracle_steps >= 0):
            raise ConfigError(f"--oracle-steps: must be a non-negative integer, "
                              f"got {self.oracle_steps!r}")


STRATEGIES: dict[str, Callable[[StrategyOptions], Strategy]] = {}
"""Registry: strategy name → factory taking the shared options."""


def register_strategy(name: str):
    """Class decorator: ``@register_strategy("l1")`` makes the strategy selectable by name."""

    def deco(factory):
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        STRATEGIES[name] = factory
        return factory

    return deco


def make_strategy(name: str, options: StrategyOptions | None = None) -> Strategy:
    """A fresh strategy by name; an unknown name → ConfigError listing the known ones."""
    import selfscale.minimize.strategies  # noqa: F401  (fills the registry)

    if name not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown strategy {name!r}; choose from "
                          + ", ".join(sorted(STRATEGIES)))
    return STRATEGIES[name](options or StrategyOptions())
