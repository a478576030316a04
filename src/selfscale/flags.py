"""Command-line flags generated from the config dataclasses, and the options that repeat.

Each documented field of a config class becomes one flag: its name and help come from the field's
docstring (``--flag: …``), its type and default from the field. The flag's default is None
(= not given), so a value from a ``--config`` file or a stored run is not overridden by a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfscale.config import CHOICES, merge_sections
from selfscale.tomlfile import load_toml


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal right below the field), whitespace
    collapsed. They are the single source of the CLI's help texts."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {node.target.id: " ".join(nxt.value.value.split())
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)}


def flag_help(doc: str) -> tuple[str | None, str]:
    """``"--crop: side of …"`` → ``("--crop", "side of …")``; a docstring that names no flag
    (a field the CLI does not set) → ``(None, doc)``. ``--a/--no-a: …`` names ``--a``."""
    head, sep, rest = doc.partition(": ")
    if not sep or not head.startswith("--") or " " in head:
        return None, doc
    return head.split("/")[0], rest


def flag_of(cls: type, name: str) -> str:
    """The CLI flag of field ``name`` of config class ``cls`` (``--name`` when it has none)."""
    return flag_help(field_docs(cls).get(name, ""))[0] or "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 5,5,1, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _kind(annotation: str) -> dict[str, Any]:
    """argparse keywords for a dataclass field's type annotation (a string: postponed)."""
    if annotation.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("tuple[int"):
        return {"type": _widths, "metavar": "W1,W2,..."}
    if annotation.startswith("Path"):
        return {"type": Path, "metavar": "DIR"}
    if annotation.startswith("int"):
        return {"type": int, "metavar": "N"}
    if annotation.startswith("float"):
        return {"type": _number, "metavar": "X"}
    return {"metavar": "NAME"}


def add_config_flags(group, cls: type, section: str | None = None, *,
                     choices: dict[str, Sequence[str]] | None = None) -> None:
    """One flag per documented field of config class ``cls``: ``dest`` is ``section.field`` (or
    ``field``), the default None (= not given; the dataclass default applies), and the help the
    field's docstring plus the default."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag, text = flag_help(docs.get(f.name, ""))
        if flag is None:
            continue
        kw = _kind(str(f.type))
        opts = (choices or {}).get(flag, CHOICES.get(flag))
        if opts is not None:
            kw = {"choices": list(opts), "metavar": None}
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            text += f" (default {'on' if default else 'off'})"
        elif default is not None and "default" not in text:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default {shown})"
        group.add_argument(flag, dest=f"{section}.{f.name}" if section else f.name, default=None,
                           help=text.replace("%", "%%"), **kw)


def given_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The run-config flags the user gave, as ``{section: {field: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, name = dest.partition(".")
        if dot and value is not None:
            out.setdefault(section, {})[name] = value
    if getattr(args, "task_param", None):
        from selfscale.tasks import parse_task_params

        out.setdefault("task", {})["params"] = parse_task_params(args.task_param)
    if getattr(args, "config", None) is not None:
        out = merge_sections(load_toml(args.config), out)
    return out


def common_options(p, *names: str, device: str = "auto") -> None:
    """The options that repeat across subcommands."""
    for name in names:
        if name == "run_dir":
            p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
        elif name == "device":
            p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=device,
                           help=f"where to run: auto uses CUDA when present (default {device})")
        elif name == "json":
            p.add_argument("--json", action="store_true", help="print one JSON object")
        elif name == "quiet":
            p.add_argument("--quiet", action="store_true", help="no progress output")
        elif name == "stage":
            p.add_argument("--stage", choices=["auto", "base", "minimized"], default="auto",
                           help="which network of the run: auto = the minimized one when the "
                                "run has been minimized, else the base network (default auto)")
