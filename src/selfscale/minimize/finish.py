"""Before and after the loop: free removals of (nearly) dead masks, and the fine-tune that
finishes the minimized network.

* **Free removals.** A mask whose output is zero on nearly every training pixel contributes
  (almost) nothing, whatever its weights: magnitude criteria (l1, fpgm) can rank it last while it
  is the cheapest mask to lose. Such masks are tried first, deadest first, in a ``free`` phase:
  each is switched off (disabled and frozen) and judged by the usual threshold *without* a
  retrain, so the phase costs evaluations only. A stepped-back one stays for the strategy.
* **Fine-tune.** The loop's retrains are short, so the kept network has seen only those. After
  the last decision it trains ``--finetune-steps`` more with the run's recipe (the learning-rate
  schedule restarted for that length), checkpointed through the loop's state so a killed
  fine-tune resumes exactly; the summary reports the scores before and after. A fine-tune that
  lowers the score is undone (a warm restart can shake a converged network: the demo's unchanged
  network fell from F1 0.8466 to 0.8404), and none runs when no change was kept (the network is
  then the trained base itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from selfscale.crops import sample_batch
from selfscale.data import Datasets
from selfscale.minimize.active import train_active
from selfscale.minimize.alter import prunable_masks
from selfscale.model import FCN, mask_activity
from selfscale.train import (
    EVAL_METRICS,
    TrainHooks,
    TrainSpec,
    TrainState,
    as_input,
    evaluate,
)

FINETUNE_EVALS = 10
"""The fine-tune is evaluated (and the loop checkpointed) every ``steps // FINETUNE_EVALS``
steps, but at least :data:`FINETUNE_GAP` steps apart unless the run keeps its best."""
FINETUNE_GAP = 100
"""A pause (an evaluation, a checkpoint, the narrow network's weights written back) costs about
what 5-50 training steps do: a short fine-tune paused every ``steps // 10`` steps spent up to a
fifth of its time there. Its evaluations steer nothing (it has no early stop); with the run's
``--keep-best`` they choose its end, and it keeps its ten."""

PROBE_CROPS = 32
"""Random training crops (of the run's training crop size) that measure mask activity."""


def near_dead_masks(model: FCN, spec: TrainSpec, data: Datasets, *, seed: int,
                    share: float) -> list[tuple[int, int]]:
    """Prunable masks whose output is zero on at least ``share`` of the pixels of a fixed,
    seeded sample of training crops, deadest first (ties by layer, mask)."""
    x, _ = sample_batch(data.train, np.random.default_rng([seed, 3]), PROBE_CROPS,
                        spec.train_crop, False)
    activity = mask_activity(model, [as_input(x, spec.device)])
    zero = {(layer, k): 1.0 - float(activity[layer][k]) for layer, k in prunable_masks(model)}
    return sorted((key for key, z in zero.items() if z >= share), key=lambda k: (-zero[k], k))


def finetune(state: TrainState, info: dict[str, Any], spec: TrainSpec, data: Datasets,
             save: Callable[[], None]) -> dict[str, Any]:
    """Train ``state`` from ``info['start']`` to ``info['start'] + info['steps']`` with the run's
    recipe (schedule restarted; evaluated up to ten times, see :data:`FINETUNE_GAP`), calling
    ``save`` at every evaluation; returns the scores at the end. Continuing after a kill gives the
    same result."""
    steps, start = info["steps"], info["start"]
    every = max(steps // FINETUNE_EVALS, 1 if spec.keep_best else FINETUNE_GAP)
    ft = dataclasses.replace(spec.for_retrain(start, steps), eval_every=every)
    train_active(state, data.train, data.eval, ft, until_step=start + steps,
                 hooks=TrainHooks(on_checkpoint=lambda s: save()))
    last = state.history[-1] if state.history else {}
    if last.get("step") == start + steps and not ft.keep_best:  # of the weights it ends on
        return {name: last[name] for name in EVAL_METRICS}
    scores = evaluate(state.model, data.eval, spec.eval_crop, spec.device)
    scores.pop("n_images")
    return scores
