"""Reliability: untrusted plans and input lines, pre-flight refusals, SIGTERM and a full disk."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexgen_graph import planfile
from flexgen_graph.app.api import compile_plan
from flexgen_graph.app.cli import main
from flexgen_graph.app.jobs import OutputFile, errors_path, run_job
from flexgen_graph.app.models import store_dir
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.planfile import BadPlanFileError
from flexgen_graph.policy import Placement
from planner.verify import verify
from runtime import preflight
from runtime.engine import Engine
from runtime.weight_store import make_dummy
from tests.test_jobs import tiny_spec, write_lines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_dummy(tiny_spec(), tmp_path_factory.mktemp("store"), seed=5)


@pytest.fixture(scope="module")
def plan_bytes(store):
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(8, 3), gpu_batch_size=2, num_gpu_batches=2,
                        fixed={"weights": Placement(0, 1, 0), "cache": Placement(0, 0, 1),
                               "hidden": Placement(1, 0, 0)})
    return planfile.dumps(plan)


def resealed(body: dict) -> bytes:
    """Re-pack a (mutated) body with a valid checksum: only the loader's own checks stand between it and a run."""
    import hashlib

    packed = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([planfile.PLAN_FORMAT, planfile.PLAN_VERSION, hashlib.sha256(packed).hexdigest(), packed])


def load_or_refuse(data: bytes) -> None:
    try:
        plan = planfile.loads_set(data)
    except BadPlanFileError as e:
        assert str(e), "refusals carry a message"
        return
    for p in plan:
        verify(p.programs)  # anything accepted must be runnable


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=300), cut=st.floats(0, 1), flip=st.integers(0, 10**9))
def test_loader_refuses_junk_truncations_and_bit_flips(plan_bytes, junk, cut, flip):
    load_or_refuse(junk)
    load_or_refuse(plan_bytes[: int(len(plan_bytes) * cut)])
    b = bytearray(plan_bytes)
    b[flip % len(b)] ^= 1 << (flip % 8)
    load_or_refuse(bytes(b))


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True), st.text(max_size=5),
                   st.lists(st.integers(-2, 50), max_size=3), st.binary(max_size=4))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=VALUES)
def test_loader_survives_single_field_mutations(plan_bytes, data, value):
    body = msgpack.unpackb(msgpack.unpackb(plan_bytes)[3])
    # pick a path into the body: a top-level field, or one element of a buffer / op / policy entry
    key = data.draw(st.sampled_from(sorted(body)))
    target = body
    if isinstance(body[key], list) and body[key] and isinstance(body[key][0], list):
        target = body[key][data.draw(st.integers(0, len(body[key]) - 1))]
        key = data.draw(st.integers(0, len(target) - 1))
    elif isinstance(body[key], dict) and body[key]:
        target = body[key]
        key = data.draw(st.sampled_from(sorted(target)))
    target[key] = value
    load_or_refuse(resealed(body))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=False),
                       st.text(max_size=5), st.lists(st.integers(-2, 50), max_size=3))
LINES = st.one_of(
    st.builds(lambda i, ids: json.dumps({"id": f"g{i}", "prompt_ids": ids}), st.integers(0, 10**6),
              st.lists(st.integers(3, 150), min_size=1, max_size=8)),
    st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s),
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["id", "prompt", "prompt_ids", "max_tokens", "x", "seed",
                                                           "temperature", "messages"]), JSON_VALUES, max_size=4)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, min_size=1, max_size=8))
def test_every_input_line_yields_exactly_one_record(store, tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("fuzz")
    lines = [ln for ln in lines if ln.strip() and "\n" not in ln and "\u2028" not in ln]
    inp = tmp / "in.jsonl"
    inp.write_text("".join(ln + "\n" for ln in lines))
    plans = [compile_plan(store.spec, load_profile("cpu-small"), Workload(8, 2), gpu_batch_size=2,
                          num_gpu_batches=1)]
    out = OutputFile(tmp / "out.jsonl")
    run_job(plans, lambda p: Engine(p, store), None, inp, out)
    out.close()
    # JSONL lines end at "\n" only: str.splitlines would also split inside ids holding U+0085 or U+2028
    answers = [json.loads(x) for x in (tmp / "out.jsonl").read_bytes().splitlines()]
    errs = errors_path(tmp / "out.jsonl")
    errors = [json.loads(x) for x in errs.read_bytes().splitlines()] if errs.exists() else []
    assert all("token_ids" in r for r in answers) and all("error" in r for r in errors)
    records = answers + errors  # one per line: its answer in the output, or its error in the errors file
    assert len(records) == len([ln for ln in lines if ln.strip()])
    good = {}
    for ln in lines:
        obj = json.loads(ln) if ln.startswith('{"id": "g') else None
        if obj and obj["id"] not in good:
            good[obj["id"]] = obj
    # good lines are unaffected by bad neighbours: alone, they give the same tokens
    alone = tmp / "alone.jsonl"
    write_lines(alone, list(good.values()))
    out2 = OutputFile(tmp / "alone-out.jsonl")
    run_job(plans, lambda p: Engine(p, store), None, alone, out2)
    out2.close()
    want = {r["id"]: r["token_ids"] for r in map(json.loads, (tmp / "alone-out.jsonl").read_bytes().splitlines())}
    got = {r["id"]: r["token_ids"] for r in records if "token_ids" in r and isinstance(r["id"], str)
           and r["id"] in want}
    assert got == want


def test_preflight_refuses_with_numbers(store, tmp_path, monkeypatch):
    plan = planfile.loads(planfile.dumps(compile_plan(
        store.spec, load_profile("cpu-small"), Workload(8, 3), gpu_batch_size=2, num_gpu_batches=1,
        fixed={"weights": Placement(1, 0, 0), "cache": Placement(0, 0, 1), "hidden": Placement(1, 0, 0)})))
    monkeypatch.setattr(preflight, "available_ram_bytes", lambda: 1000)
    with pytest.raises(preflight.PreflightError, match=r"needs \d+\.\d\d MiB of RAM .*but only 0.00 MiB is available: run `flexgen-graph"):
        Engine(plan, store, tmp_path / "off")
    monkeypatch.undo()
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_bavail": 1, "f_frsize": 1})() if "off" in str(p)
                        else real(p))
    with pytest.raises(preflight.PreflightError, match=r"writes \d+\.\d\d MiB of scratch .* only 0.00 MiB is free"):
        Engine(plan, store, tmp_path / "off")
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(preflight.PreflightError, match="not writable"):
        Engine(plan, store, tmp_path / "file" / "off")


def test_full_disk_mid_run_keeps_finished_output_and_removes_scratch(store, tmp_path, monkeypatch, capsys):
    import runtime.backend as backend

    plan_path = tmp_path / "p.fgplan"
    planfile.save(compile_plan(store.spec, load_profile("cpu-small"), Workload(8, 4), gpu_batch_size=2,
                               num_gpu_batches=1, weights_source="dummy:5",
                               fixed={"weights": Placement(1, 0, 0), "cache": Placement(0, 0, 1),
                                      "hidden": Placement(1, 0, 0)}), plan_path)
    cache = tmp_path / "cache"
    dest = store_dir("dummy:5", store.spec, cache)
    dest.parent.mkdir(parents=True)
    dest.symlink_to(store.path)
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": i, "prompt_ids": [4 + i, 5]} for i in range(6)])
    writes = {"n": 0}
    real = os.pwrite

    def filling_up(fd, data, offset):
        writes["n"] += 1
        if writes["n"] > 12:  # the first block's cache writes succeed, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(backend.os, "pwrite", filling_up)
    off = tmp_path / "off"
    out = tmp_path / "out.jsonl"
    code = main(["run", "--plan", str(plan_path), "--input", str(inp), "--output", str(out), "--cache-dir",
                 str(cache), "--offload-dir", str(off)])
    assert code == 2
    err = capsys.readouterr().err.splitlines()[-1]  # one line naming the scratch file and the bytes it needed
    assert err.startswith("flexgen-graph run: ") and f"no space left on the disk of {off}/" in err, err
    assert "more bytes" in err
    assert "re-run the same command to resume" in err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert 0 < len(records) < 6 and all("token_ids" in r for r in records)
    assert not list(off.glob("*.bin")), "scratch files must be removed"
    monkeypatch.undo()
    assert main(["run", "--plan", str(plan_path), "--input", str(inp), "--output", str(out), "--cache-dir",
                 str(cache), "--offload-dir", str(off)]) == 0
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == list(range(6))


@pytest.mark.real_model
def test_sigterm_finishes_the_block_then_resume_completes(smollm2_store, tmp_path):
    cache = tmp_path / "cache"
    dest = store_dir("default", catalog_spec(DEFAULT_MODEL), cache)
    dest.parent.mkdir(parents=True)
    dest.symlink_to(smollm2_store.path)
    plan = tmp_path / "p.fgplan"
    assert main(["compile", "--model", DEFAULT_MODEL, "--prompt-len", "48", "--gen-len", "10",
                 "--gpu-batch-size", "2", "--num-gpu-batches", "1", "--cache-frac", "0,0,1", "-o", str(plan)]) == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join((ROOT / "examples/sample_prompts.jsonl").read_text().splitlines(keepends=True)[:8]))
    off, out = tmp_path / "off", tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "flexgen_graph", "run", "--plan", str(plan), "--input", str(inp), "--output",
           str(out), "--cache-dir", str(cache), "--offload-dir", str(off)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Re-run the same command to resume" in err
    text = out.read_text()
    assert text.endswith("\n") and 1 <= text.count("\n") < 8
    assert not list(off.glob("*.bin"))
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i:02d}" for i in range(1, 9))
