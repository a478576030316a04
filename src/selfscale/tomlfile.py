"""Config files: a run's config written as TOML and TOML config files read (no dependency)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from selfscale.errors import ConfigError


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a two-level dict of scalars, lists and small tables as TOML (no extra dependency)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in nested.items():
            lines.append("")
            lines.append(f"[{section}.{key}]")
            for k2, v2 in value.items():
                if v2 is not None:  # TOML has no null: a missing key means the default
                    lines.append(f"{_toml_key(k2)} = {_toml_value(v2)}")
        lines.append("")
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; a missing file or bad syntax is a ConfigError naming the file."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: is a directory, expected a TOML file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
