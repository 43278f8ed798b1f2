"""Benchmark reports: markdown tables, machine facts, and JSON / markdown written atomically.

Every ``scripts/bench_*.py`` renders through these so that the pages in ``docs/benchmarks/``
share one table format and one record of the machine they were measured on, and an interrupted
write never leaves half a report (the file is written beside its target, then renamed)::

    table = markdown_table(["method", "tokens/s", "vs vanilla"], rows, align="lrr")
    write_json("docs/benchmarks/spec.json", {"meta": machine_info(), "rows": rows})
    write_text("docs/benchmarks/spec.md", f"# Speculative decoding\\n\\n{table}\\n")
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_cell", "machine_info", "markdown_table", "write_json", "write_text"]


def format_cell(value: Any, float_format: str = ".3g") -> str:
    """One table cell: ``None`` -> ``-``, floats with ``float_format``, else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, float_format)
    return str(value)


def markdown_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any] | Mapping[str, Any]],
    *,
    align: str | None = None,
    float_format: str = ".3g",
) -> str:
    """A GitHub markdown table. ``rows`` are sequences (one cell per header) or mappings keyed
    by header (a missing key renders as ``-``); ``align`` has one letter per column, ``l``,
    ``r`` or ``c`` (default: left). Cells go through :func:`format_cell`."""
    align = align or "l" * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align={align!r} has {len(align)} letters for {len(headers)} columns")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    if set(align) - set(rule):
        raise ValueError(f"align={align!r}: use the letters l, r and c")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        cells = [row.get(h) for h in headers] if isinstance(row, Mapping) else list(row)
        if len(cells) != len(headers):
            raise ValueError(f"row {row!r} has {len(cells)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(format_cell(c, float_format) for c in cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What a measurement ran on: platform, processor, CPU count, JAX backend and devices."""
    import jax

    return {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` atomically (creating its folder); returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 1) -> str:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")
