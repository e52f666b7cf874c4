"""Pre-flight: before any weight is loaded, check that this machine can hold what the plan needs.

Every refusal names the figures (needed vs available) and how to fix it: measure the machine
and recompile, or free the resource.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flexgen_graph.errors import UserError
from flexgen_graph.planfile import Plan
from flexgen_graph.program import BufferRole

HINT = "run `flexgen-graph profile` on this machine and recompile the plan, or free the resource"


class PreflightError(UserError):
    pass


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def scratch_bytes(plan: Plan) -> int:
    """Bytes the plan writes into the offload folder (disk-tier cache and hidden homes; weights on
    the disk tier stay in the weight store)."""
    return sum(b.nbytes for b in plan.programs.buffers
               if b.tier.value == "disk" and b.role is not BufferRole.WEIGHT_HOME)


def check(plan: Plan, offload_dir: Path, device: str) -> None:
    peaks = plan.predictions["peak_bytes"]
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"  # noqa: E731
    host_need = peaks["cpu"] + (peaks["gpu"] if device == "cpu" else 0)  # the CPU backend's GPU tier is RAM
    ram = available_ram_bytes()
    if ram is not None and host_need > ram:
        raise PreflightError(f"the plan needs {gib(host_need)} of RAM"
                             f"{' (its gpu and cpu tiers)' if device == 'cpu' else ''} but only {gib(ram)} is "
                             f"available: {HINT}")
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        if peaks["gpu"] > free:
            raise PreflightError(f"the plan needs {gib(peaks['gpu'])} of GPU memory but {gib(free)} is free: {HINT}")
    need = scratch_bytes(plan)
    if need == 0:
        return
    try:
        offload_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=offload_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PreflightError(f"offload folder {offload_dir} is not writable ({e.strerror}): pick another with "
                             "--offload-dir") from None
    st = os.statvfs(offload_dir)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise PreflightError(f"the plan writes {gib(need)} of scratch into {offload_dir} but only {gib(free)} is "
                             f"free there: free space, pick another --offload-dir, or {HINT}")
