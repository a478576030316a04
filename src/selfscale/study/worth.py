"""The mask-worth trials of the ``correlation`` study (thesis 4.1–4.2), run on Dask workers.

A worth trial takes a trained base network (the output of the train trial it ``needs``) and
either continues it undisturbed (the *reference*: ``layer`` is None) or first disables one mask
(disabled-frozen: switched off and frozen, thesis 2.4.1). Either way Adam is reset and the
network trains ``steps`` more steps with the run's recipe (its schedule restarted for the
retrain's length, as a minimization's retrain), evaluated right away and every ``every`` steps.
The result is that score curve; a mask trial also holds its mask's *features* measured on the
base network before disabling it: :func:`mask_features`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from selfscale.model import FCN

SCORES = ("f1", "mae", "mse", "uiqi")
FEATURES = ("cos_max", "cos_2nd_max", "cos_3rd_max", "cos_min", "cos_mean", "cos_std",
            "cos_median", "abs_max", "abs_2nd_max", "abs_3rd_max", "abs_min", "abs_mean",
            "abs_std", "abs_median", "l1", "taylor", "fpgm")
"""Every feature of a mask, in Table 4.1's order: the cosine aggregations, the same over absolute
values, then the scores of the other strategies."""


def mask_features(model: FCN, layer: int, mask: int,
                  taylor: dict[tuple[int, int], float]) -> dict[str, float]:
    """The features of mask ``mask`` of ``layer`` (0-based) of ``model`` (see :data:`FEATURES`).

    Cosine aggregations: the cosine similarities (:func:`~selfscale.minimize.strategies.
    cosine_matrix`, masks as weights plus bias over the enabled inputs) of the mask to every
    other enabled mask of its layer, reduced by max, min, mean, std (population) and median, and
    the second and third largest ("2. max", "3. max"; NaN when the layer has fewer other masks);
    ``abs_*`` the same over absolute similarities. ``l1``, ``fpgm``: the strategies' scores;
    ``taylor``: the mask's entry of ``taylor`` (:func:`~selfscale.minimize.strategies.
    taylor_scores` of the whole network)."""
    import torch

    from selfscale.minimize.strategies import (cosine_matrix, fpgm_scores, l1_scores,
                                               layer_inputs, mask_vectors)

    conv = model.layers[layer]
    inputs = layer_inputs(model, layer)
    idx = torch.nonzero(conv.enabled).flatten().tolist()
    row = cosine_matrix(mask_vectors(conv, inputs=inputs)[idx])[idx.index(mask)]
    others = torch.cat([row[:idx.index(mask)], row[idx.index(mask) + 1:]])
    out: dict[str, float] = {}
    for prefix, values in (("cos", others), ("abs", others.abs())):
        ordered = sorted((float(v) for v in values), reverse=True)
        nth = [ordered[i] if len(ordered) > i else math.nan for i in range(3)]
        out |= {f"{prefix}_max": nth[0], f"{prefix}_2nd_max": nth[1],
                f"{prefix}_3rd_max": nth[2]}
        if not ordered:
            out |= {f"{prefix}_{k}": math.nan for k in ("min", "mean", "std", "median")}
            continue
        v = values.double()
        out |= {f"{prefix}_min": float(v.min()), f"{prefix}_mean": float(v.mean()),
                f"{prefix}_std": float(v.std(correction=0)),
                f"{prefix}_median": float(v.quantile(0.5))}
    out["l1"] = l1_scores(conv, inputs=inputs)[mask]
    out["taylor"] = taylor.get((layer, mask), math.nan)
    out["fpgm"] = fpgm_scores(conv, inputs=inputs).get(mask, math.nan)
    return {k: out[k] for k in FEATURES}


def score_curve(state, spec, data, steps: int, every: int) -> dict[str, list[float]]:
    """Evaluate ``state`` now, then train it ``steps`` steps (fresh Adam, the schedule restarted)
    evaluating every ``every`` steps: ``{"step": [0, every, …, steps], metric: [...]}``, steps
    counted from the start of this training."""
    from selfscale.minimize.active import train_active
    from selfscale.train import evaluate

    start = state.step
    first = evaluate(state.model, data.eval, spec.eval_crop, spec.device)
    state.reset_optimizer()
    rs = dataclasses.replace(spec.for_retrain(start, steps), eval_every=every)
    train_active(state, data.train, data.eval, rs, until_step=start + steps)
    records = [{"step": start, **first}] + [r for r in state.history if r["step"] > start]
    return {"step": [r["step"] - start for r in records],
            **{k: [float(r[k]) for r in records] for k in SCORES}}


def worth_trial(trial: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Run one worth trial (see the module docstring) on a copy of the base network."""
    from selfscale.metrics import LOSSES
    from selfscale.minimize.loop import eval_batches
    from selfscale.minimize.strategies import taylor_scores
    from selfscale.run import load_run, prepare_data
    from selfscale.study.trials import base_run_dir

    t0 = time.perf_counter()
    with base_run_dir(base) as path:
        run = load_run(path, "cpu")
    data = prepare_data(run.config)
    spec, state = run.spec(), run.state
    result: dict[str, Any] = {"layer": trial["layer"], "mask": trial["mask"]}
    if trial["layer"] is not None:
        layer, mask = trial["layer"] - 1, trial["mask"] - 1
        model = state.model
        if not (0 <= layer < len(model.layers) - 1 and 0 <= mask < model.widths[layer]):
            raise ValueError(f"the base network has no hidden mask {trial['mask']} in layer "
                             f"{trial['layer']}")
        taylor = taylor_scores(model, eval_batches(spec, data), LOSSES[spec.loss])
        result["features"] = mask_features(model, layer, mask, taylor)
        model.set_enabled(layer, mask, False)
        model.set_frozen(layer, mask, True)
    result["curve"] = score_curve(state, spec, data, trial["steps"], trial["every"])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return {"result": result, "files": {}}
