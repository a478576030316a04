"""A study's report: ``report.html`` (self-contained: figures embedded as PNG data) and
``report.md`` (figures beside it in ``figures/``, PNG and SVG), each with the headline, the
tables, the notes, the commands that reproduce the study, its spec and the versions it ran with.
Everything is recomputed from the trial files, so a report of an unfinished study shows what is
done and lists the rest.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfscale.checkpoint import atomic_write_text
from selfscale.study.directory import read_study
from selfscale.study.engine import (RESULTS_FILE, check_plan, read_record, trial_file,
                                    write_results_csv)
from selfscale.study.specs import SCALES, flag_args, study_module
from selfscale.study.tables import Analysis, Table, plural, seconds_text

CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12.5px;
color:#555}pre{background:#f6f6f6;padding:.7em;overflow-x:auto;font-size:12px}
.headline{font-size:15px;background:#eef5ff;padding:.6em .9em;border-left:4px solid #4a7fd0}"""


@dataclass
class Report:
    html: Path
    markdown: Path
    figures: list[Path]
    analysis: Analysis


def reproduce(study: dict[str, Any], directory: Path) -> list[str]:
    """The commands that rebuild this study and its report."""
    spec = study["spec"]
    module = study_module(spec["study"])
    scale = spec["scale"]
    defaults = {"task": "sobel", **SCALES[scale], **module.SCALES[scale]}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    args = ["selfscale", "study", spec["study"], "--scale", scale,
            *flag_args(spec, defaults), "--out", str(directory)]
    return [shlex.join(args), shlex.join(["selfscale", "report", str(directory)])]


def _workers(records: dict[str, dict[str, Any]]) -> Table:
    seen: dict[tuple[str, str], int] = {}
    for rec in records.values():
        if rec.get("status") == "done":
            key = (rec.get("host") or "?", json.dumps(rec.get("versions") or {}, sort_keys=True))
            seen[key] = seen.get(key, 0) + 1
    rows = [[host, str(n), ", ".join(f"{k} {v}" for k, v in json.loads(v).items())]
            for (host, v), n in sorted(seen.items())]
    return Table("Workers", ["host", "trials", "versions"], rows)


def _counts(study: dict[str, Any], plan: list[dict], records: dict[str, dict]) -> str:
    done = sum(1 for t in plan if records.get(t["id"], {}).get("status") == "done")
    failed = sum(1 for t in plan if records.get(t["id"], {}).get("status") == "failed")
    calls = study.get("invocations", [])
    seconds = sum(c.get("seconds", 0) for c in calls)
    where = calls[-1]["cluster"] if calls else "–"
    return (f"{len(plan)} trials planned: {done} done, {failed} failed, "
            f"{len(plan) - done - failed} not run. {plural(len(calls), 'invocation')}, "
            f"{seconds_text(seconds)} of wall time in all; last on {where}.")


def write_report(directory: Path, out: Path | None = None) -> Report:
    """Write ``report.html``, ``report.md`` and ``figures/`` for the study in ``directory`` into
    ``out`` (default: the study directory), and refresh ``results.csv`` (copied to ``out``)."""
    directory = Path(directory)
    out = Path(out) if out is not None else directory
    study = read_study(directory)
    module = study_module(study["spec"]["study"])
    spec = module.Spec(**study["spec"])
    plan = check_plan(module.plan(spec))
    records = {t["id"]: rec for t in plan
               if (rec := read_record(trial_file(directory, t["id"]))) is not None}
    analysis = module.analyse(spec, plan, records, directory)
    figures = module.draw(analysis, out / "figures")
    if hasattr(module, "write_tables"):  # a study's own result files (CSV, Markdown)
        module.write_tables(analysis, out)
    csv_path = write_results_csv(plan, directory)
    if out.resolve() != directory.resolve():
        atomic_write_text(out / RESULTS_FILE, csv_path.read_text())
    context = {"study": study, "analysis": analysis, "figures": figures,
               "tables": analysis.tables + [_workers(records)],
               "counts": _counts(study, plan, records),
               "commands": reproduce(study, directory), "out": out}
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(**context))
    atomic_write_text(md_path, render_markdown(**context))
    return Report(html_path, md_path, [png for _, png in figures], analysis)


def render_html(*, study, analysis: Analysis, figures, tables, counts, commands, out) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(analysis.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(analysis.title)}</h1>", f"<p>{e(counts)}</p>"]
    parts += [f'<p class="headline">{e(line)}</p>' for line in analysis.headline]
    for caption, png in figures:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        svg = Path(png).with_suffix(".svg").relative_to(out).as_posix()
        parts.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                     f'<figcaption>{e(caption)} (vector: <code>{e(svg)}</code>)</figcaption>'
                     "</figure>")
    for table in tables:
        parts.append(f"<h2>{e(table.title)}</h2>")
        if table.note:
            parts.append(f"<p>{e(table.note)}</p>")
        parts.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in table.columns)
                     + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                  for row in table.rows]
        parts.append("</tbody></table>")
    parts += [f"<p>{e(note)}</p>" for note in analysis.notes]
    parts += ["<h2>Reproduce</h2>", f"<pre>{e(chr(10).join(commands))}</pre>",
              "<h2>Spec</h2>", f"<pre>{e(json.dumps(study['spec'], indent=2))}</pre>",
              "<h2>Versions</h2>",
              f"<pre>{e(json.dumps(study.get('versions', {}), indent=2))}</pre>",
              f"<p>Study started {e(study.get('created', '?'))}.</p></body></html>"]
    return "\n".join(parts) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(*, study, analysis: Analysis, figures, tables, counts, commands, out) -> str:
    lines = [f"# {analysis.title}", "", counts, ""]
    lines += [f"**{line}**\n" for line in analysis.headline]
    for caption, png in figures:
        rel = Path(png).relative_to(out).as_posix()
        lines += [f"![{_md_cell(caption)}]({rel})", "",
                  f"*{caption}* (vector: `{Path(rel).with_suffix('.svg').as_posix()}`)", ""]
    for table in tables:
        lines += [f"## {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += ["| " + " | ".join(map(_md_cell, table.columns)) + " |",
                  "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
        lines.append("")
    lines += [note + "\n" for note in analysis.notes]
    lines += ["## Reproduce", "", "```bash", *commands, "```", "", "## Spec", "", "```json",
              json.dumps(study["spec"], indent=2), "```", "", "## Versions", "", "```json",
              json.dumps(study.get('versions', {}), indent=2), "```", "",
              f"Study started {study.get('created', '?')}.", ""]
    return "\n".join(lines)
