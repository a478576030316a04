"""The command line: a table from subcommand to function, argument parsing and result formatting.

Nothing below this module reads ``sys.argv`` or prints results. User errors (bad values, missing
files, corrupt checkpoints) are printed as one line ``selfscale: error: …`` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfscale import __version__
from selfscale.errors import ConfigError, SelfscaleError

# flag → (config section, field, parser). Only flags listed here feed the run config.
CONFIG_FLAGS: dict[str, tuple[str, str]] = {
    "task": ("task", "name"),
    "data": ("data", "data"),
    "eval_data": ("data", "eval_data"),
    "targets": ("data", "targets"),
    "eval_targets": ("data", "eval_targets"),
    "crop": ("data", "crop"),
    "train_crop": ("data", "train_crop"),
    "batch": ("data", "batch"),
    "flips": ("data", "flips"),
    "eval_fraction": ("data", "eval_fraction"),
    "split_seed": ("data", "split_seed"),
    "max_images": ("data", "max_images"),
    "cache_dir": ("data", "cache_dir"),
    "widths": ("model", "widths"),
    "kernel": ("model", "kernel"),
    "init_std": ("model", "init_std"),
    "steps": ("train", "steps"),
    "eval_every": ("train", "eval_every"),
    "loss": ("train", "loss"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "threads": ("train", "threads"),
    "checkpoint_every": ("train", "checkpoint_every"),
}
# What may differ when a run is resumed: its length and where/how fast it runs.
RESUME_OVERRIDES = {"steps", "device"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 5,5,1, got {text!r}") from None
    return values


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


# --- subcommand: train --------------------------------------------------------------------------

def _add_train_args(p: argparse.ArgumentParser) -> None:
    from selfscale.tasks import TASKS

    g = p.add_argument_group("task")
    tasks = "; ".join(f"{t.name}: {t.description}"
                      for t in sorted(TASKS.values(), key=lambda t: t.name))
    g.add_argument("--task", choices=sorted(TASKS),
                   help="the operator to learn: " + tasks.replace("%", "%%"))
    g.add_argument("--task-param", action="append", metavar="KEY=VALUE", default=[],
                   help="override an operator parameter, e.g. sigma=2.0 for canny (repeatable); "
                        "every parameter is stored with the run")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, metavar="DIR",
                   help="folder of images, searched recursively (png, jpg, tif, bmp, webp); "
                        "default: scikit-image's bundled sample images with a fixed split")
    g.add_argument("--eval-data", type=Path, metavar="DIR",
                   help="folder of evaluation images (default: a seeded split of --data by file)")
    g.add_argument("--targets", type=Path, metavar="DIR",
                   help="task pairs: folder of target images named like the --data images")
    g.add_argument("--eval-targets", type=Path, metavar="DIR",
                   help="task pairs with --eval-data: folder of evaluation targets")
    g.add_argument("--crop", type=int, metavar="N",
                   help="side of the evaluation centre crop (default 256, as the thesis)")
    g.add_argument("--train-crop", type=int, metavar="N",
                   help="side of the random training crops (default: --crop)")
    g.add_argument("--batch", type=int, metavar="N", help="crops per training step (default 3)")
    g.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal/vertical flips of training crops (default off)")
    g.add_argument("--eval-fraction", type=float, metavar="F",
                   help="share of --data files held out for evaluation (default 0.2)")
    g.add_argument("--split-seed", type=int, metavar="N",
                   help="seed of the train/eval split by file (default 0)")
    g.add_argument("--max-images", type=int, metavar="N",
                   help="use at most N files per split (default: all)")
    g.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="cache of decoded inputs and targets (default $SELFSCALE_CACHE or "
                        "~/.cache/selfscale)")
    g = p.add_argument_group("model")
    g.add_argument("--widths", type=_widths, metavar="W1,W2,...",
                   help="masks per layer, the last (output) must be 1 (default 5,5,1)")
    g.add_argument("--kernel", type=int, metavar="K", help="odd mask side (default 5)")
    g.add_argument("--init-std", type=_positive_float, metavar="S",
                   help="std of the truncated-normal initialization (default 0.05)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, metavar="N", help="training steps in total (default 10000)")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="evaluate on the whole eval set every N steps (default 500)")
    g.add_argument("--loss", choices=["mae", "mse", "f1"],
                   help="training loss (default: mae for sobel and pairs, mse for the binary "
                        "tasks canny and otsu)")
    g.add_argument("--lr", type=_positive_float, metavar="X", help="Adam learning rate (default 0.001)")
    g.add_argument("--seed", type=int, metavar="N", help="random seed (default 0)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where to train: auto uses CUDA when present (default auto)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: torch's choice); bit-identical results need the "
                        "same count, and a resumed run keeps the count it started with")
    g.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save the run state every N steps (default: at every evaluation)")
    g = p.add_argument_group("run")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file with [data] [task] [model] [train] tables; flags override it")
    g.add_argument("--out", type=Path, metavar="RUN_DIR",
                   help="run directory to create (default runs/<task>, numbered if taken); "
                        "never overwritten")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (only --steps "
                        "and --device may change)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """defaults < --config file < flags; returns a validated RunConfig."""
    from selfscale.config import RunConfig, load_toml
    from selfscale.tasks import parse_task_params

    raw: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items()}
    if getattr(args, "config", None) is not None:
        for section, values in load_toml(args.config).items():
            if not isinstance(values, dict):
                raise ConfigError(f"--config: {section!r} must be a table like [{section}]")
            raw.setdefault(section, {}).update(values)
    for flag, (section, key) in CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            raw.setdefault(section, {})[key] = value
    if getattr(args, "task_param", None):
        task = raw.setdefault("task", {})
        task["params"] = {**task.get("params", {}), **parse_task_params(args.task_param)}
    return RunConfig.from_dict(raw)


def cmd_train(args: argparse.Namespace) -> int:
    from selfscale.run import (check_new_run_dir, default_run_dir, load_run, prepare_data,
                               start_run, train_run)

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume: name the run to continue with --out RUN_DIR")
        given = [f for f in CONFIG_FLAGS if getattr(args, f, None) is not None]
        fixed = [f for f in given if f not in RESUME_OVERRIDES]
        if fixed or args.task_param or args.config:
            name = (fixed[0] if fixed else "task_param" if args.task_param else "config")
            raise ConfigError(f"--{name.replace('_', '-')}: cannot be changed when resuming; a "
                              "resumed run keeps its stored config, and its thread count (only "
                              "--steps and --device may change)")
        from selfscale.minimize.session import MIN_DIR

        if (args.out / MIN_DIR).exists():
            raise ConfigError(f"--resume: {args.out} has been minimized; training its base "
                              "network further would leave the minimization stale (copy the run "
                              "or start a new one)")
        run = load_run(args.out, args.device or "auto")
        if args.steps is not None:
            if args.steps < run.state.step:
                raise ConfigError(f"--steps: the run is already at step {run.state.step}; give "
                                  f"at least that many")
            run.config.train.steps = args.steps
        data = prepare_data(run.config, progress=not args.quiet)
    else:
        config = config_from_args(args)
        out = args.out or default_run_dir(config.task.name)
        check_new_run_dir(out)
        data = prepare_data(config, progress=not args.quiet)  # bad data fails before any file
        run = start_run(config, out)
    progress, hooks = _train_progress(run.config.train.steps, quiet=args.quiet,
                                      start=run.state.step)
    t0 = time.perf_counter()
    try:
        train_run(run, progress=not args.quiet, hooks=hooks, datasets=data)
    finally:
        progress.close()
    _print_train_summary(run, time.perf_counter() - t0)
    return 0


def _train_progress(total: int, *, quiet: bool, start: int = 0):
    from tqdm import tqdm

    from selfscale.train import TrainHooks

    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=quiet,
               dynamic_ncols=True, file=sys.stderr)
    last: dict[str, str] = {}

    def on_step(step: int, loss: float) -> None:
        bar.update(step - bar.n)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", **last, refresh=False)

    def on_eval(state, record: dict[str, Any]) -> None:
        last["f1"] = f"{record['f1']:.4f}"
        bar.set_postfix(loss=f"{record['loss']:.4f}", **last)
        if quiet:
            return
        bar.write(f"step {record['step']:>6}  loss {record['loss']:.5f}  f1 {record['f1']:.4f}  "
                  f"mae {record['mae']:.5f}  uiqi {record['uiqi']:.4f}", file=sys.stderr)

    return bar, TrainHooks(on_step=on_step, on_eval=on_eval)


def _print_train_summary(run, elapsed: float) -> None:
    from selfscale.train import best_record

    hist = run.state.history
    print(f"run: {run.path}")
    print(f"task: {run.config.task.name}  steps: {run.state.step}  time: {elapsed:.1f} s")
    if hist:
        last, best = hist[-1], best_record(hist)
        print(f"final  f1 {last['f1']:.4f}  mae {last['mae']:.5f}  mse {last['mse']:.6f}  "
              f"uiqi {last['uiqi']:.4f}")
        print(f"best   f1 {best['f1']:.4f} at step {best['step']}")


# --- evaluate / predict / info ------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from selfscale.data import load_eval_set
    from selfscale.minimize.session import load_network
    from selfscale.run import prepare_data, resolved_task
    from selfscale.train import evaluate

    run, model, stage = load_network(args.run_dir, args.stage, args.device)
    task, params = resolved_task(run.config)
    if args.crop is not None and not 8 <= args.crop <= 8192:
        raise ConfigError(f"--crop: must be an integer between 8 and 8192, got {args.crop}")
    crop = None if args.full else (args.crop or run.config.data.crop)
    if args.data is not None:
        if task.from_files and args.targets is None:
            raise ConfigError("--targets: task 'pairs' needs the target folder for --data")
        data_cfg = dataclasses.replace(run.config.data, crop=8) if args.full else run.config.data
        images = load_eval_set(args.data, data_cfg, task, params, targets=args.targets)
    else:
        images = prepare_data(run.config).eval
    if crop is not None:
        too_small = [(n, x.shape) for n, x in zip(images.names, images.inputs)
                     if min(x.shape) < crop]
        if too_small:
            name, (h, w) = too_small[0]
            raise ConfigError(f"--crop: {crop} does not fit {len(too_small)} eval image(s), e.g. "
                              f"{name} ({h}×{w}); use a smaller --crop or --full")
    device = next(model.parameters()).device
    scores = evaluate(model, images, crop, device)
    if args.json:
        print(json.dumps({k: scores[k] for k in ("f1", "mae", "mse", "uiqi", "n_images")}
                         | {"stage": stage}))
    else:
        print(f"{run.path} ({stage} network): {scores['n_images']} eval images, "
              + (f"centre crop {crop}" if crop else "whole images"))
        for k in ("f1", "mae", "mse", "uiqi"):
            print(f"  {k:<5} {scores[k]:.6f}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from selfscale.predict import predict_files

    model, label = _model_for_predict(args.run_dir, args.stage, args.device)
    device = next(model.parameters()).device
    report = predict_files(model, args.inputs, args.out, device, overwrite=args.overwrite)
    print(f"wrote {len(report.written)} image(s) to {args.out} ({label})")
    return 0


def _model_for_predict(source: Path, stage: str, device: str):
    """A run directory (base or minimized network) or a compact model file from `export`."""
    from selfscale.compact import load_compact
    from selfscale.minimize.session import load_network
    from selfscale.train import resolve_device, to_device

    if source.is_file():
        if source.suffix == ".onnx":
            raise ConfigError(f"{source}: predict takes a run directory or a compact .pt file; "
                              "run ONNX models with onnxruntime")
        model = load_compact(source).to(resolve_device(device))
        return to_device(model, resolve_device(device)), f"compact model {source.name}"
    _, model, used = load_network(source, stage, device)
    return model, f"{used} network"


def cmd_info(args: argparse.Namespace) -> int:
    from selfscale.minimize.session import load_network, load_summary
    from selfscale.run import run_info

    run, model, stage = load_network(args.run_dir, args.stage)
    run.state.model = model
    info = run_info(run) | {"stage": stage, "minimization": load_summary(args.run_dir)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    arch = info["architecture"]
    print(f"run        {info['run_dir']}  ({stage} network)")
    params = ", ".join(f"{k}={v}" for k, v in info["task"]["params"].items())
    print(f"task       {info['task']['name']}" + (f" ({params})" if params else ""))
    print(f"network    {arch['layers']} layers, widths {arch['widths']}, kernel "
          f"{arch['kernel']}×{arch['kernel']}, {arch['parameters']} parameters "
          f"({arch['active_parameters']} in enabled masks)")
    for i, (en, fr) in enumerate(zip(arch["enabled"], arch["frozen"])):
        row = " ".join(("#" if e else ".") + ("*" if f else " ") for e, f in zip(en, fr))
        print(f"  layer {i + 1}  {sum(en)}/{len(en)} active   {row}")
    print("           (# enabled, . disabled, * frozen)")
    print(f"step       {info['step']} of {info['target_steps']}")
    for label, rec in (("last eval", info["last_eval"]), ("best eval", info["best_eval"])):
        if rec:
            print(f"{label:<10} step {rec['step']}: f1 {rec['f1']:.4f}  mae {rec['mae']:.5f}  "
                  f"mse {rec['mse']:.6f}  uiqi {rec['uiqi']:.4f}")
    cfg = info["config"]
    print(f"training   loss {cfg['train']['loss']}, lr {cfg['train']['lr']}, batch "
          f"{cfg['data']['batch']}, crop {cfg['data']['crop']}, seed {cfg['train']['seed']}, "
          f"threads {info['threads']}")
    if info.get("data"):
        d = info["data"]
        print(f"data       {d['source']}: {len(d['train'])} train, {len(d['eval'])} eval images")
    if info["minimization"]:
        _print_minimize_summary(info["minimization"])
    return 0


# --- the table ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfscale", description=(
        "Train a small fully convolutional network to imitate an image operator, then find the "
        "smallest network that still does it."))
    parser.add_argument("--version", action="version", version=f"selfscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a network on a task",
                       description="Train the FCN on a task; writes a resumable run directory.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="F1, MAE, MSE and UIQI of a run on eval images",
                       description="Evaluate a run on its eval images or on another folder.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="evaluate on every usable image in DIR (default: the run's eval set)")
    p.add_argument("--targets", type=Path, metavar="DIR", help="task pairs: targets for --data")
    p.add_argument("--crop", type=int, metavar="N",
                   help="centre crop side (default: the run's --crop)")
    p.add_argument("--full", action="store_true", help="evaluate whole images instead of crops")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with f1, mae, mse, uiqi, n_images")
    _add_stage(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write the network's output for images as PNGs",
                       description="Run the network on whole images; one 8-bit PNG per input, "
                                   "same height and width (output clipped to [0,1], ×255).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|MODEL.pt",
                   help="a run directory, or a compact model written by 'selfscale export'")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="image files or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto)")
    _add_stage(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="config, architecture, switches and scores of a run",
                       description="Show what a run directory holds.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_stage(p)
    p.set_defaults(func=cmd_info)

    add_minimize_parsers(sub)
    return parser


def _add_stage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=["auto", "base", "minimized"], default="auto",
                   help="which network of the run: auto = the minimized one when the run has "
                        "been minimized, else the base network (default auto)")


# --- minimize / export / demo -------------------------------------------------------------------

MINIMIZE_FLAGS = ("strategy", "threshold", "retrain_steps", "base_steps", "mode", "reference",
                  "layers", "max_steps", "metric", "patience", "random_steps", "oracle_steps",
                  "reinit", "seed")


def _strategy_names() -> list[str]:
    from selfscale.minimize.proposal import STRATEGIES
    import selfscale.minimize.strategies  # noqa: F401

    return sorted(STRATEGIES)


def add_minimize_parsers(sub) -> None:
    from selfscale.config import MinimizeConfig

    d = MinimizeConfig()
    p = sub.add_parser("minimize", help="find the smallest network that still does the task",
                       description="Alter the trained network one decision at a time (disable a "
                       "mask or remove a layer), retrain, and keep the change if score_new >= "
                       "threshold × reference, else step back (thesis 2.4). Results go to "
                       "RUN_DIR/minimize/ (or a new run with --out).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument("--strategy", default=d.strategy, metavar="NAME",
                   help=f"selection strategy (default {d.strategy}): "
                        + ", ".join(_strategy_names()))
    p.add_argument("--threshold", type=float, default=d.threshold, metavar="T",
                   help=f"keep a change when score_new >= T × reference; T in (0, 1] "
                        f"(default {d.threshold})")
    p.add_argument("--retrain-steps", type=int, default=d.retrain_steps, metavar="N",
                   help=f"training steps after every alteration (default {d.retrain_steps})")
    p.add_argument("--base-steps", type=int, metavar="N",
                   help="first train the run up to N steps (default: use it as it is)")
    p.add_argument("--mode", default=d.mode, choices=["disabled-frozen", "disabled",
                                                       "others-frozen"],
                   help="how a mask's worth is tested (thesis 2.4.1): disabled-frozen removes it "
                        "(default); disabled / others-frozen reset it and let it relearn "
                        "(nothing is removed)")
    p.add_argument("--reference", default=d.reference, choices=["base", "previous"],
                   help="compare with the base score (default; kept changes cannot compound) "
                        "or with the last kept score (the thesis)")
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=d.layers,
                   help="after the masks, try removing whole hidden layers (default on)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="at most N minimization steps (decisions) in total")
    p.add_argument("--metric", default=d.metric, choices=["f1", "uiqi", "mae", "mse"],
                   help=f"eval score compared with the threshold (default {d.metric}, the "
                        "mean soft F1)")
    p.add_argument("--patience", type=int, default=d.patience, metavar="N",
                   help=f"ranked strategies stop after N consecutive step-backs "
                        f"(default {d.patience}, as the thesis's cosmax)")
    p.add_argument("--random-steps", type=int, default=d.random_steps, metavar="N",
                   help=f"the random strategy stops after N steps (default {d.random_steps})")
    p.add_argument("--oracle-steps", type=int, default=d.oracle_steps, metavar="N",
                   help=f"short retrain per mask tried by the oracle (default {d.oracle_steps})")
    p.add_argument("--reinit", action="store_true",
                   help="modes disabled/others-frozen: redraw the mask instead of zeroing it")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help="seed of the minimization's own random choices (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write a new run directory (a copy of the base run plus the "
                        "minimization) instead of minimizing RUN_DIR in place")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed minimization from its last decision")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_minimize)

    p = sub.add_parser("export", help="write the physically smaller network (torch or ONNX)",
                       description="Build the compact network (disabled masks, their biases and "
                       "the next layer's matching inputs removed), check it against the masked "
                       "network on the eval images (max abs difference <= 1e-5), then write it.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--format", choices=["torch", "onnx"],
                   help="torch: tensors + architecture, loadable with torch.load(weights_only="
                        "True); onnx: verified with onnxruntime (default: onnx for a .onnx "
                        "--out, else torch)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where to verify (default cpu)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_stage(p)
    p.set_defaults(func=cmd_export)

    from selfscale.demo import DemoConfig

    dd = DemoConfig()
    p = sub.add_parser("demo", help="the whole story on the bundled images (a few minutes)",
                       description="Train on the bundled scikit-image samples, minimize, export "
                       "(torch and ONNX), time masked vs compact, and write PNG previews.")
    p.add_argument("--task", default=dd.task, choices=["sobel", "canny", "otsu"],
                   help=f"operator to learn (default {dd.task})")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="run directory to create (default runs/demo-<task>, numbered if taken)")
    p.add_argument("--steps", type=int, default=dd.steps, metavar="N",
                   help=f"base training steps (default {dd.steps})")
    p.add_argument("--train-crop", type=int, default=dd.train_crop, metavar="N",
                   help=f"training crop side (default {dd.train_crop}; eval uses 256)")
    p.add_argument("--retrain-steps", type=int, default=dd.retrain_steps, metavar="N",
                   help=f"steps after every alteration (default {dd.retrain_steps})")
    p.add_argument("--strategy", default=dd.strategy, metavar="NAME",
                   help=f"selection strategy (default {dd.strategy})")
    p.add_argument("--threshold", type=float, default=dd.threshold, metavar="T",
                   help=f"keep threshold (default {dd.threshold})")
    p.add_argument("--seed", type=int, default=dd.seed, metavar="N", help="random seed (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_demo)


def _decision_printer(quiet: bool):
    def on_decision(m, d) -> None:
        if quiet:
            return
        verdict = "kept" if d["kept"] else "stepped back"
        print(f"  step {d['step']:>3}  {d['tried']:<20} {d['metric']} {d['score']:.4f}  "
              f"ratio {d['ratio']:.3f} {'>=' if d['kept'] else '<'} {d['threshold']}  "
              f"{verdict:<12}  active {'/'.join(map(str, d['active']))}  "
              f"({d['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return on_decision


def cmd_minimize(args: argparse.Namespace) -> int:
    from selfscale.config import MinimizeConfig
    from selfscale.minimize.proposal import StrategyOptions, make_strategy
    from selfscale.minimize.session import minimize_run
    from selfscale.run import require_run_dir

    config = MinimizeConfig(**{k: getattr(args, k) for k in MINIMIZE_FLAGS})
    make_strategy(config.strategy, StrategyOptions(config.patience, config.random_steps,
                                                   config.oracle_steps))  # validate early
    require_run_dir(args.run_dir)
    hooks = None
    bar = None
    if config.base_steps is not None and not args.quiet:
        bar, hooks = _train_progress(config.base_steps, quiet=args.quiet)
    if not args.quiet and args.resume:
        print(f"resuming the minimization in {args.out or args.run_dir} with its stored "
              "settings (the minimize options given now are not used)", file=sys.stderr)
    elif not args.quiet:
        print(f"minimizing {args.run_dir} with {config.strategy}, threshold {config.threshold} "
              f"of the {config.reference} {config.metric}, {config.retrain_steps} retrain steps",
              file=sys.stderr)
    try:
        result = minimize_run(args.run_dir, config, out=args.out, resume=args.resume,
                              device=args.device, on_decision=_decision_printer(args.quiet),
                              train_hooks=hooks)
    finally:
        if bar is not None:
            bar.close()
    print(f"run: {result.run_dir}")
    _print_minimize_summary(result.summary)
    return 0


def _print_minimize_summary(s: dict[str, Any]) -> None:
    before, after = s["scores_before"], s["scores_after"]
    print(f"minimization ({s['strategy']}, threshold {s['threshold']} of {s['reference']} "
          f"{s['metric']}, mode {s['mode']}): {s['decisions']} decisions, {s['kept']} kept, "
          f"{s['steps_trained']} retrain steps, {s['seconds']:.1f} s")
    print(f"  masks per layer  {'/'.join(map(str, s['widths_before']))} -> "
          f"{'/'.join(map(str, s['widths_after']))}   (prunable masks {s['masks_before']} -> "
          f"{s['masks_after']}, layers {s['layers_before']} -> {s['layers_after']})")
    print(f"  parameters       {s['parameters_before']} -> {s['parameters_after']}   "
          f"MACs/pixel {s['macs_per_pixel_before']} -> {s['macs_per_pixel_after']}")
    print(f"  f1 {before['f1']:.4f} -> {after['f1']:.4f}   uiqi {before['uiqi']:.4f} -> "
          f"{after['uiqi']:.4f}   mae {before['mae']:.5f} -> {after['mae']:.5f}")
    for i, row in enumerate(s["mask_matrix"]):
        print(f"  layer {i + 1}: " + " ".join("1" if on else "0" for on in row)
              + ("  (removed)" if not any(row) else ""))


def cmd_export(args: argparse.Namespace) -> int:
    import dataclasses

    from selfscale.compact import compact_model, compare_speed, export
    from selfscale.data import center_crops
    from selfscale.minimize.session import load_network
    from selfscale.run import prepare_data
    from selfscale.train import as_input

    run, model, stage = load_network(args.run_dir, args.stage, args.device)
    images = prepare_data(run.config).eval
    x_np, _ = center_crops(images, run.config.data.crop)
    x = as_input(x_np, next(model.parameters()).device)
    meta = {"task": run.config.task.name, "task_params": run.config.task.params,
            "source_run": str(run.path), "stage": stage}
    fmt = args.format or ("onnx" if args.out.suffix.lower() == ".onnx" else "torch")
    report = export(model, fmt, args.out, check_inputs=x, meta=meta, overwrite=args.overwrite)
    speed = compare_speed(model, compact_model(model), x)
    if args.json:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v)
                          for k, v in dataclasses.asdict(report).items()} | {"speed": speed}))
        return 0
    print(f"wrote {report.path} ({report.format}, {stage} network)")
    print(f"  widths      {'/'.join(map(str, report.widths_before))} -> "
          f"{'/'.join(map(str, report.widths_after))}")
    print(f"  parameters  {report.params_before} -> {report.params_after}   MACs/pixel "
          f"{report.macs_before} -> {report.macs_after}")
    print(f"  checked on {x.shape[0]} eval crops: max |masked - compact| = "
          f"{report.max_abs_diff:.2e}"
          + (f", max |onnxruntime - torch| = {report.onnx_max_abs_diff:.2e}"
             if report.onnx_max_abs_diff is not None else ""))
    print(f"  inference on the same crops (median of 20): masked {speed['masked_s'] * 1e3:.2f} ms,"
          f" compact {speed['compact_s'] * 1e3:.2f} ms ({speed['speedup']:.2f}x)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from selfscale.demo import DemoConfig, run_demo

    from selfscale.config import MinimizeConfig
    from selfscale.run import check_new_run_dir

    cfg = DemoConfig(task=args.task, out=args.out, steps=args.steps, train_crop=args.train_crop,
                     retrain_steps=args.retrain_steps, strategy=args.strategy,
                     threshold=args.threshold, seed=args.seed, device=args.device,
                     threads=args.threads)
    _strategy_check(cfg.strategy)  # every setting is checked before minutes of training
    MinimizeConfig(strategy=cfg.strategy, threshold=cfg.threshold,
                   retrain_steps=cfg.retrain_steps, seed=cfg.seed)
    if cfg.out is not None:
        check_new_run_dir(cfg.out)

    def phase(text: str) -> None:
        if not args.quiet:
            bar.write(text, file=sys.stderr)

    bar, hooks = _train_progress(cfg.steps, quiet=args.quiet)

    def on_phase(text: str) -> None:
        if not text.startswith("1/"):  # training is over: the progress bar is done
            bar.close()
        phase(text)

    try:
        res = run_demo(cfg, train_hooks=hooks, on_decision=_decision_printer(args.quiet),
                       on_phase=on_phase)
    finally:
        bar.close()
    s = res["summary"]
    print()
    print(f"selfscale demo: task {args.task}, run directory {res['run_dir']}")
    _print_minimize_summary(s)
    sp, sb = res["speed_masked_vs_compact"], res["speed_base_vs_compact"]
    print(f"  inference on the {res['n_eval']} eval crops: masked "
          f"{sp['masked_s'] * 1e3:.2f} ms, compact {sp['compact_s'] * 1e3:.2f} ms "
          f"({sp['speedup']:.2f}x); full base network {sb['masked_s'] * 1e3:.2f} ms "
          f"({sb['speedup']:.2f}x slower than compact)")
    print(f"  exports: {res['exports']['torch']}, {res['exports']['onnx']} (max |masked - "
          f"compact| {res['export_max_abs_diff']:.1e}, onnxruntime {res['onnx_max_abs_diff']:.1e})")
    print(f"  pictures: {', '.join(res['pictures'])}")
    t = res["seconds"]
    print(f"  time: train {t['train']} s, minimize {t['minimize']} s, total {t['total']} s")
    return 0


def _strategy_check(name: str) -> None:
    from selfscale.minimize.proposal import make_strategy

    make_strategy(name)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"selfscale: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings
    try:
        return func(args)
    except SelfscaleError as exc:
        print(f"selfscale: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --out, a file where a folder is needed, disk full …
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"selfscale: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfscale: interrupted; a run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
