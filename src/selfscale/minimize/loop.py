"""The minimization process of thesis 2.4.2 (Fig 2.2), one decision at a time:

    base network → evaluate, snapshot → select → alter → retrain → evaluate →
    keep (new snapshot) or step back (to the snapshot) → select again … → stop

Masks are minimized first (by the chosen strategy, until it says stop), then whole hidden layers
are tried (fewest active masks first). The loop's whole state is one :class:`Minimization`, saved
after every decision (:mod:`selfscale.minimize.state`), so a killed minimization resumes and ends
exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor

from selfscale.config import MinimizeConfig
from selfscale.crops import center_crop_chunks
from selfscale.data import Datasets
from selfscale.metrics import LOSSES, METRICS
from selfscale.minimize.active import train_active
from selfscale.minimize.finish import finetune, near_dead_masks
from selfscale.minimize.alter import (REMOVING_MODE, apply_mask_candidate, prunable_masks,
                                      remove_hidden_layer, removable_layers, unfreeze_others)
from selfscale.minimize.proposal import Candidate, SelectionContext, Strategy
from selfscale.minimize.state import Minimization, clone_state
from selfscale.minimize.strategies import make_strategy
from selfscale.model import dead_masks, mask_activity
from selfscale.train import (EVAL_BATCH, TrainHooks, TrainSpec, TrainState, as_input,
                             best_record, evaluate)

PHASES = ("free", "masks", "layers", "finetune", "done")
JUDGE_EVALS = 4
"""--judge best, --abort-below: evaluations during each retrain."""


def ratio(score: float, reference: float, metric: str) -> float:
    """How the new score compares with the reference: new/ref for scores where higher is better,
    ref/new for errors (MAE, MSE); 1.0 when both are 0."""
    higher = METRICS[metric].higher_is_better
    num, den = (score, reference) if higher else (reference, score)
    if den == 0:
        return 1.0 if num == 0 else float("inf")
    return num / den


def start(base: TrainState, config: MinimizeConfig, spec: TrainSpec,
          data: Datasets) -> Minimization:
    """Evaluate the base network and take the first snapshot."""
    scores = evaluate(base.model, data.eval, spec.eval_crop, spec.device)
    scores.pop("n_images")
    current = clone_state(base)
    current.reset_optimizer()
    widths = list(base.model.widths)
    free = (near_dead_masks(current.model, spec, data, seed=config.seed, share=config.free_below)
            if config.mode == REMOVING_MODE and config.free_below <= 1 else [])
    return Minimization(
        config=config, current=current,
        origin=[[i, *range(w)] for i, w in enumerate(widths)],
        orig_widths=widths, base_scores=scores, reference=scores[config.metric],
        rng=np.random.default_rng([config.seed, 2]), free=free,
    )


def retrain(state: TrainState, steps: int, spec: TrainSpec, data: Datasets, *,
            judge: str = "final", metric: str = "f1",
            stop: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train ``steps`` steps from the state's current step with the run's spec and return the
    evaluation the change is judged by: ``final``, the one at the end; ``best``, the best of
    ``JUDGE_EVALS`` evaluations during the retrain, whose weights the state then holds. With
    ``stop``, the retrain is evaluated as often and ends at the first evaluation from a quarter
    in that ``stop`` holds hopeless. The record adds the steps ``trained`` and the metric's
    ``trajectory``. With 0 steps: an evaluation of the state as it is. Only the active channels
    train (:mod:`selfscale.minimize.active`), so a retrain gets cheaper as masks go."""
    if steps == 0:
        scores = evaluate(state.model, data.eval, spec.eval_crop, spec.device)
        scores.pop("n_images")
        return {"step": state.step, **scores, "trained": 0, "trajectory": []}
    start, rs = state.step, spec.for_retrain(state.step, steps)
    if judge == "best" or stop is not None:
        rs = replace(rs, eval_every=max(steps // JUDGE_EVALS, 1))
    if judge == "best":
        rs = replace(rs, keep_best=True, best_metric=metric)
    hooks = None if stop is None else TrainHooks(
        on_eval=lambda s, record: (steps // JUDGE_EVALS <= s.step - start < steps
                                   and stop(record)))
    train_active(state, data.train, data.eval, rs, until_step=start + steps, hooks=hooks)
    evals = [r for r in state.history if r["step"] > start]
    record = best_record(evals, metric) if judge == "best" else evals[-1]
    return {**record, "trained": state.step - start, "trajectory": [r[metric] for r in evals]}


def hopeless(m: Minimization) -> Callable[[dict[str, Any]], bool]:
    """--abort-below: whether an evaluation during a retrain is so far below the line (its ratio
    to the reference under ``abort_below`` × threshold) that the retrain stops there."""
    cfg = m.config
    line = cfg.abort_below * cfg.threshold
    return lambda record: ratio(record[cfg.metric], m.reference, cfg.metric) < line


def judged_paired(m: Minimization, score: float, steps: int, spec: TrainSpec,
                  data: Datasets) -> float:
    """--judge paired: the trial's ratio to the snapshot retrained ``steps`` steps unchanged.

    Every trial is a clone of the snapshot, so all trials of one snapshot see the same batches;
    the unchanged snapshot is retrained once on them (cached until a change is kept) and the
    trial is judged against that, so what the retrain itself does to a trained network (a warm
    restart of the schedule shakes it) cancels out. With ``--reference base`` the ratio is
    chained with the snapshot's own judged ratio to the base (:attr:`Minimization.standing`)."""
    metric = m.config.metric
    if m.paired is None or m.paired["steps"] != steps:
        unchanged = clone_state(m.current)
        unchanged.reset_optimizer()
        m.paired = {"steps": steps,
                    "score": retrain(unchanged, steps, spec, data, metric=metric)[metric]}
        m.steps_trained += steps
    chained = m.standing if m.config.reference == "base" else 1.0
    return ratio(score, m.paired["score"], metric) * chained


def eval_batches(spec: TrainSpec, data: Datasets) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y in center_crop_chunks(data.eval, spec.eval_crop, EVAL_BATCH):
        yield as_input(x, spec.device), as_input(y, spec.device)


@dataclass
class LoopHooks:
    on_decision: Callable[[Minimization, dict[str, Any]], None] | None = None
    on_save: Callable[[Minimization], None] | None = None


def minimize(m: Minimization, spec: TrainSpec, data: Datasets,
             hooks: LoopHooks | None = None) -> Minimization:
    """Run the minimization to its end (strategy stop, no layer left, or --max-steps)."""
    hooks = hooks or LoopHooks()
    cfg = m.config
    strategy = make_strategy(cfg.strategy, cfg)
    if m.strategy_state:  # a resumed minimization: the strategy continues where it was
        strategy.load_state_dict(copy.deepcopy(m.strategy_state))
    while m.phase not in ("finetune", "done"):
        t0 = time.perf_counter()
        if cfg.max_steps is not None and m.step >= cfg.max_steps:
            m.phase = "finetune"
            break
        # 1. select
        cand = select(m, strategy, spec, data)
        if cand is None:  # the phase is over: free → masks → layers → finetune
            m.phase = {"free": "masks", "masks": "layers" if cfg.layers else "finetune",
                       "layers": "finetune"}[m.phase]
            m.failed = []
            _save(m, hooks)
            continue
        # 2. alter a copy of the snapshot, with a fresh optimizer (thesis 2.4)
        free = m.phase == "free"
        trial = alter(m, cand, spec)
        # 3. retrain (a free removal is judged as it is) and 4. evaluate
        steps = 0 if free else cfg.retrain_steps
        record = retrain(trial, steps, spec, data, judge=cfg.judge, metric=cfg.metric,
                         stop=hopeless(m) if steps and cfg.abort_below else None)
        score, trained = record[cfg.metric], record["trained"]
        stopped = trained < steps  # --abort-below: a hopeless change, stepped back
        # 5. keep the change or step back to the snapshot
        r, paired = ratio(score, m.reference, cfg.metric), None
        if cfg.judge == "paired" and steps and not stopped:
            r = judged_paired(m, score, steps, spec, data)
            paired = m.paired["score"]
        kept = r >= cfg.threshold and not stopped
        reference_before = m.reference
        dead: list[str] = []
        if kept:
            accept(m, trial, cand)
            if cfg.judge == "paired" and cfg.reference == "base":
                m.standing = r
            dead = remove_dead_masks(m, spec, data)
            if cfg.reference == "previous":
                m.reference = score
        else:
            step_back(m, cand)
        if not free:
            strategy.update(cand, kept)
            m.strategy_state = copy.deepcopy(strategy.state_dict())
        m.step += 1
        m.steps_trained += trained
        elapsed = time.perf_counter() - t0
        m.seconds += elapsed
        entry = decision_record(m, cand, record, reference_before, r, kept, elapsed) | {
            "dead": dead, "steps_trained": trained, "paired_reference": paired,
            "stopped_early": stopped, "trajectory": record["trajectory"]}
        if free:
            entry |= {"phase": "free", "strategy": "free"}
        m.log.append(entry)
        if hooks.on_decision:
            hooks.on_decision(m, entry)
        _save(m, hooks)
    if m.phase == "finetune":  # finish the network (minimize.finish)
        changed = any(d["kept"] for d in m.log)  # else the network is the trained base itself
        if cfg.finetune_steps and changed and m.finetune is None:
            before = evaluate(m.current.model, data.eval, spec.eval_crop, spec.device)
            before.pop("n_images")
            m.finetune = {"start": m.current.step, "steps": cfg.finetune_steps,
                          "scores_before": before, "weights_before": {
                              k: v.detach().cpu().clone()
                              for k, v in m.current.model.state_dict().items()}}
            m.current.reset_optimizer()
            _save(m, hooks)
        if m.finetune is not None and "scores_after" not in m.finetune:
            t0 = time.perf_counter()
            after = finetune(m.current, m.finetune, spec, data, lambda: _save(m, hooks))
            before = m.finetune["scores_before"]
            m.finetune["kept"] = ratio(after[cfg.metric], before[cfg.metric], cfg.metric) >= 1
            if not m.finetune["kept"]:  # it lowered the score: the network before it stays
                m.current.model.load_state_dict(m.finetune["weights_before"])
                after = before
            m.finetune["scores_after"] = after
            del m.finetune["weights_before"]
            m.steps_trained += m.finetune["steps"]
            m.seconds += time.perf_counter() - t0
        m.phase = "done"
    _save(m, hooks)
    return m


def select(m: Minimization, strategy: Strategy, spec: TrainSpec,
           data: Datasets) -> Candidate | None:
    """The next candidate of the current phase, or None when the phase is over."""
    model = m.current.model
    if m.phase == "free":  # each nearly dead mask once, deadest first
        prunable = prunable_masks(model)
        while m.free:
            key = m.free.pop(0)
            if key in prunable:
                return Candidate("mask", *key)
        return None
    if m.phase == "masks":
        prunable = [p for p in prunable_masks(model) if p not in m.tested]
        if not prunable:
            return None
        loss_fn = LOSSES[spec.loss]
        ctx = SelectionContext(
            model=model, prunable=prunable, failed=frozenset(m.failed), step=m.step, rng=m.rng,
            batches=lambda: eval_batches(spec, data), loss_fn=loss_fn,
            trial=lambda c: _oracle_trial(m, c, spec, data))
        cand = strategy.propose(ctx)
        if cand is not None and (cand in m.failed or (cand.layer, cand.mask) not in prunable):
            raise RuntimeError(f"strategy {strategy.name} proposed an invalid candidate {cand}")
        return cand
    if m.phase == "layers":
        if len(model.layers) < 2:
            return None
        for layer in removable_layers(model):
            if m.origin[layer][0] not in m.tried_layers:
                return Candidate("layer", layer)
    return None


def alter(m: Minimization, cand: Candidate, spec: TrainSpec) -> TrainState:
    """A copy of the snapshot with the candidate applied and a fresh optimizer."""
    trial = clone_state(m.current)
    if cand.kind == "layer":
        return remove_hidden_layer(trial, cand.layer, spec.init)
    apply_mask_candidate(trial, cand, m.config.mode, reinit=m.config.reinit, init=spec.init)
    trial.reset_optimizer()
    return trial


def accept(m: Minimization, trial: TrainState, cand: Candidate) -> None:
    """Keep the change: the trial becomes the snapshot."""
    if cand.kind == "layer":
        compacted = [[o[0], *[o[1 + k] for k, on in enumerate(layer.enabled.tolist()) if on]]
                     for o, layer in zip(m.origin, m.current.model.layers)]
        m.tried_layers.append(m.origin[cand.layer][0])
        m.origin = [o for i, o in enumerate(compacted) if i != cand.layer]
    elif m.config.mode != REMOVING_MODE:
        unfreeze_others(trial.model)
        m.tested.append((cand.layer, cand.mask))
    trial.reset_optimizer()
    m.current = trial
    m.failed = []
    m.paired = None  # a new snapshot: its unchanged retrain is still to run


def remove_dead_masks(m: Minimization, spec: TrainSpec, data: Datasets) -> list[str]:
    """After a kept change: disable and freeze every hidden mask of the snapshot whose output is
    zero on every eval pixel (a *dead* mask: removing it cannot change the eval score). Returns
    their names in the original network."""
    model = m.current.model
    dead = dead_masks(mask_activity(model, (x for x, _ in eval_batches(spec, data))), model)
    for layer, mask in dead:
        model.set_enabled(layer, mask, False)
        model.set_frozen(layer, mask, True)
    return [Candidate("mask", m.origin[layer][0], m.origin[layer][1 + mask]).describe()
            for layer, mask in dead]


def step_back(m: Minimization, cand: Candidate) -> None:
    """Discard the trial: the snapshot stays, its optimizer is reset (thesis 2.4)."""
    if cand.kind == "layer":
        m.tried_layers.append(m.origin[cand.layer][0])
    elif m.config.mode != REMOVING_MODE:
        m.tested.append((cand.layer, cand.mask))
    m.failed.append(cand)
    m.current.reset_optimizer()


def _oracle_trial(m: Minimization, cand: Candidate, spec: TrainSpec, data: Datasets) -> float:
    """Score (higher is better) of the snapshot with ``cand`` applied and a short retrain; the
    snapshot itself is not touched."""
    trial = alter(m, cand, spec)
    steps = m.config.oracle_steps
    if steps == 0:
        score = evaluate(trial.model, data.eval, spec.eval_crop, spec.device)[m.config.metric]
    else:
        m.steps_trained += steps
        score = retrain(trial, steps, spec, data, judge=m.config.judge,
                        metric=m.config.metric)[m.config.metric]
    return score if METRICS[m.config.metric].higher_is_better else -score


def decision_record(m: Minimization, cand: Candidate, record: dict[str, Any], reference: float,
                    r: float, kept: bool, seconds: float) -> dict[str, Any]:
    # the log names original indices; for a kept layer removal, origin is already updated
    if cand.kind == "mask":
        named = Candidate("mask", m.origin[cand.layer][0], m.origin[cand.layer][1 + cand.mask])
    else:
        named = Candidate("layer", m.tried_layers[-1])
    return {
        "step": m.step,
        "phase": "layers" if cand.kind == "layer" else "masks",
        "strategy": m.config.strategy if cand.kind == "mask" else "layer-sweep",
        "tried": named.describe(),
        "layer": named.layer + 1,
        "mask": None if named.mask is None else named.mask + 1,
        "metric": m.config.metric,
        "reference": reference,
        "score": record[m.config.metric],
        "ratio": r,
        "threshold": m.config.threshold,
        "kept": kept,
        "steps_trained": m.config.retrain_steps,
        "active": list(m.current.model.active_widths()),
        "f1": record["f1"], "mae": record["mae"], "mse": record["mse"], "uiqi": record["uiqi"],
        "seconds": round(seconds, 3),
    }


def _save(m: Minimization, hooks: LoopHooks) -> None:
    if hooks.on_save:
        hooks.on_save(m)
