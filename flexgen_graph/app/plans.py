"""Where the application gets a hardware profile and its plans: a profile by name (this machine's
measured once and cached for "auto"), and plans compiled for a job, cached on disk by what they
were compiled from. The CLI and the Python API (app.llm) share these.

    >>> from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> profile = profile_for("cpu-small")
    >>> default_dtype(profile)
    'float32'
    >>> import tempfile
    >>> from planner.compile import CompileOptions
    >>> with tempfile.TemporaryDirectory() as d:
    ...     [plan] = cached_plans(catalog_spec(DEFAULT_MODEL), profile, Workload(16, 8), CompileOptions(), Path(d))
    ...     len(list(Path(d, "plans").iterdir()))
    1
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from flexgen_graph.hardware import HardwareProfile
from flexgen_graph.ir import Workload
from flexgen_graph.planfile import Plan
from flexgen_graph.spec import ModelSpec
from planner.compile import CompileOptions


def profile_for(name: str | None, offload_dir: Path | None = None, models=(), here: bool = False) -> HardwareProfile:
    """A builtin profile or a profile file by name; "local" (the default): cpu-small's rates with this
    machine's RAM and disk; "auto": this machine, measured once and cached (again when the cached one is
    from another version or machine), with layer curves for `models`; here: the profile must describe
    this machine (a file measured elsewhere is refused)."""
    from flexgen_graph.hardware import load_profile

    name = name or "local"
    if name == "auto":
        from flexgen_graph.app.calibrate import auto_profile
        from flexgen_graph.app.models import default_cache_dir

        # measure once, then reuse: a profile is a property of the machine, not of the job
        return auto_profile(default_cache_dir() / "profile.json", offload_dir or Path.cwd(), list(models))
    if name != "local":
        from flexgen_graph.hardware import BUILTIN_PROFILES, BadProfileError

        if name not in BUILTIN_PROFILES and not Path(name).is_file():
            raise BadProfileError(f"unknown profile {name!r}: not local, auto, a builtin "
                                  f"({', '.join(BUILTIN_PROFILES)}) nor a file")
        prof = load_profile(name)
        if here:
            from flexgen_graph.app.calibrate import check_machine

            check_machine(prof, f"profile {name}")
        return prof
    from flexgen_graph.hardware import BUILTIN_PROFILES

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disk = shutil.disk_usage(offload_dir or Path.cwd()).free
    # the "gpu" tier is host memory on a CPU-only box: give it a third of RAM, the cpu tier half
    return replace(BUILTIN_PROFILES["cpu-small"], name="local", gpu_bytes=ram // 3, cpu_bytes=ram // 2,
                   disk_bytes=int(disk * 0.8))


def default_dtype(profile: HardwareProfile) -> str:
    """float16 where there is a GPU, float32 on the CPU (whose half-precision matmuls are slow)."""
    return "float16" if profile.has_gpu else "float32"


def cached_plans(spec: ModelSpec, profile: HardwareProfile, workload: Workload, options: CompileOptions,
                 cache_dir: Path) -> list[Plan]:
    """The plans for one workload (a plan per stage for a pipeline), compiled once and cached under
    cache_dir/plans, keyed by the plan format, model, profile, workload and options."""
    import planner
    from flexgen_graph import planfile

    key = json.dumps([planfile.PLAN_VERSION, spec.fingerprint(), profile.fingerprint(), workload.to_dict(),
                      options.key()])
    path = cache_dir / "plans" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".fgplan")
    if path.is_file():
        return planfile.load_set(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plans = planner.compile(spec, profile, [workload], options)
    planfile.save_set(plans, path)
    return plans
