"""What the benchmark scripts share: writing their section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path


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
