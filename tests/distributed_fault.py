"""A torchrun entry point for tests/test_distributed.py: `flexgen-graph run`, except that rank DIE_RANK
writes DIE_AFTER records of its shard, then half of the next one, and SIGKILLs itself (a crash mid-write)."""

import json
import os
import signal
import sys

from flexgen_graph.app import jobs
from flexgen_graph.app.cli import main

if os.environ["RANK"] == os.environ["DIE_RANK"]:
    limit = int(os.environ["DIE_AFTER"])
    real_write = jobs.OutputFile.write
    written: list[dict] = []

    def write(self, record: dict) -> None:
        if len(written) == limit:
            torn = json.dumps(record)
            os.write(self._out._fd, torn[: len(torn) // 2].encode())
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, record)
        written.append(record)

    jobs.OutputFile.write = write

sys.exit(main())
