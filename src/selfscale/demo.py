"""The whole story on the bundled images: train, minimize, export, compare, and show pictures.

Defaults follow the thesis's step counts (10 000 base steps, 2000 retrain steps per decision) on
128×128 training crops, so the whole demo takes a few minutes on a 2-core laptop CPU; strategy
``l1`` at threshold 0.95 of the base score.
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
                              TrainConfig)
from selfscale.data import center_crops
from selfscale.minimize.session import load_network, minimize_run
from selfscale.run import default_run_dir, prepare_data, start_run, train_run
from selfscale.train import TrainHooks, as_input
from selfscale.visualize import mask_picture, preview_grid


@dataclass
class DemoConfig:
    """Options of ``selfscale demo``."""

    task: str = "sobel"
    out: Path | None = None
    steps: int = 10_000
    train_crop: int = 128
    retrain_steps: int = 2000
    strategy: str = "l1"
    threshold: float = 0.95
    seed: int = 0
    device: str = "auto"
    threads: int = 0


def run_demo(cfg: DemoConfig, *, progress: bool = False, train_hooks: TrainHooks | None = None,
             on_decision=None, on_phase=None) -> dict[str, Any]:
    """Train → minimize → export (torch and ONNX) → speed → previews. Returns a summary dict."""
    phase = on_phase or (lambda name: None)
    t0 = time.perf_counter()
    config = RunConfig(
        data=DataConfig(train_crop=cfg.train_crop),
        task=TaskConfig(name=cfg.task),
        model=ModelConfig(),
        train=TrainConfig(steps=cfg.steps, eval_every=max(cfg.steps // 10, 1), seed=cfg.seed,
                          device=cfg.device, threads=cfg.threads),
    )
    out = cfg.out or default_run_dir(f"demo-{cfg.task}")
    phase(f"1/4 training the {'/'.join(map(str, config.model.widths))} network on "
          f"'{cfg.task}' ({cfg.steps} steps) → {out}")
    run = start_run(config, out)
    data = prepare_data(run.config, progress=progress)
    train_run(run, hooks=train_hooks, datasets=data)
    t_train = time.perf_counter() - t0

    phase(f"2/4 minimizing with strategy '{cfg.strategy}', threshold {cfg.threshold}")
    mcfg = MinimizeConfig(strategy=cfg.strategy, threshold=cfg.threshold,
                          retrain_steps=cfg.retrain_steps, seed=cfg.seed)
    result = minimize_run(out, mcfg, device=cfg.device, on_decision=on_decision)
    t_min = time.perf_counter() - t0 - t_train

    phase("3/4 exporting the compact network (torch and ONNX) and timing it")
    _, base_model, _ = load_network(out, "base", cfg.device)
    _, min_model, _ = load_network(out, "minimized", cfg.device)
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
                                            "masks_minimized.png")],
        "seconds": {"train": round(t_train, 1), "minimize": round(t_min, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
