"""What every benchmark shares: the machine it ran on, and where its report goes.

:func:`write_report` writes one benchmark's Markdown report, a PNG chart of the tables in it,
and its data as JSON, each twice: as the latest result (``results/<name>.md|png|json``,
overwritten, the files the README shows) and in the history (``results/history/<date>T<time>-
<machine>-<name>.md|json``, one pair per run, never overwritten).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Any, Mapping, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
logger = logging.getLogger("benchmarks")

_START_LOAD = os.getloadavg()  # when the benchmark started: other work, not the benchmark itself
_MAX_CHART_ROWS = 30  # a table longer than this (one row per model type) is a list, not a chart
_MAX_PANELS = 12


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Facts about this machine and software stack that a figure depends on.

    ``load_average_at_start`` is read when the benchmark started (this module's import) and
    ``load_average`` when called: a 1-minute load well above zero at the start means other
    work shared the CPU, and the run's absolute times are noisy (ratios less so).
    """
    import torch

    facts: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": _memory_gb(), "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in _START_LOAD],
        "load_average": [round(x, 2) for x in os.getloadavg()], "source": source_state(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    for package in ("transformers", "tensor_parallel"):
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = None
    return facts


def machine_tag(facts: Mapping[str, Any]) -> str:
    """A short file-name tag: CPU family and core count, plus the GPUs (``amd-epyc-2c``,
    ``intel-xeon-platinum-8480-16c-2xh100``)."""
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*|\d+-core", "", facts["cpu"].lower())
    tag = "-".join(re.findall(r"[a-z0-9]+", cpu)[:4]) + f"-{facts['cores']}c"
    if facts["gpus"]:
        gpu = re.findall(r"[a-z]\d+[a-z]*", facts["gpus"][0].lower()) or ["gpu"]
        tag += f"-{len(facts['gpus'])}x{gpu[0]}"
    return tag


def describe(facts: Mapping[str, Any]) -> str:
    """One Markdown paragraph with the facts."""
    gpus = ", ".join(facts["gpus"]) or "none"
    start, end = facts["load_average_at_start"], facts["load_average"]
    busy = " (busy: other work shared the CPU, absolute times are noisy)" if start[0] > 0.5 else ""
    return (f"Machine: {facts['cpu']}, {facts['cores']} cores ({facts['usable_cores']} usable), "
            f"{facts['memory_gb']:.0f} GB RAM, GPUs: {gpus}; {facts['os']}; Python {facts['python']}, "
            f"torch {facts['torch']} ({facts['torch_threads']} threads), transformers "
            f"{facts['transformers']}, tensor_parallel {facts['tensor_parallel']} at {facts['source']}. "
            f"Load average (1 / 5 / 15 min) when the benchmark started: {start[0]:.2f} / {start[1]:.2f} / "
            f"{start[2]:.2f}{busy}; when it ended, its own work included: {end[0]:.2f} / {end[1]:.2f} / "
            f"{end[2]:.2f}.")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return 0.0


def source_state() -> str:
    """The library's git commit, plus the files under src/ changed since."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes to {', '.join(changed)}" if changed else commit


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def write_report(name: str, text: str, *, data: Any = None, results: str = RESULTS,
                 marks: Mapping[str, float] | None = None, columns: Sequence[str] | None = None) -> dict[str, str]:
    """Write the report ``text`` (Markdown), a chart of its tables and ``data``; echo the text.

    The machine's facts are appended to the text and stored with the data. The chart has one
    panel per numeric column (only those whose header contains one of ``columns``, if given);
    ``marks`` draws a dashed reference line in every panel whose header contains the key (for
    instance ``{"ratio": 1.0}``). Returns the written paths by kind.
    """
    facts = machine()
    text = text.rstrip("\n") + "\n\n" + describe(facts) + "\n"
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M")
    history = os.path.join(results, "history", f"{stamp}-{machine_tag(facts)}-{name}")
    latest = os.path.join(results, name)
    os.makedirs(os.path.dirname(history), exist_ok=True)
    record = json.dumps({"name": name, "date": stamp, "machine": facts, "data": data}, indent=1, default=str)
    paths = {}
    for kind, content in (("md", text), ("json", record)):
        for base in (latest, history):
            with open(f"{base}.{kind}", "w") as handle:
                handle.write(content)
        paths[kind], paths[f"history_{kind}"] = f"{latest}.{kind}", f"{history}.{kind}"
    if chart(text, f"{latest}.png", marks=marks, columns=columns):
        paths["png"] = f"{latest}.png"
    sys.stdout.write(text)
    logger.info("wrote %s", ", ".join(sorted(paths.values())))
    return paths


def tables(text: str) -> list[dict[str, Any]]:
    """The Markdown tables in ``text``: each with the heading above it, its header and rows."""
    found, heading, current = [], "", None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            heading = stripped.lstrip("#").strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", stripped[1:-1])]
            if current is None:
                current = {"heading": heading, "header": cells, "rows": []}
                found.append(current)
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current["rows"].append(cells)
        else:
            current = None
    return found


def _number(cell: str) -> float | None:
    match = re.fullmatch(r"\**([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*(x|%|s|ms|MB|GB)?\**", cell.strip())
    return float(match.group(1)) if match else None


def chart(text: str, path: str, *, marks: Mapping[str, float] | None = None,
          columns: Sequence[str] | None = None) -> bool:
    """Draw every numeric column of every short table in ``text`` as a bar chart into ``path``
    (one panel per column, rows labelled by the first column; only the columns whose header
    contains one of ``columns``, if given). False if nothing to draw."""
    panels = []
    for table in tables(text):
        rows = table["rows"]
        if not rows or len(rows) > _MAX_CHART_ROWS:
            continue
        for column, header in enumerate(table["header"][1:], start=1):
            if columns is not None and not any(key in header for key in columns):
                continue
            values = [_number(row[column]) if column < len(row) else None for row in rows]
            if any(v is not None for v in values):
                labels = [row[0].replace("`", "") for row in rows]
                panels.append((table["heading"], header, labels, values))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = panels[:_MAX_PANELS]
    width = 2 if len(panels) > 1 else 1
    heights = [max(len(p[2]) for p in panels[i:i + width]) * 0.3 + 1.2 for i in range(0, len(panels), width)]
    figure, axes = pyplot.subplots(len(heights), width, squeeze=False, figsize=(7 * width, sum(heights)),
                                   gridspec_kw={"height_ratios": heights})
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), "")
    for axis, (heading, header, labels, values) in zip(axes.flat, panels):
        _panel(axis, "" if heading == title else heading, header, labels, values, marks or {})
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return True


def _panel(axis, heading: str, header: str, labels: list[str], values: list[float | None],
           marks: Mapping[str, float]) -> None:
    positions = range(len(labels))
    axis.barh(positions, [v or 0.0 for v in values], color="#4c72b0")
    axis.set_yticks(list(positions), [label[:40] for label in labels], fontsize=8)
    axis.invert_yaxis()
    for position, value in zip(positions, values):
        axis.annotate("n/a" if value is None else f"{value:g}", (value or 0.0, position),
                      xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    for key, value in marks.items():
        if key in header:
            axis.axvline(value, color="#c44e52", linestyle="--", linewidth=1)
    axis.set_title(f"{heading[:60]}\n{header}" if heading else header, fontsize=9)
    axis.margins(x=0.15)
    if not any(values):
        axis.set_xlim(0, 1)
