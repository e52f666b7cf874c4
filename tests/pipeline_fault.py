"""A torchrun entry point for tests/test_pipeline.py: `flexgen-graph run`, except that rank DIE_RANK
sends itself signal DIE_SIGNAL (default SIGKILL) when it starts its program run number DIE_AT (prefill
and decode steps counted over the whole job): a stage lost, or asked to stop, in the middle of a block."""

import os
import signal
import sys

from flexgen_graph.app.cli import main
from runtime.engine import Engine

if os.environ["RANK"] == os.environ["DIE_RANK"]:
    at = int(os.environ["DIE_AT"])
    real_run = Engine.run_program
    runs = [0]

    def run(self, name: str, start: int, t: int) -> None:
        runs[0] += 1
        if runs[0] == at:
            os.kill(os.getpid(), getattr(signal, os.environ.get("DIE_SIGNAL", "SIGKILL")))
        real_run(self, name, start, t)

    Engine.run_program = run

sys.exit(main())
