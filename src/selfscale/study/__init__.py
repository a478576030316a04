"""Studies: the thesis's experiments as resumable sweeps of trials on Dask, with figures and a
report (engine.py, cluster.py, trials.py, specs.py, one module per study, figures.py, report.py).

This module is light on purpose: the CLI's command table takes :data:`ENTRIES` from it, and the
command functions import dask, matplotlib and torch only when they run.
"""


def _cmd_study(args):
    from selfscale.study.command import cmd_study

    return cmd_study(args)


def _study_flags(p):
    from selfscale.study.command import study_flags

    study_flags(p)


def _cmd_report(args):
    from selfscale.study.command import cmd_report

    return cmd_report(args)


def _report_flags(p):
    from selfscale.study.command import report_flags

    report_flags(p)


ENTRIES = {
    "study": (_cmd_study, _study_flags, "run a study: a resumable sweep of trials on Dask",
              ("Run one of the thesis's experiments as trials (one training or one minimization "
               "each, with its own seed) on a local Dask cluster (--workers) or a running "
               "scheduler (--address). Results: DIR/trials/*.json, DIR/results.csv, "
               "DIR/study.json, and a report. The same command again resumes the study.")),
    "report": (_cmd_report, _report_flags, "write a study's report (HTML and Markdown)",
               ("Write DIR/report.html (self-contained, figures embedded), DIR/report.md and "
                "DIR/figures/ (PNG and SVG) from a study directory's trial files, and refresh "
                "DIR/results.csv.")),
}
"""subcommand → (function, flag builder, one-line help, description), for selfscale.cli."""
