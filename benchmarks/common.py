"""Shared by the benchmark scripts: machine description, timing, and recording tables in RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    import torch

    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"


def per_item_us(fn, n_items: int, repeat: int = 5) -> float:
    """Best-of-`repeat` wall time of fn() divided by n_items, in microseconds (after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return best / n_items * 1e6


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record(section: str, body: str) -> None:
    """Print and store `body` under '## section' in RESULTS.md, replacing that section's previous entry."""
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    entry = (f"## {section}\n\n{datetime.date.today().isoformat()} on {machine()}\n\n`{command}`\n\n{body}\n")
    print("\n" + entry)
    text = (RESULTS.read_text() if RESULTS.exists()
            else "# Benchmark results\n\nWritten by the scripts in this folder.\n\n")
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: entry + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + entry
    RESULTS.write_text(text)
