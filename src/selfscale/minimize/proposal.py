"""What a selection strategy sees (the context), what it proposes (a candidate), and the strategy
interface. Proposing is separate from applying: strategies never touch the network; the
minimization loop applies, retrains, judges and reports back. The strategies themselves and
their registry live in :mod:`selfscale.minimize.strategies`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from torch import Tensor

from selfscale.config import MinimizeConfig
from selfscale.model import FCN


@dataclass(frozen=True)
class Candidate:
    """One proposed alteration: disable mask ``mask`` of layer ``layer``, or remove hidden layer
    ``layer`` (``kind='layer'``, ``mask=None``). Indices refer to the *current* network, except
    where a caller builds one from original indices to name it (the decision log)."""

    kind: Literal["mask", "layer"]
    layer: int
    mask: int | None = None

    def describe(self) -> str:
        """1-based text: ``"layer 2 mask 3"`` or ``"layer 1"``."""
        if self.kind == "layer":
            return f"layer {self.layer + 1}"
        return f"layer {self.layer + 1} mask {self.mask + 1}"

    def to_plain(self) -> list:
        """``[kind, layer, mask]`` with ``mask`` None for a layer: the saved-state form."""
        return [self.kind, self.layer, self.mask]

    @classmethod
    def from_plain(cls, item: list) -> Candidate:
        """Inverse of :meth:`to_plain`."""
        kind, layer, mask = item
        return cls(kind, int(layer), None if mask is None else int(mask))


@dataclass
class SelectionContext:
    """Everything a strategy may look at when it proposes the next candidate."""

    model: FCN
    """The current accepted network, with its switches (read only)."""
    prunable: list[tuple[int, int]]
    """(layer, mask) pairs that may be disabled now: enabled, not in the output layer, and not
    the last enabled mask of their layer. Always sorted by (layer, mask)."""
    failed: frozenset[Candidate]
    """Candidates stepped back since the last kept change (the loop's one list): never propose
    one of them again until a change is kept (the loop also refuses them). Its size is the number
    of consecutive step-backs, which the patience rules count."""
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
    """A selection strategy (thesis 2.4.3): proposes a candidate or ``None`` to stop.

    Built from the minimization's config, of which each strategy reads the fields that concern
    it (``patience``, ``random_steps``). ``name`` is set by ``register_strategy``."""

    name: ClassVar[str]

    def __init__(self, config: MinimizeConfig) -> None:
        self.config = config

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
