"""Altering the network (thesis 2.4): disable, freeze, reset a mask; remove a whole hidden layer.

Every function here changes a :class:`TrainState` in place and leaves resetting the optimizer to
the caller (the loop resets Adam after every alteration and every step back).

Modes of testing a mask's worth (thesis 2.4.1):

* ``disabled-frozen`` (default, the thesis's choice): the mask is switched off and frozen; the
  rest of the network retrains around its absence. A kept change removes the mask.
* ``disabled``: the mask's weights are reset (zero, or redrawn with ``reinit``) and it keeps
  training with the rest. This measures whether the network recovers from losing what the mask
  had learned; the thesis found such masks relearn their past values. Nothing is removed.
* ``others-frozen``: the mask is reset as above and every other mask is frozen during the
  retrain, so only the mask itself can relearn. Nothing is removed.
"""

from __future__ import annotations

import torch

from selfscale.compact import compact_model
from selfscale.minimize.proposal import Candidate
from selfscale.model import FCN, Init, as_init
from selfscale.train import TrainState, to_device

REMOVING_MODE = "disabled-frozen"


def prunable_masks(model: FCN) -> list[tuple[int, int]]:
    """(layer, mask) pairs that may be disabled: enabled, not in the output layer, and not the
    last enabled mask of their layer."""
    out = []
    for i, layer in enumerate(model.layers[:-1]):
        enabled = layer.enabled.tolist()
        if sum(enabled) > 1:
            out += [(i, m) for m, on in enumerate(enabled) if on]
    return out


def removable_layers(model: FCN) -> list[int]:
    """Hidden layers (not the output layer), fewest active masks first, then by index."""
    hidden = range(len(model.layers) - 1)
    return sorted(hidden, key=lambda i: (int(model.layers[i].enabled.sum()), i))


def reset_mask(model: FCN, layer: int, mask: int, *, reinit: bool, init: Init | float,
               generator: torch.Generator) -> None:
    """Zero one mask's weights and bias, or redraw them from the initial distribution."""
    conv = model.layers[layer]
    with torch.no_grad():
        if reinit:
            model.reinit_mask(layer, mask, init, generator)
        else:
            conv.weight[mask].zero_()
            conv.bias[mask].zero_()


def apply_mask_candidate(state: TrainState, cand: Candidate, mode: str, *, reinit: bool,
                         init: Init | float) -> None:
    """Alter the network for one mask candidate according to ``mode`` (see module docstring)."""
    model = state.model
    if mode == "disabled-frozen":
        model.set_enabled(cand.layer, cand.mask, False)
        model.set_frozen(cand.layer, cand.mask, True)
        return
    reset_mask(model, cand.layer, cand.mask, reinit=reinit, init=init,
               generator=state.torch_gen)
    if mode == "others-frozen":
        for i, layer in enumerate(model.layers):
            for m in range(layer.out_channels):
                if (i, m) != (cand.layer, cand.mask):
                    model.set_frozen(i, m, True)


def unfreeze_others(model: FCN) -> None:
    """After an others-frozen retrain: everything but disabled masks trains again."""
    for layer in model.layers:
        layer.frozen.copy_(~layer.enabled)


def compact_state(state: TrainState) -> tuple[TrainState, list[list[int]]]:
    """Physically drop disabled masks (and the next layer's matching inputs).

    Returns the new state (fresh optimizer, same generators and history) and, per layer, the
    indices of the kept masks in the old layer.
    """
    model = state.model
    kept = [[m for m, on in enumerate(layer.enabled.tolist()) if on] for layer in model.layers]
    new = compact_model(model)
    for old, fresh, keep in zip(model.layers, new.layers, kept):
        fresh.frozen.copy_(old.frozen[keep])
    device = next(model.parameters()).device
    out = TrainState(to_device(new, device), state.optimizer, state.rng, state.torch_gen,
                     state.step, state.history, state.lr)
    out.reset_optimizer()
    return out, kept


def remove_hidden_layer(state: TrainState, layer: int, init: Init | float) -> TrainState:
    """A state whose network lacks hidden layer ``layer``; the following layer is re-made with
    inputs to fit (its weights redrawn from the initial distribution, its width unchanged).

    Disabled masks are dropped first (the network is compacted), so the result has all
    switches on except frozen flags, which are kept for the untouched layers."""
    if not 0 <= layer < len(state.model.layers) - 1:
        raise ValueError(f"layer {layer} is not a hidden layer")
    compacted, _ = compact_state(state)
    model = compacted.model
    widths = [w for i, w in enumerate(model.widths) if i != layer]
    new = FCN(widths, model.kernel, model.in_channels)
    old_layers = [c for i, c in enumerate(model.layers) if i != layer]
    with torch.no_grad():
        for j, (old, fresh) in enumerate(zip(old_layers, new.layers)):
            if j == layer:  # the layer after the removed one: new input width
                as_init(init).draw_(fresh.weight, fresh.bias, state.torch_gen)
            else:
                fresh.weight.copy_(old.weight)
                fresh.bias.copy_(old.bias)
                fresh.frozen.copy_(old.frozen)
    device = next(model.parameters()).device
    out = TrainState(to_device(new, device), compacted.optimizer, state.rng, state.torch_gen,
                     state.step, state.history, state.lr)
    out.reset_optimizer()
    return out
