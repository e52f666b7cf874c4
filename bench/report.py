"""What the benchmark scripts share: the machine they ran on, and writing their section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) a section of a markdown file, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(section)
    block = f"{section}\n\n{body}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(section))
        text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text)
