"""What a minimization did, in numbers: the thesis's mask matrix and the before/after summary."""

from __future__ import annotations

from typing import Any

from selfscale.minimize.loop import Minimization
from selfscale.model import (FCN, active_macs_per_pixel, active_parameter_count, macs_per_pixel,
                             parameter_count)


def mask_matrix(m: Minimization) -> list[list[bool]]:
    """The thesis's one-hot matrix over the ORIGINAL network: True where a mask remains."""
    matrix = [[False] * w for w in m.orig_widths]
    for o, layer in zip(m.origin, m.current.model.layers):
        for k, on in enumerate(layer.enabled.tolist()):
            if on:
                matrix[o[0]][o[1 + k]] = True
    return matrix


def summary(m: Minimization, final_scores: dict[str, float]) -> dict[str, Any]:
    """Before/after: masks and layers, parameters, MACs per pixel, scores, effort."""
    model: FCN = m.current.model
    kernel, cin = model.kernel, model.in_channels
    return {
        "strategy": m.config.strategy,
        "threshold": m.config.threshold,
        "mode": m.config.mode,
        "reference": m.config.reference,
        "metric": m.config.metric,
        "widths_before": m.orig_widths,
        "widths_after": list(model.active_widths()),
        "layers_before": len(m.orig_widths),
        "layers_after": len(model.widths),
        "masks_before": sum(m.orig_widths[:-1]),
        "masks_after": sum(model.active_widths()[:-1]),
        "parameters_before": parameter_count(m.orig_widths, kernel, cin),
        "parameters_after": active_parameter_count(model),
        "macs_per_pixel_before": macs_per_pixel(m.orig_widths, kernel, cin),
        "macs_per_pixel_after": active_macs_per_pixel(model),
        "scores_before": m.base_scores,
        "scores_after": final_scores,
        "finetune_steps": m.finetune["steps"] if m.finetune else 0,
        "scores_before_finetune": m.finetune["scores_before"] if m.finetune else None,
        "finetune_kept": m.finetune.get("kept") if m.finetune else None,
        "free_removals": sum(1 for d in m.log if d["phase"] == "free" and d["kept"]),
        "decisions": m.step,
        "kept": sum(1 for d in m.log if d["kept"]),
        "stopped_early": sum(1 for d in m.log if d.get("stopped_early")),
        "steps_trained": m.steps_trained,
        "seconds": round(m.seconds, 2),
        "mask_matrix": mask_matrix(m),
    }
