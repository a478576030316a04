"""``selfscale study NAME …`` and ``selfscale report DIR``: their flags and command functions.

The study flags are generated from the study's spec dataclasses (as the run flags are from the
run configs); a flag not given takes the scale's value. These functions parse nothing themselves
and print only the progress bar (stderr) and the summary (stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from selfscale.flags import Parser, add_config_flags
from selfscale.study.specs import (SCALE_NAMES, SCALES, STUDIES, STUDY_TASKS, MinimizingSpec,
                                   StudySpec, resolve_spec, shown, study_module)

LIST_METAVARS = {"thresholds": "T1,T2,...", "strategies": "NAME,...", "depths": "D1,D2,..."}


def _scale_table(module) -> str:
    """Each scale's values, for a study's --help."""
    parts = []
    for scale in SCALE_NAMES:
        values = {**SCALES[scale], **module.SCALES[scale]}
        fields = {f.name for f in dataclasses.fields(module.Spec)}
        parts.append(f"{scale}: " + ", ".join(f"{k.replace('_', '-')} {shown(v)}"
                                              for k, v in values.items()
                                              if k in fields and v is not None))
    return " Scales — " + "; ".join(parts) + "."


def study_flags(p: argparse.ArgumentParser) -> None:
    """``selfscale study STUDY``: one sub-command per study, its flags from its spec."""
    sub = p.add_subparsers(dest="study", metavar="STUDY", parser_class=Parser)
    sub.required = True
    for name in STUDIES:
        module = study_module(name)
        sp = sub.add_parser(name, help=module.DESCRIPTION.split(";")[0],
                            description=(module.DESCRIPTION + _scale_table(module))
                            .replace("%", "%%"))
        g = sp.add_argument_group("study (a flag not given takes the scale's value)")
        for cls in dict.fromkeys(c for c in (StudySpec, MinimizingSpec, module.Spec)
                                 if issubclass(module.Spec, c)):
            add_config_flags(g, cls, choices={"--scale": SCALE_NAMES, "--task": STUDY_TASKS})
        for action in sp._actions:  # lists: the generated metavar says NAME
            action.metavar = LIST_METAVARS.get(action.dest, action.metavar)
        c = sp.add_argument_group("where trials run").add_mutually_exclusive_group()
        c.add_argument("--workers", type=int, metavar="N",
                       help="start a local Dask cluster of N worker processes, one thread each "
                            "(default: one per core)")
        c.add_argument("--address", metavar="tcp://HOST:PORT",
                       help="use the running Dask scheduler at this address instead (its "
                            "workers need selfscale installed; results come back to this "
                            "machine, no shared disk needed)")
        o = sp.add_argument_group("output")
        o.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="the study directory; the same command again resumes the study in "
                            "it (finished trials are skipped)")
        o.add_argument("--no-report", action="store_true",
                       help="do not write report.html and report.md at the end")
        o.add_argument("--quiet", action="store_true", help="no progress bar")


def report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="a study directory")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write the report (report.html, report.md, figures/, results.csv) "
                        "into this folder instead of DIR")


class _Bar:
    """The progress bar over this invocation's trials: done / failed / running, and the ETA."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label, self.bar, self.finished, self.shown = quiet, label, None, 0, ""
        self.tty, self.drawn = sys.stderr.isatty(), 0.0

    def __call__(self, p) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.total, unit="trial", desc=self.label, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
        new, self.finished = p.done + p.failed - self.finished, p.done + p.failed
        text = f"done {p.done}, failed {p.failed}, running {p.running}"
        now = time.monotonic()  # polled often: redraw on news, or each second on a terminal
        if text != self.shown or (self.tty and now - self.drawn >= 1.0):
            self.shown, self.drawn = text, now
            self.bar.set_postfix_str(text, refresh=new == 0)
        if new:  # update(0) would redraw too, at every poll
            self.bar.update(new)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _spec(args: argparse.Namespace):
    module = study_module(args.study)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Spec)
             if getattr(args, f.name, None) is not None}
    scale = given.pop("scale", None)
    given.pop("study", None)
    spec = resolve_spec(module.Spec, args.study, module.SCALES, scale, given)
    if hasattr(module, "check"):
        module.check(spec)
    return module, spec


def _run(args: argparse.Namespace, spec, plan: list[dict]):
    """The trials still to run, on the cluster: (cluster description, Outcome); the Outcome is
    None when interrupted (finished trials are kept)."""
    from selfscale.study.cluster import dask_client, describe
    from selfscale.study.directory import open_study
    from selfscale.study.engine import run_trials, write_results_csv

    bar = _Bar(args.quiet, f"{spec.study} ({spec.scale})")
    try:
        with dask_client(workers=args.workers, address=args.address) as client:
            where = describe(client, args.address)
            open_study(args.out, spec.to_dict())
            try:
                return where, run_trials(client, plan, args.out, on_progress=bar)
            finally:
                bar.close()
                write_results_csv(plan, args.out)
    except KeyboardInterrupt:
        print(f"selfscale: interrupted; finished trials are kept in {args.out}, and the same "
              "command resumes the study", file=sys.stderr)
        return None, None


def cmd_study(args: argparse.Namespace) -> int:
    """Run (or resume) a study; exit code 1 when a trial failed (it is recorded; the same
    command runs it again), 0 otherwise."""
    from selfscale.study.cluster import check_workers
    from selfscale.study.directory import STUDY_FILE, open_study, record_invocation
    from selfscale.study.engine import Outcome, check_plan, unfinished

    module, spec = _spec(args)
    if args.workers is not None:
        check_workers(args.workers)
    plan = check_plan(module.plan(spec))
    open_study(args.out, spec.to_dict(), create=False)  # a wrong --out fails before any cluster
    if (args.out / STUDY_FILE).is_file() and not unfinished(plan, args.out):
        where, outcome = "no cluster (nothing to run)", Outcome(len(plan), skipped=len(plan))
    else:
        where, outcome = _run(args, spec, plan)
        if outcome is None:
            return 130
    record_invocation(args.out, outcome, where)
    print(f"study {spec.study} ({spec.scale} scale, {spec.task}) in {args.out}: "
          f"{outcome.planned} trials: {outcome.done} done now, {outcome.skipped} skipped "
          f"(finished before), {outcome.failed} failed"
          + (f", {outcome.lost} lost (run the command again)" if outcome.lost else "")
          + f"; {outcome.seconds:.1f} s on {where}")
    for trial_id, error in outcome.failures:
        print(f"  failed: {trial_id}: {error}")
    if not args.no_report:
        from selfscale.study.report import write_report

        report = write_report(args.out)
        print(f"report: {report.html} and {report.markdown.name}")
    return 1 if outcome.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfscale.study.report import write_report

    report = write_report(args.dir, args.out)
    for line in report.analysis.headline:
        print(line)
    print(f"report: {report.html} and {report.markdown.name}, "
          f"{len(report.figures)} figure(s) in {report.html.parent / 'figures'}")
    return 0
