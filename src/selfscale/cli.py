"""The command line: a table from subcommand to function; parsing, dispatch and printing only.

The flags of ``train``, ``minimize`` and ``demo`` are generated from the config dataclasses: the
name, type and default of each field, and its help from the field's docstring (``--flag: …``).
Nothing below this module reads ``sys.argv`` or prints results. User errors (bad values, missing
files, corrupt checkpoints) are printed as one line ``selfscale: error: …`` with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from selfscale import __version__
from selfscale.config import (DataConfig, MinimizeConfig, ModelConfig, RunConfig, TaskConfig,
                              TrainConfig, minimize_config_for)
from selfscale.errors import ConfigError, SelfscaleError, TrainingError
from selfscale.flags import Parser, add_config_flags, common_options, given_values
from selfscale.pictures import ENTRIES as VISUALIZE_COMMANDS
from selfscale.study import ENTRIES as STUDY_COMMANDS
from selfscale.views import (decision_printer, demo_text, evaluate_text, export_text, info_text,
                             minimization_text, train_progress, train_text)

RUN_SECTIONS = {"task": TaskConfig, "data": DataConfig, "model": ModelConfig,
                "train": TrainConfig}
"""The sections of a run config, in the order train's --help shows them."""


# --- train --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from selfscale.run import (check_new_run_dir, default_run_dir, prepare_data, resume_run,
                               start_run, train_run)

    given = given_values(args)
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume: name the run to continue with --out RUN_DIR")
        run = resume_run(args.out, given)
        data = prepare_data(run.config, progress=not args.quiet)
    else:
        config = RunConfig.from_dict(given)
        out = args.out or default_run_dir(config.task.name)
        check_new_run_dir(out)
        data = prepare_data(config, progress=not args.quiet)  # bad data fails before any file
        run = start_run(config, out)
    bar, hooks = train_progress(run.config.train.steps, quiet=args.quiet, start=run.state.step)
    t0 = time.perf_counter()
    try:
        train_run(run, data, hooks=hooks)
    finally:
        bar.close()
    from selfscale.train import best_record

    print(train_text(run.path, run.config.task.name, run.state.step, time.perf_counter() - t0,
                     run.state.history, best_record(run.state.history)))
    return 0


# --- evaluate / predict / info ------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfscale.crops import require_crop_fits
    from selfscale.data import load_eval_set
    from selfscale.run import load_network, prepare_data, resolved_task
    from selfscale.train import evaluate

    run, model, stage = load_network(args.run_dir, args.stage, args.device)
    if args.crop is not None:
        DataConfig(crop=args.crop)  # the same bounds as a run's --crop
    crop = None if args.full else (args.crop or run.config.data.crop)
    if args.data is not None:
        data_cfg = dataclasses.replace(run.config.data, crop=8) if args.full else run.config.data
        images = load_eval_set(args.data, data_cfg, *resolved_task(run.config),
                               targets=args.targets)
    else:
        images = prepare_data(run.config).eval
    if crop is not None:
        require_crop_fits(images, crop)
    scores = evaluate(model, images, crop, run.device)
    scores["stage"] = stage
    print(json.dumps(scores) if args.json else evaluate_text(run.path, crop, scores))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from selfscale.compact import load_compact
    from selfscale.predict import predict_files
    from selfscale.run import load_network
    from selfscale.train import resolve_device, to_device

    if args.run_dir.is_file():  # a compact model written by `selfscale export`
        if args.run_dir.suffix == ".onnx":
            raise ConfigError(f"{args.run_dir}: predict takes a run directory or a compact .pt "
                              "file; run ONNX models with onnxruntime")
        model = to_device(load_compact(args.run_dir), resolve_device(args.device))
        label = f"compact model {args.run_dir.name}"
    else:
        _, model, stage = load_network(args.run_dir, args.stage, args.device)
        label = f"{stage} network"
    device = next(model.parameters()).device
    report = predict_files(model, args.inputs, args.out, device, overwrite=args.overwrite)
    print(f"wrote {len(report.written)} image(s) to {args.out} ({label})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from selfscale.run import load_network, load_summary, run_info

    run, model, stage = load_network(args.run_dir, args.stage)
    info = run_info(run, model) | {"stage": stage, "minimization": load_summary(args.run_dir)}
    print(json.dumps(info, indent=2) if args.json else info_text(info))
    return 0


# --- minimize / export / demo -------------------------------------------------------------------

def cmd_minimize(args: argparse.Namespace) -> int:
    from selfscale.minimize.session import minimize_run
    from selfscale.minimize.strategies import make_strategy
    from selfscale.run import load_run, prepare_data

    fields = {f.name for f in dataclasses.fields(MinimizeConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    make_strategy(MinimizeConfig(**given).strategy)  # bad values fail before anything is loaded
    run = load_run(args.out if args.resume and args.out else args.run_dir, args.device)
    config = minimize_config_for(run.config.train.recipe, given)
    data = prepare_data(run.config, progress=not args.quiet)
    bar = hooks = None
    if config.base_steps is not None and not args.quiet:
        bar, hooks = train_progress(config.base_steps, quiet=args.quiet)
    if not args.quiet:
        print(f"resuming the minimization in {args.out or args.run_dir} with its stored settings "
              "(the minimize options given now are not used)" if args.resume else
              f"minimizing {args.run_dir} with {config.strategy}, threshold {config.threshold} "
              f"of the {config.reference} {config.metric}, {config.retrain_steps} retrain steps",
              file=sys.stderr)
    try:
        result = minimize_run(run, data, config, out=args.out, resume=args.resume,
                              on_decision=decision_printer(args.quiet), train_hooks=hooks)
    finally:
        if bar is not None:
            bar.close()
    print(f"run: {result.run_dir}")
    print(minimization_text(result.summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfscale.compact import compact_model, compare_speed, export
    from selfscale.crops import center_crops
    from selfscale.run import load_network, prepare_data
    from selfscale.train import as_input

    run, model, stage = load_network(args.run_dir, args.stage, args.device)
    x = as_input(center_crops(prepare_data(run.config).eval, run.config.data.crop)[0], run.device)
    meta = {"task": run.config.task.name, "task_params": run.config.task.params,
            "source_run": str(run.path), "stage": stage}
    fmt = args.format or ("onnx" if args.out.suffix.lower() == ".onnx" else "torch")
    r = export(model, fmt, args.out, check_inputs=x, meta=meta, overwrite=args.overwrite)
    speed = compare_speed(model, compact_model(model), x)
    if args.json:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v)
                          for k, v in dataclasses.asdict(r).items()} | {"speed": speed}))
        return 0
    print(export_text(r, stage, x.shape[0], speed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from selfscale.demo import DemoConfig, run_demo

    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)
                        if getattr(args, f.name) is not None})
    bar, hooks = train_progress(cfg.steps, quiet=args.quiet)

    def on_phase(text: str) -> None:
        if not text.startswith("1/"):  # training is over: the progress bar is done
            bar.close()
        if not args.quiet:
            bar.write(text, file=sys.stderr)

    try:
        res = run_demo(cfg, train_hooks=hooks, on_decision=decision_printer(args.quiet),
                       on_phase=on_phase)
    finally:
        bar.close()
    print(demo_text(cfg.task, res))
    return 0


# --- the table ----------------------------------------------------------------------------------

def _train_flags(p) -> None:
    from selfscale.tasks import TASKS

    for section, cls in RUN_SECTIONS.items():
        add_config_flags(p.add_argument_group(section), cls, section,
                         choices={"--task": sorted(TASKS)})
    p.add_argument("--task-param", action="append", metavar="KEY=VALUE", default=[],
                   help="override an operator parameter, e.g. sigma=2.0 for canny (repeatable); "
                        "every parameter is stored with the run")
    p.description += " Tasks: " + "; ".join(
        f"{t.name}: {t.description}" for t in sorted(TASKS.values(), key=lambda t: t.name))
    g = p.add_argument_group("run")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file with [data] [task] [model] [train] tables, e.g. a run's "
                        "config.toml; flags override it")
    g.add_argument("--out", type=Path, metavar="RUN_DIR",
                   help="run directory to create (default runs/<task>, numbered if taken); "
                        "never overwritten")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; flags equal to the "
                        "stored values are accepted, only --steps and --device may change")
    common_options(g, "quiet")


def _evaluate_flags(p) -> None:
    common_options(p, "run_dir", "device", "json", "stage")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="evaluate on every usable image in DIR (default: the run's eval set)")
    p.add_argument("--targets", type=Path, metavar="DIR", help="task pairs: targets for --data")
    p.add_argument("--crop", type=int, metavar="N",
                   help="centre crop side (default: the run's --crop)")
    p.add_argument("--full", action="store_true", help="evaluate whole images instead of crops")


def _predict_flags(p) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|MODEL.pt",
                   help="a run directory, or a compact model written by 'selfscale export'")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="image files or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse)")
    common_options(p, "device", "stage")


def _minimize_flags(p) -> None:
    common_options(p, "run_dir", "device", "quiet")
    add_config_flags(p, MinimizeConfig, choices={"--strategy": _strategy_names()})
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write a new run directory (a copy of the base run plus the "
                        "minimization) instead of minimizing RUN_DIR in place")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed minimization from its last decision")


def _export_flags(p) -> None:
    common_options(p, "run_dir", "json", "stage")
    common_options(p, "device", device="cpu")
    p.add_argument("--format", choices=["torch", "onnx"],
                   help="torch: tensors + architecture, loadable with torch.load(weights_only="
                        "True); onnx: verified with onnxruntime (default: onnx for a .onnx "
                        "--out, else torch)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _demo_flags(p) -> None:
    from selfscale.demo import DEMO_TASKS, DemoConfig

    add_config_flags(p, DemoConfig, choices={"--task": DEMO_TASKS,
                                             "--strategy": _strategy_names()})
    common_options(p, "quiet")


def _strategy_names() -> list[str]:
    from selfscale.minimize.strategies import STRATEGIES

    return sorted(STRATEGIES)


COMMANDS = {
    "train": (cmd_train, _train_flags, "train a network on a task",
              "Train the FCN on a task; writes a resumable run directory."),
    "evaluate": (cmd_evaluate, _evaluate_flags, "F1, MAE, MSE and UIQI of a run on eval images",
                 "Evaluate a run on its eval images or on another folder."),
    "predict": (cmd_predict, _predict_flags, "write the network's output for images as PNGs",
                "Run the network on whole images; one 8-bit PNG per input, same height and "
                "width (output clipped to [0,1], ×255)."),
    "info": (cmd_info, lambda p: common_options(p, "run_dir", "json", "stage"),
             "config, architecture, switches and scores of a run",
             "Show what a run directory holds."),
    "minimize": (cmd_minimize, _minimize_flags, "find the smallest network that still does the "
                 "task", "Alter the trained network one decision at a time (disable a mask or "
                 "remove a layer), retrain, and keep the change if score_new >= threshold × "
                 "reference, else step back (thesis 2.4). Results go to RUN_DIR/minimize/ (or a "
                 "new run with --out)."),
    "export": (cmd_export, _export_flags, "write the physically smaller network (torch or ONNX)",
               "Build the compact network (disabled masks, their biases and the next layer's "
               "matching inputs removed), check it against the masked network on the eval "
               "images (max abs difference <= 1e-5), then write it."),
    "demo": (cmd_demo, _demo_flags, "the whole story on the bundled images (a few minutes)",
             "Train on the bundled scikit-image samples, minimize, export (torch and ONNX), time "
             "masked vs compact, and write PNG previews."),
    **STUDY_COMMANDS,
    **VISUALIZE_COMMANDS,
}
"""subcommand → (function, flag builder, one-line help, description)."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's flags are built (so a command imports
    nothing it does not use, e.g. no strategy registry outside minimize and demo)."""
    parser = Parser(prog="selfscale", description=(
        "Train a small fully convolutional network to imitate an image operator, then find the "
        "smallest network that still does it."))
    parser.add_argument("--version", action="version", version=f"selfscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, (func, flags, help_, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=description)
        if only is None or only == name:
            flags(p)
        p.set_defaults(func=func)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"selfscale: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(next((a for a in argv if a in COMMANDS), "")).parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings
    try:
        return args.func(args)
    except SelfscaleError as exc:
        print(f"selfscale: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, TrainingError) else 2
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
