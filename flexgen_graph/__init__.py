"""flexgen-graph: high-throughput batch generation with offloading, compiled into a plan and replayed.

The torch-free core lives here (ir, spec, catalog, lower, program, policy, hardware, planfile, hazards,
errors). The Python API is handed out lazily (PEP 562), so `import flexgen_graph.ir` never loads torch:

    >>> from flexgen_graph import LLM, SamplingParams     # loads the application (and torch) now
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["LLM", "Output", "SamplingParams"]

# name -> the application module that defines it, imported on first use (the core never imports it eagerly)
_LAZY = {"LLM": "flexgen_graph.app.llm", "Output": "flexgen_graph.app.llm", "SamplingParams": "flexgen_graph.app.llm"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
