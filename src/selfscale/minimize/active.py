"""Training only the active channels: a masked network's retrain runs on its narrow copy.

A disabled mask costs full compute in the masked network: its weights are multiplied by zero in
every forward pass, so a minimization's retrains would not get cheaper as masks go. While some
masks are disabled, :func:`train_active` instead

1. copies the enabled masks, the next layer's matching input weights, their frozen switches and
   their Adam moments into a narrow :class:`~selfscale.model.FCN` (:func:`narrow`),
2. trains that with the same spec, batches, generators and history, and
3. writes weights and moments back into the masked state (:func:`widen_`), at every evaluation
   and checkpoint and at the end.

Why this equals training the masked network (within float summation order): a disabled mask
outputs zero, so its own weights and the next layer's weights reading it receive zero gradient;
the minimization resets Adam after every alteration, so their moments are zero and Adam moves
them by exactly 0. Everything else sees the same inputs, outputs and gradients. Gathering and
scattering are exact copies, so a checkpoint written during a narrow training resumes exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from selfscale.compact import compact_model
from selfscale.data import ImageSet
from selfscale.model import FCN
from selfscale.train import TrainHooks, TrainSpec, TrainState, make_optimizer, to_device, train

Kept = list[list[int]]
"""Per layer, the indices of the enabled masks in the masked network."""


def kept_masks(model: FCN) -> Kept:
    return [[m for m, on in enumerate(layer.enabled.tolist()) if on] for layer in model.layers]


def _param_index(kept: Kept, in_channels: int) -> list[tuple[list[int], list[int] | None]]:
    """Per parameter in ``model.parameters()`` order (weight, bias per layer): the kept output
    indices and, for weights, the kept input indices."""
    out: list[tuple[list[int], list[int] | None]] = []
    prev = list(range(in_channels))
    for keep in kept:
        out += [(keep, prev), (keep, None)]
        prev = keep
    return out


def _gather(t: Tensor, rows: list[int], cols: list[int] | None) -> Tensor:
    t = t[rows]
    return (t if cols is None else t[:, cols]).clone()


def _scatter_(t: Tensor, rows: list[int], cols: list[int] | None, value: Tensor) -> None:
    r = torch.as_tensor(rows, device=t.device)
    if cols is None:
        t[r] = value.to(t.dtype)
    else:
        t[r[:, None], torch.as_tensor(cols, device=t.device)] = value.to(t.dtype)


def narrow(state: TrainState) -> tuple[TrainState, Kept]:
    """A state holding only the enabled masks of ``state.model``, with their frozen switches and
    Adam moments; generators, history and the best-so-far record are shared with ``state``."""
    full = state.model
    kept = kept_masks(full)
    small = compact_model(full)
    for old, new, keep in zip(full.layers, small.layers, kept):
        new.frozen.copy_(old.frozen[keep])
    device = next(full.parameters()).device
    small = to_device(small, device)
    optimizer = make_optimizer(small, state.lr)
    sd = state.optimizer.state_dict()
    index = _param_index(kept, full.in_channels)
    moments = {p: {k: (_gather(v, *index[p]) if k.startswith("exp_avg") else v.clone())
                   for k, v in entry.items()} for p, entry in sd["state"].items()}
    optimizer.load_state_dict({"state": moments, "param_groups": sd["param_groups"]})
    out = TrainState(small, optimizer, state.rng, state.torch_gen, state.step, state.history,
                     state.lr, state.best)
    return out, kept


def widen_(state: TrainState, small: TrainState, kept: Kept) -> None:
    """Write the narrow state's weights, Adam moments, step and best record back into ``state``
    (masked network); disabled masks keep their weights and get zero moments."""
    full = state.model
    index = _param_index(kept, full.in_channels)
    with torch.no_grad():
        for p, q, where in zip(full.parameters(), small.model.parameters(), index):
            _scatter_(p, *where, q)
    full_params = list(full.parameters())
    moments: dict[int, dict[str, Any]] = {}
    for p, entry in small.optimizer.state_dict()["state"].items():
        moments[p] = {}
        for k, v in entry.items():
            if k.startswith("exp_avg"):
                wide = torch.zeros_like(full_params[p])
                _scatter_(wide, *index[p], v)
                moments[p][k] = wide
            else:
                moments[p][k] = v.clone()
    groups = small.optimizer.state_dict()["param_groups"]  # same parameter order and count
    state.optimizer.load_state_dict({"state": moments, "param_groups": groups})
    state.step = small.step
    state.best = _widen_best(state, small.best, kept)


def _widen_best(state: TrainState, best: dict[str, Any] | None,
                kept: Kept) -> dict[str, Any] | None:
    """A --keep-best record taken on the narrow network, in the masked network's shapes."""
    params = dict(state.model.named_parameters())
    if best is None or all(best["model"][n].shape == p.shape for n, p in params.items()):
        return best
    wide = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
    with torch.no_grad():
        for name, where in zip(params, _param_index(kept, state.model.in_channels)):
            _scatter_(wide[name], *where, best["model"][name])
    return {**best, "model": wide}


def has_disabled(model: FCN) -> bool:
    return any(not bool(layer.enabled.all()) for layer in model.layers)


def train_active(state: TrainState, train_set: ImageSet, eval_set: ImageSet, spec: TrainSpec, *,
                 until_step: int, hooks: TrainHooks | None = None) -> TrainState:
    """:func:`selfscale.train.train` on the active channels only (see the module docstring);
    ``state`` (the masked network) holds the result. Hooks see the masked state, up to date."""
    if not has_disabled(state.model):
        return train(state, train_set, eval_set, spec, until_step=until_step, hooks=hooks)
    small, kept = narrow(state)
    hooks = hooks or TrainHooks()

    def synced(fn):
        if fn is None:
            return None

        def call(s: TrainState, *args: Any) -> Any:
            widen_(state, s, kept)
            return fn(state, *args)
        return call

    train(small, train_set, eval_set, spec, until_step=until_step,
          hooks=dataclasses.replace(hooks, on_eval=synced(hooks.on_eval),
                                    on_checkpoint=synced(hooks.on_checkpoint),
                                    on_every=synced(hooks.on_every)))
    widen_(state, small, kept)
    return state
