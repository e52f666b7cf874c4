"""`flexgen-graph profile`: a measured profile round-trips and `compile --profile FILE` uses its figures
(refusals and re-measuring under auto: tests/test_calibration.py)."""

import dataclasses
import json

from flexgen_graph import planfile
from flexgen_graph.app.cli import main
from flexgen_graph.hardware import HardwareProfile, load_profile, save_profile
from runtime.profiler import measure


def test_measured_profile_round_trips_and_is_plausible(tmp_path):
    prof, notes = measure(tmp_path / "off", name="here")
    assert prof.has_gpu is False or prof.gpu_bytes > 0
    assert prof.cpu_matmul_flops_per_s > 1e9 and prof.cpu_mem_bytes_per_s > 1e9
    assert prof.cpu_from_disk_bytes_per_s > 1e6 and prof.disk_from_cpu_bytes_per_s > 1e6
    assert any("disk rates measured with" in n for n in notes)
    cal = prof.calibration  # what the cost model prices with (tests/test_calibration.py checks how)
    assert cal is not None and cal.method == "curves" and cal.layers == ()
    assert all(getattr(cal, c).ys[-1] > 0 for c in cal.CURVES)
    assert prof.machine.startswith("cpu=") and "cores=" in prof.machine
    save_profile(prof, tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")) == prof
    assert not list((tmp_path / "off").glob(".flexgen-graph-disk-test*")), "the disk test file is removed"


def test_compile_uses_the_profile_files_figures(tmp_path, capsys):
    base = load_profile("cpu-small")
    small = dataclasses.replace(base, name="tiny-box", gpu_bytes=450 << 20, cpu_bytes=1 << 30)
    save_profile(small, tmp_path / "tiny-box.json")
    out = tmp_path / "p.fgplan"
    assert main(["compile", "--model", "facebook/opt-125m", "--profile", str(tmp_path / "tiny-box.json"),
                 "--prompt-len", "32", "--gen-len", "8", "-o", str(out)]) == 0
    plan = planfile.load(out)
    assert plan.profile == small
    assert plan.policy.weights.gpu_frac < 1  # 625 MiB of weights cannot live in a 450 MiB gpu tier
    assert plan.predictions["peak_bytes"]["gpu"] <= 450 << 20
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "tiny-box"
    assert HardwareProfile.from_dict(small.to_dict()) == small
