"""Magnitude criteria: how large a mask's weights are, alone (``l1``) or with the weights that
read its output (``group-l1``). The smallest ranks first; only enabled masks get a score, and
weights on a disabled mask's (always zero) output or from a disabled input are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfscale.model import FCN, MaskedConv2d


def l1_scores(conv: MaskedConv2d, *, inputs: Tensor | None = None) -> dict[int, float]:
    """Weight magnitude of each enabled mask (Li et al. 2017, "Pruning Filters for Efficient
    ConvNets"): ``mean |w|`` over the mask's kernel weights (bias not included).

    Li et al. sum; the mean (sum divided by ``n_inputs·k·k``) lets layers with different fan-in
    compete in one global ranking. The smallest score ranks first.
    """
    weight = conv.weight.detach().to(torch.float64)
    if inputs is not None:
        weight = weight[:, inputs.to(torch.bool)]
    idx = torch.nonzero(conv.enabled).flatten().tolist()
    if weight.shape[1] == 0:
        return {m: 0.0 for m in idx}
    per_mask = weight.abs().reshape(weight.shape[0], -1).mean(dim=1)
    return {m: float(per_mask[m]) for m in idx}


def group_l1_scores(model: FCN) -> dict[tuple[int, int], float]:
    """Group magnitude of every enabled mask of every hidden layer, after Torch-Pruning's
    ``MagnitudeImportance(p=1)`` (Fang et al. 2023, "DepGraph"): removing a mask also removes the
    next layer's weights on its output, so its score is ``sum |w|`` over its own kernels (from
    live inputs) plus ``sum |w|`` over the next layer's kernels that read it (enabled masks
    only), divided by the mean of that sum over its layer's enabled masks, so that layers of
    different fan-in and fan-out compete in one global ranking. The bias is not included."""
    out: dict[tuple[int, int], float] = {}
    layers = model.layers
    for i in range(len(layers) - 1):
        conv, nxt = layers[i], layers[i + 1]
        own = conv.weight.detach().to(torch.float64).abs()
        if i > 0:
            own = own[:, layers[i - 1].enabled]
        reads = nxt.weight.detach().to(torch.float64).abs()[nxt.enabled]
        idx = torch.nonzero(conv.enabled).flatten().tolist()
        raw = {m: float(own[m].sum() + reads[:, m].sum()) for m in idx}
        mean = sum(raw.values()) / len(raw) if raw else 0.0
        out |= {(i, m): (v / mean if mean > 0 else 0.0) for m, v in raw.items()}
    return out
