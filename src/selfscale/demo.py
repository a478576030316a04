"""The whole story on the bundled images: train, minimize, export, compare, and show pictures.

Training follows the default (capacity) recipe on 64×64 crops, batch 3, with half its steps
(55 000); the minimization uses the recipe's 7000 retrain steps per decision and a 7000-step
fine-tune, so the whole demo takes a few minutes on a 2-core laptop CPU; strategy ``l1`` at
threshold 0.95 of the base score.
Evaluation uses the thesis's 256×256 centre crops of the four bundled eval images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfscale.compact import compact_model, compare_speed, export
from selfscale.config import (DataConfig, MinimizeConfig, ModelConfig, RunConfig, TaskConfig,
                              TrainConfig, _check, _int)
from selfscale.crops import center_crops
from selfscale.minimize.session import minimize_run
from selfscale.run import (check_new_run_dir, default_run_dir, network, prepare_data, start_run,
                           train_run)
from selfscale.train import TrainHooks, as_input
from selfscale.pictures import write_pictures
from selfscale.visualize import mask_picture, preview_grid

DEMO_TASKS = ("sobel", "canny", "otsu")


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``selfscale demo``; validated at construction, before minutes of training."""

    task: str = "sobel"
    """--task: operator to learn on the bundled images (sobel, canny or otsu)."""
    out: Path | None = None
    """--out: run directory to create (default runs/demo-<task>, numbered if taken)."""
    steps: int = 55_000
    """--steps: base training steps."""
    train_crop: int = 64
    """--train-crop: side of the training crops (evaluation uses 256)."""
    retrain_steps: int = 7000
    """--retrain-steps: training steps after every alteration."""
    finetune_steps: int = 7000
    """--finetune-steps: training steps that finish the minimized network; 0 skips them."""
    strategy: str = "l1"
    """--strategy: selection strategy."""
    threshold: float = 0.95
    """--threshold: keep a change if score_new >= threshold × the base score."""
    seed: int = 0
    """--seed: random seed of training and minimization."""
    device: str = "auto"
    """--device: auto (CUDA when present), cpu or cuda."""
    threads: int = 0
    """--threads: CPU threads for torch; 0 means torch's default."""
    conv: str = "auto"
    """--conv: CPU convolution: direct, torch or auto (direct when a C++ compiler builds it)."""

    def __post_init__(self) -> None:
        from selfscale.minimize.strategies import make_strategy

        _check(self.task in DEMO_TASKS, "--task", self.task,
               f"must be one of {', '.join(DEMO_TASKS)}")
        _check(_int(self.steps) and self.steps >= 1, "--steps", self.steps,
               "must be a positive integer")
        make_strategy(self.strategy)
        self.run_config()
        self.minimize_config()
        if self.out is not None:
            check_new_run_dir(self.out)

    def run_config(self) -> RunConfig:
        return RunConfig(
            data=DataConfig(train_crop=self.train_crop),
            task=TaskConfig(name=self.task),
            model=ModelConfig(),
            train=TrainConfig(steps=self.steps, eval_every=max(self.steps // 10, 1),
                              seed=self.seed, device=self.device, threads=self.threads,
                              conv=self.conv))

    def minimize_config(self) -> MinimizeConfig:
        return MinimizeConfig(strategy=self.strategy, threshold=self.threshold,
                              retrain_steps=self.retrain_steps,
                              finetune_steps=self.finetune_steps, seed=self.seed)


def run_demo(cfg: DemoConfig, *, progress: bool = False, train_hooks: TrainHooks | None = None,
             on_decision=None, on_phase=None) -> dict[str, Any]:
    """Train → minimize → export (torch and ONNX) → speed → previews. Returns a summary dict."""
    phase = on_phase or (lambda name: None)
    t0 = time.perf_counter()
    config = cfg.run_config()
    out = cfg.out or default_run_dir(f"demo-{cfg.task}")
    phase(f"1/4 training the {'/'.join(map(str, config.model.widths))} network on "
          f"'{cfg.task}' ({cfg.steps} steps) → {out}")
    run = start_run(config, out)
    data = prepare_data(run.config, progress=progress)
    train_run(run, data, hooks=train_hooks)
    t_train = time.perf_counter() - t0

    phase(f"2/4 minimizing with strategy '{cfg.strategy}', threshold {cfg.threshold}")
    result = minimize_run(run, data, cfg.minimize_config(), on_decision=on_decision)
    t_min = time.perf_counter() - t0 - t_train

    phase("3/4 exporting the compact network (torch and ONNX) and timing it")
    base_model, _ = network(run, "base")
    min_model, _ = network(run, "minimized")
    x_np, y_np = center_crops(data.eval, config.data.crop)
    device = next(min_model.parameters()).device
    x = as_input(x_np, device)
    meta = {"task": run.config.task.name, "task_params": run.config.task.params,
            "source_run": str(out)}
    exports = {fmt: export(min_model, fmt, out / "export" / f"compact.{ext}", check_inputs=x,
                           meta=meta)
               for fmt, ext in (("torch", "pt"), ("onnx", "onnx"))}
    speed = compare_speed(min_model, compact_model(min_model), x)
    speed_base = compare_speed(base_model, compact_model(min_model), x)

    phase("4/4 writing pictures")
    with torch.no_grad():
        base_out = base_model(x).float().cpu().numpy()
        min_out = min_model(x).float().cpu().numpy()
    rows = [[x_np[i, 0], y_np[i, 0], base_out[i, 0], min_out[i, 0]] for i in range(len(x_np))]
    full = "/".join(map(str, base_model.active_widths()))
    small = "/".join(map(str, min_model.active_widths()))
    preview_grid(rows, ["input", f"target ({cfg.task})", f"full {full}",
                        f"minimal {small}"]).save(out / "preview.png")
    mask_picture(base_model).save(out / "masks_base.png")
    mask_picture(min_model).save(out / "masks_minimized.png")
    write_pictures(out, out / "pictures", stage="minimized")  # what selfscale visualize writes
    return {
        "run_dir": str(out),
        "n_eval": len(x_np),
        "summary": result.summary,
        "exports": {k: str(v.path) for k, v in exports.items()},
        "export_max_abs_diff": exports["torch"].max_abs_diff,
        "onnx_max_abs_diff": exports["onnx"].onnx_max_abs_diff,
        "speed_masked_vs_compact": speed,
        "speed_base_vs_compact": speed_base,
        "pictures": [str(out / n) for n in ("preview.png", "masks_base.png",
                                            "masks_minimized.png")] + [str(out / "pictures")],
        "seconds": {"train": round(t_train, 1), "minimize": round(t_min, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
