"""What every benchmark shares: where reports go."""

from __future__ import annotations

import datetime
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def write_report(name: str, text: str, out: str | None = None) -> str:
    """Write ``text`` to ``out`` (default ``results/<name>-<date>.md``), echo it, return the path."""
    out = out or os.path.join(RESULTS, f"{name}-{datetime.date.today()}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        handle.write(text)
    sys.stdout.write(text)
    return out
