"""Selection strategies (thesis 2.4.3, 4.3): pure mask-ranking functions, then the strategies
that turn a ranking into the next candidate, and the registry that makes them selectable by name.

A *mask* is one output channel of a convolution: its k×k kernels over the input channels,
flattened, with its bias appended (thesis 2.4.3). Every ranking function looks only at the
*enabled* masks of a layer: disabled masks are left out of the similarity and distance
computations and get no score. The weights a mask applies to a *disabled* mask of the previous
layer (an input channel that is always zero) have no effect on the network, so the strategies
leave them out too (``inputs=`` below); a direct call without ``inputs`` uses every input channel.

Ranking rule shared by all ranked strategies: one global list over every layer, restricted to
``ctx.prunable``, sorted by score — highest first for the cosine scores (most redundant), lowest
first for l1, group-l1, fpgm and taylor (least important) — ties broken by (layer, mask)
ascending. The magnitude criteria live in :mod:`selfscale.minimize.magnitude`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from selfscale.config import MinimizeConfig
from selfscale.errors import CheckpointError, ConfigError
from selfscale.minimize.magnitude import group_l1_scores, l1_scores
from selfscale.minimize.proposal import Candidate, SelectionContext, Strategy
from selfscale.model import FCN, MaskedConv2d

REDUCTIONS = ("max", "mean", "min", "std", "median")
"""How the cosine similarities of one mask to the other enabled masks become one score."""

Key = tuple[int, int]
"""(layer, mask) indices of one mask in the current network."""


# --- pure ranking functions ---------------------------------------------------------------------

def mask_vectors(conv: MaskedConv2d, *, inputs: Tensor | None = None) -> Tensor:
    """One row per output channel of ``conv``: its weights flattened, its bias appended.

    Shape ``(out, in·k·k + 1)`` as float64 (exact ties, stable ranking), detached from the graph.
    ``inputs`` (bool, one per input channel) keeps only the weights on those input channels:
    ``(out, n_inputs·k·k + 1)``. Every row is returned, enabled or not.
    """
    weight = conv.weight.detach().to(torch.float64)
    if inputs is not None:
        weight = weight[:, inputs.to(torch.bool)]
    bias = conv.bias.detach().to(torch.float64)
    return torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], dim=1)


def cosine_matrix(vectors: Tensor) -> Tensor:
    """``S[i, j] = a_i · a_j / (‖a_i‖ ‖a_j‖)`` for the rows ``a_i`` of ``vectors`` (thesis 2.4.3).

    A zero row has similarity 0 with everything, itself included (no NaN). The result is made
    exactly symmetric, so identical masks tie exactly.
    """
    norms = vectors.norm(dim=1)
    unit = vectors / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    sim = unit @ unit.T
    return (sim + sim.T) / 2


def _reduce(values: Tensor, reduce: str) -> float:
    if reduce == "max":
        return float(values.max())
    if reduce == "mean":
        return float(values.mean())
    if reduce == "min":
        return float(values.min())
    if reduce == "std":
        return float(values.std(correction=0))
    # numpy's median: the mean of the two middle values for an even count (torch.median
    # would return the lower one).
    ordered = values.sort().values
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else float((ordered[mid - 1] + ordered[mid]) / 2)


def cos_scores(conv: MaskedConv2d, reduce: str = "max", absolute: bool = False, *,
               inputs: Tensor | None = None) -> dict[int, float]:
    """Cosine redundancy of each enabled mask of one layer (thesis 2.4.3, Table 4.1).

    For enabled mask ``i``: the similarities ``S[i, j]`` of :func:`cosine_matrix` to every *other*
    enabled mask ``j`` of the layer (the diagonal is excluded), ``|S[i, j]|`` when ``absolute``,
    reduced by ``reduce``: ``max``, ``mean``, ``min``, ``std`` (population, ddof=0) or ``median``
    (numpy's: mean of the two middle values for an even count). A layer with a single enabled
    mask gives no score. For *every* reduction the highest score ranks first (the most redundant
    mask is disabled first), so ``cosmin`` prefers the mask whose least similar partner is still
    the most similar.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    idx = torch.nonzero(conv.enabled).flatten().tolist()
    if len(idx) < 2:
        return {}
    sim = cosine_matrix(mask_vectors(conv, inputs=inputs)[idx])
    if absolute:
        sim = sim.abs()
    off_diagonal = ~torch.eye(len(idx), dtype=torch.bool)
    return {m: _reduce(sim[r][off_diagonal[r]], reduce) for r, m in enumerate(idx)}


def fpgm_scores(conv: MaskedConv2d, *, inputs: Tensor | None = None) -> dict[int, float]:
    """Distance to the geometric median (He et al. 2019, "Filter Pruning via Geometric Median").

    For enabled mask ``i`` with vector ``a_i`` (weights and bias, :func:`mask_vectors`):
    ``D_i = Σ_{j≠i} ‖a_i − a_j‖₂`` over the other enabled masks of the layer, divided by the
    layer's mean of ``D`` so that scores compare across layers (FPGM itself ranks per layer). A
    mask close to the geometric median is replaceable by the others: the smallest score ranks
    first. A layer with one enabled mask gives no score; a layer of identical masks scores 0.
    """
    idx = torch.nonzero(conv.enabled).flatten().tolist()
    if len(idx) < 2:
        return {}
    vectors = mask_vectors(conv, inputs=inputs)[idx]
    sums = torch.cdist(vectors, vectors).sum(dim=1)
    mean = float(sums.mean())
    if mean == 0.0:
        return {m: 0.0 for m in idx}
    return {m: float(sums[r]) / mean for r, m in enumerate(idx)}


def taylor_scores(model: FCN, batches: Iterable[tuple[Tensor, Tensor]],
                  loss_fn: Callable[[Tensor, Tensor], Tensor]) -> dict[Key, float]:
    """First-order Taylor importance of each enabled hidden mask (Molchanov et al. 2016/2017,
    "Pruning Convolutional Neural Networks for Resource Efficient Inference").

    For hidden layer ``l`` with activation ``a = relu(z)`` (``z`` the layer module's output,
    before the ReLU the network applies) and ``g = ∂Loss/∂a`` with ``Loss = loss_fn(model(x), y)``
    of the whole batch: per image ``n`` and channel ``c``, ``|mean over pixels of a·g|``;
    averaged over all images of all batches; then divided by the L2 norm of layer ``l``'s scores
    (Molchanov's layer-wise normalization; a layer whose scores are all 0 stays 0).

    The hooks record ``z`` and the product is taken as ``relu(z) · ∂Loss/∂z``: since
    ``∂Loss/∂z = ∂Loss/∂a · 1[z > 0]`` and ``relu(z) = 0`` where ``z ≤ 0``, this equals ``a·g``
    exactly. Gradients come from ``torch.autograd.grad`` with respect to ``z`` only, so no
    parameter's ``.grad`` is touched; the hooks are removed even on error. The output layer is
    not scored. The smallest score ranks first.
    """
    hidden = range(len(model.layers) - 1)
    outputs: dict[int, Tensor] = {}
    handles = [model.layers[l].register_forward_hook(
        lambda _m, _in, out, l=l: outputs.__setitem__(l, out)) for l in hidden]
    totals = {l: torch.zeros(model.widths[l], dtype=torch.float64) for l in hidden}
    images = 0
    try:
        with torch.enable_grad():
            for x, y in batches:
                outputs.clear()
                # The input requires grad so the graph exists even when no parameter does.
                loss = loss_fn(model(x.detach().requires_grad_(True)), y)
                zs = [outputs[l] for l in hidden]
                grads = torch.autograd.grad(loss, zs) if zs else ()
                for l, z, gz in zip(hidden, zs, grads):
                    per_image = (F.relu(z) * gz).detach().to(torch.float64).mean(dim=(2, 3)).abs()
                    totals[l] += per_image.sum(dim=0)
                images += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()
    if images == 0:
        raise ValueError("taylor: the evaluation batches are empty")
    scores: dict[Key, float] = {}
    for l in hidden:
        mean = totals[l] / images
        norm = float(mean.norm())
        if norm > 0:
            mean = mean / norm
        for m in torch.nonzero(model.layers[l].enabled).flatten().tolist():
            scores[(l, m)] = float(mean[m])
    return scores


def layer_inputs(model: FCN, layer: int) -> Tensor | None:
    """Which input channels of ``layer`` can be non-zero: the previous layer's enabled masks
    (None for the first layer: every image channel)."""
    return model.layers[layer - 1].enabled if layer > 0 else None


def rank(scores: dict[Key, float], candidates: Iterable[Key], *,
         highest_first: bool) -> list[Key]:
    """``candidates`` ordered by score (highest or lowest first), ties by (layer, mask).

    A candidate without a score, or with a NaN score, goes last (then by (layer, mask)).
    """
    def key(c: Key):
        s = scores.get(c, math.nan)
        if math.isnan(s):
            return (1, 0.0, c)
        return (0, -s if highest_first else s, c)

    return sorted(candidates, key=key)


# --- registry -------------------------------------------------------------------------------------

STRATEGIES: dict[str, type[Strategy]] = {}
"""Registry: strategy name → strategy class (built from the MinimizeConfig)."""

_S = TypeVar("_S", bound=type[Strategy])


def register_strategy(name: str) -> Callable[[_S], _S]:
    """Class decorator: ``@register_strategy("l1")`` sets the class's ``name`` and makes it
    selectable by that name."""

    def deco(cls: _S) -> _S:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


def make_strategy(name: str, config: MinimizeConfig | None = None) -> Strategy:
    """A fresh strategy by name, reading its options from ``config`` (default: the defaults);
    an unknown name → ConfigError listing the known ones."""
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown strategy {name!r}; choose from "
                          + ", ".join(sorted(STRATEGIES)))
    return STRATEGIES[name](config if config is not None else MinimizeConfig())


# --- strategies -----------------------------------------------------------------------------------

def _mask(key: Key) -> Candidate:
    return Candidate("mask", key[0], key[1])


class _Base(Strategy):
    """Checks that a saved state is its own; the open candidates exclude ``ctx.failed``."""

    @staticmethod
    def open_candidates(ctx: SelectionContext) -> list[Key]:
        """``ctx.prunable`` without the candidates stepped back since the last keep, sorted."""
        return sorted(k for k in ctx.prunable if _mask(k) not in ctx.failed)

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise CheckpointError(f"strategy state is for {state.get('strategy')!r}, "
                                  f"not {self.name!r}")


class RankedStrategy(_Base):
    """The thesis 4.3 CosMax rule for any ranking.

    After a kept change (or at the start) the first candidate of the ranking is proposed. After
    ``k`` consecutive step-backs (``len(ctx.failed)``) the first candidate of a fresh ranking that
    was not stepped back since the last keep is proposed: the network is restored exactly after a
    step-back, so the ranking is unchanged and this is its ``(k+1)``-th candidate. The strategy
    stops after ``config.patience`` consecutive step-backs (thesis: 2, "if that also failed then
    the exiting criterion is met") or when no candidate is left.
    """

    highest_first: ClassVar[bool] = False

    @abstractmethod
    def scores(self, ctx: SelectionContext) -> dict[Key, float]:
        """Score of every enabled mask that has one."""

    def ranking(self, ctx: SelectionContext) -> list[Key]:
        return rank(self.scores(ctx), self.open_candidates(ctx), highest_first=self.highest_first)

    def propose(self, ctx: SelectionContext) -> Candidate | None:
        if len(ctx.failed) >= self.config.patience:
            return None
        ranked = self.ranking(ctx)
        return _mask(ranked[0]) if ranked else None


def _per_layer(model: FCN, layer_scores: Callable[..., dict[int, float]]) -> dict[Key, float]:
    """Scores of every hidden layer's masks, each layer given its live input channels."""
    return {(l, m): s
            for l in range(len(model.layers) - 1)
            for m, s in layer_scores(model.layers[l], inputs=layer_inputs(model, l)).items()}


class CosineStrategy(RankedStrategy):
    """Highest cosine redundancy first (:func:`cos_scores` with ``reduce`` and ``absolute``)."""

    highest_first = True
    reduce: ClassVar[str]
    absolute: ClassVar[bool]

    def scores(self, ctx: SelectionContext) -> dict[Key, float]:
        return _per_layer(ctx.model, lambda conv, inputs: cos_scores(
            conv, self.reduce, self.absolute, inputs=inputs))


COSINE_FIRST = {
    "max": "the mask with the greatest single similarity to another (thesis 4.3 CosMax)",
    "mean": "the mask with the highest average similarity to the others (thesis 2.4.3)",
    "min": "the mask whose least similar partner is the most similar (Table 4.1)",
    "std": "the mask with the most spread similarities (Table 4.1)",
    "median": "the mask with the highest median similarity (Table 4.1)",
}
"""What goes first under each reduction (one per :data:`REDUCTIONS`): one strategy ``cos<reduce>``
per row, and ``cos<reduce>-abs`` on |similarity| (an inverted copy counts as redundant, 2.4.3)."""


def _cosine_strategy(reduce: str, absolute: bool) -> type[CosineStrategy]:
    """The registered ``cos<reduce>`` (or ``cos<reduce>-abs``) strategy class."""
    name = f"cos{reduce}" + ("-abs" if absolute else "")
    first = COSINE_FIRST[reduce]
    doc = f"{first[0].upper()}{first[1:]} goes first" + (", on |similarity|." if absolute else ".")
    cls = type("".join(part.capitalize() for part in name.split("-")), (CosineStrategy,),
               {"reduce": reduce, "absolute": absolute, "__module__": __name__, "__doc__": doc})
    return register_strategy(name)(cls)


COSINE_STRATEGIES = {cls.name: cls for cls in (_cosine_strategy(reduce, absolute)
                                               for absolute in (False, True)
                                               for reduce in COSINE_FIRST)}
"""The ten cosine strategies by name: cosmax … cosmedian, cosmax-abs … cosmedian-abs."""


@register_strategy("l1")
class L1(RankedStrategy):
    """Smallest mean |weight| first (:func:`l1_scores`, Li et al. 2017)."""

    def scores(self, ctx: SelectionContext) -> dict[Key, float]:
        return _per_layer(ctx.model, l1_scores)


@register_strategy("group-l1")
class GroupL1(RankedStrategy):
    """Smallest group magnitude first (:func:`group_l1_scores`): a mask's weights plus the next
    layer's weights on its output, over its layer's mean."""

    def scores(self, ctx: SelectionContext) -> dict[Key, float]:
        return group_l1_scores(ctx.model)


@register_strategy("fpgm")
class FPGM(RankedStrategy):
    """Closest to its layer's geometric median first (:func:`fpgm_scores`, He et al. 2019)."""

    def scores(self, ctx: SelectionContext) -> dict[Key, float]:
        return _per_layer(ctx.model, fpgm_scores)


@register_strategy("taylor")
class Taylor(RankedStrategy):
    """Smallest first-order Taylor importance first (:func:`taylor_scores`, Molchanov et al.),
    measured on ``ctx.batches()`` with ``ctx.loss_fn``."""

    def scores(self, ctx: SelectionContext) -> dict[Key, float]:
        return taylor_scores(ctx.model, ctx.batches(), ctx.loss_fn)


@register_strategy("random")
class Random(_Base):
    """Thesis 4.3 Random: a uniformly random open candidate, ``config.random_steps`` steps.

    The draw: ``open = sorted(ctx.prunable minus ctx.failed)``, then
    ``open[ctx.rng.integers(len(open))]`` — exactly one draw from the loop's generator per
    proposal. Stops when ``ctx.step >= config.random_steps`` or nothing is open.
    """

    def propose(self, ctx: SelectionContext) -> Candidate | None:
        if ctx.step >= self.config.random_steps:
            return None
        open_ = self.open_candidates(ctx)
        if not open_:
            return None
        return _mask(open_[int(ctx.rng.integers(len(open_)))])


@register_strategy("seq")
class Seq(_Base):
    """Thesis 4.3 Seq: every prunable mask once, in (layer, mask) order, then stop.

    The cursor is the last candidate decided on (set by :meth:`update`); the proposal is the first
    ``(layer, mask)`` of ``ctx.prunable`` strictly after it. Masks are only disabled during mask
    minimization, so indices are stable and the order is that of the original network. A mask
    that is not prunable when the cursor passes it (the last enabled one of its layer) is skipped.
    """

    def __init__(self, config: MinimizeConfig) -> None:
        super().__init__(config)
        self.cursor: Key | None = None

    def update(self, candidate: Candidate, kept: bool) -> None:
        if candidate.kind == "mask":
            self.cursor = (candidate.layer, candidate.mask)

    def propose(self, ctx: SelectionContext) -> Candidate | None:
        for key in self.open_candidates(ctx):
            if self.cursor is None or key > self.cursor:
                return _mask(key)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "cursor": None if self.cursor is None else list(self.cursor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        cursor = state["cursor"]
        self.cursor = None if cursor is None else (int(cursor[0]), int(cursor[1]))


@register_strategy("oracle")
class Oracle(_Base):
    """Tries every open candidate with ``ctx.trial`` (apply, retrain ``config.oracle_steps``
    steps, score, restore — done by the loop) and proposes the best: the highest score, ties to
    the lowest (layer, mask); a NaN score never wins.

    Stop rule (patience 1, ``config.patience`` is not used): after one step-back (``ctx.failed``
    not empty), since the best candidate failed no other can be expected to pass; or when nothing
    is open.
    """

    def propose(self, ctx: SelectionContext) -> Candidate | None:
        if ctx.trial is None:
            raise RuntimeError("oracle strategy needs ctx.trial (the loop's apply-retrain-score)")
        if ctx.failed:
            return None
        best: Candidate | None = None
        best_score = -math.inf
        for key in self.open_candidates(ctx):  # (layer, mask) order: strict > keeps the lowest
            candidate = _mask(key)
            score = float(ctx.trial(candidate))
            if math.isnan(score):
                score = -math.inf
            if best is None or score > best_score:
                best, best_score = candidate, score
        return best
