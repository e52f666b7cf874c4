"""Nothing lost, nothing silently wrong: one test per case of a user's bad day (a flipped byte in the
weights, the input given as output, two runs on one output, poison lines, oversized lines, stray
output lines, non-UTF-8 input, a full disk, weights of another model), each reproduced and then
answered by a one-line refusal naming what to fix or by transformers' tokens; and a property: one
random byte flipped anywhere in an imported store never becomes other tokens."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_numerics import GEN_LEN, PROMPT_LEN, hf_generate, prompts_for, tiny_model

from flexgen_graph import planfile
from flexgen_graph.app import distributed, jobs
from flexgen_graph.app.api import compile_plan
from flexgen_graph.app.cli import main
from flexgen_graph.app.jobs import OutputFile, OutputInUseError, errors_path, run_job
from flexgen_graph.app.models import store_dir
from flexgen_graph.errors import DiskFullError
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.policy import Placement
from runtime import integrity
from runtime import weight_store as ws
from runtime.backend import ScratchInUseError
from runtime.engine import Engine, NonFiniteLogitsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint, its imported store, a plan for it (weights read from the store on every use),
    five prompts and transformers' greedy tokens for them."""
    d = tmp_path_factory.mktemp("integrity")
    model = tiny_model("llama")
    model.save_pretrained(d / "ckpt")
    store = ws.import_hf_folder(d / "ckpt", d / "store")
    source = f"hf:{(d / 'ckpt').resolve()}"
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=2, weights_source=source, fixed={"weights": Placement(0, 0, 1)})
    planfile.save(plan, d / "tiny.fgplan")
    prompts = prompts_for(model.config.vocab_size)
    return {"dir": d, "model": model, "store": store, "source": source, "plan": d / "tiny.fgplan",
            "prompts": prompts, "expected": {f"p{i}": t for i, t in enumerate(hf_generate(model, prompts))}}


def good_lines(tiny) -> list[dict]:
    return [{"id": f"p{i}", "prompt_ids": p} for i, p in enumerate(tiny["prompts"])]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cache_with_store(tiny, cache: Path) -> Path:
    """A cache folder holding a copy of the imported store where `run --plan tiny.fgplan` looks for it."""
    dest = store_dir(tiny["source"], tiny["store"].spec, cache)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(tiny["store"].path, dest)
    return dest


def run(capsys, tiny, inp: Path, out: Path, cache: Path, *extra: str) -> tuple[int, str]:
    """`run` in this process: its exit status, and its stderr then its stdout (the summary) as one text."""
    capsys.readouterr()
    code = main(["run", "--plan", str(tiny["plan"]), "--input", str(inp), "--output", str(out), "--cache-dir",
                 str(cache), *extra])
    cap = capsys.readouterr()
    return code, cap.err + cap.out


def answers(out: Path) -> dict:
    return {r["id"]: r["token_ids"] for r in map(json.loads, out.read_bytes().splitlines())}


def errors(out: Path) -> list[dict]:
    path = errors_path(out)
    return [json.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


# 1 ---------------------------------------------------------------------------------------------------------

def test_1_a_flipped_byte_in_a_weight_file_is_reimported_or_named_never_tokens(tiny, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    store = cache_with_store(tiny, cache)
    down = store / "tensors" / "2.down_w.bin"
    original = down.read_bytes()
    inp, out = write_jsonl(tmp_path / "in.jsonl", good_lines(tiny)), tmp_path / "out.jsonl"
    flip(down, 1000, 6)  # sizes and shapes still check out: only the content differs
    code, err = run(capsys, tiny, inp, out, cache)
    assert code == 0 and answers(out) == tiny["expected"]  # re-imported from the checkpoint, then run
    assert f"{down} had changed since import; re-imported it" in err and down.read_bytes() == original

    # the source cannot give the bytes again: one line naming the file, and no answers at all
    monkeypatch.setattr(ws, "source_fetch", lambda source, spec: _yield_none())
    flip(down, 1000, 6)
    out2 = tmp_path / "out2.jsonl"
    code, err = run(capsys, tiny, inp, out2, cache)
    last = err.splitlines()[-1]
    assert code == 2 and f"tensor '2.down_w': {down} does not match the checksum recorded at import" in last
    assert f"delete {store}" in last and (not out2.exists() or answers(out2) == {})


def test_1_a_flipped_byte_in_the_compressed_copy_is_rebuilt_from_the_store_or_named(tiny, tmp_path, capsys):
    from runtime.compressed import DONE, compressed_layers
    from runtime.quant import QuantConfig

    store = ws.WeightStore(shutil.copytree(tiny["store"].path, tmp_path / "store"))
    cfg = QuantConfig(4, 32)
    layer1 = compressed_layers(store, cfg).file(1)
    original = layer1.read_bytes()
    flip(layer1, 77, 3)
    buf = torch.empty(len(original), dtype=torch.uint8)
    compressed_layers(store, cfg).read_layer_into(1, buf)  # a new process's first read
    assert bytes(buf.numpy()) == original and layer1.read_bytes() == original
    assert f"{layer1} had changed since it was built; rebuilt it" in capsys.readouterr().err
    marker = layer1.parent / DONE  # a changed checksum: nothing to rebuild to, refused by name
    marker.write_text(marker.read_text().replace('"1": "xxh3_128:', '"1": "xxh3_128:0', 1))
    with pytest.raises(ValueError, match=f"{layer1} does not match the checksum recorded in {marker}"):
        compressed_layers(store, cfg).read_layer_into(1, buf)


def _yield_none():
    from contextlib import nullcontext

    return nullcontext(None)


def test_1_nan_or_inf_logits_stop_the_block_and_name_the_line(tmp_path):
    # a weight that turns one prompt's logits into NaN: argmax would answer token 0, silently
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    model.save_pretrained(tmp_path / "ckpt")
    store = ws.import_hf_folder(tmp_path / "ckpt", tmp_path / "store")
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=2)
    with Engine(plan, store) as engine, pytest.raises(NonFiniteLogitsError, match=r"NaN or inf logits .*\[0\]"):
        engine.generate([[5, 7, 9]])
    prompts = prompts_for(1000, 3)
    lines = [{"id": "a", "prompt_ids": prompts[0]}, {"id": "nan", "prompt_ids": [5, 7]},
             {"id": "b", "prompt_ids": prompts[1]}, {"id": "c", "prompt_ids": prompts[2]}]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = OutputFile(tmp_path / "out.jsonl")
    summary = run_job([plan], lambda p: Engine(p, store), None, inp, out)
    out.close()
    assert summary.errors == 1 and summary.prompts == 3
    assert answers(tmp_path / "out.jsonl") == dict(zip("abc", hf_generate(model, prompts)))
    [err] = errors(tmp_path / "out.jsonl")
    assert err["id"] == "nan" and err["line"] == 2 and "NonFiniteLogitsError" in err["error"]


# 2 ---------------------------------------------------------------------------------------------------------

def test_2_the_input_given_as_output_is_refused_before_any_work_and_kept_intact(tiny, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in good_lines(tiny)))  # no final newline: a torn line to "repair"
    before = inp.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(inp)
    os.link(inp, tmp_path / "hard.jsonl")
    for out in (inp, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", tmp_path / "." / "in.jsonl"):
        code, err = run(capsys, tiny, inp, out, tmp_path / "cache")
        assert code == 2 and "is the input file" in err and len(err.splitlines()) == 1, err
    assert inp.read_bytes() == before and not (tmp_path / "cache").exists()  # nothing imported, nothing written


# 3 ---------------------------------------------------------------------------------------------------------

def test_3_a_second_run_on_the_same_output_fails_at_once_naming_the_first(tiny, tmp_path, capsys):
    inp, out = write_jsonl(tmp_path / "in.jsonl", good_lines(tiny)), tmp_path / "out.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from flexgen_graph.app.jobs import OutputLock; l = OutputLock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run(capsys, tiny, inp, out, tmp_path / "cache")
        assert code == 2 and f"{out} is being written by another run (pid {holder.pid} on " in err, err
        assert not out.exists() and not (tmp_path / "cache").exists()
    finally:
        holder.kill()
        holder.wait()
    cache_with_store(tiny, tmp_path / "cache")
    code, _ = run(capsys, tiny, inp, out, tmp_path / "cache")  # the killed owner's lock went with it
    assert code == 0 and answers(out) == tiny["expected"] and len(out.read_text().splitlines()) == 5
    assert not Path(str(out) + ".lock").exists()

    # distributed shards are locked each; scratch files of one offload folder belong to one run
    shard = distributed.Shard(out, distributed.Rank(1, 2, 1, 2))
    with shard.lock(), pytest.raises(OutputInUseError, match=f"pid {os.getpid()}"):
        shard.lock()
    plan = compile_plan(tiny["store"].spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN),
                        gpu_batch_size=2, num_gpu_batches=1, fixed={"cache": Placement(0, 0, 1)})
    with Engine(plan, tiny["store"], tmp_path / "off") as first:
        with pytest.raises(ScratchInUseError, match="in use by another run"):
            Engine(plan, tiny["store"], tmp_path / "off")
        assert [t for t in first.generate([tiny["prompts"][0]])[0].token_ids] == tiny["expected"]["p0"]


# 4 ---------------------------------------------------------------------------------------------------------

def test_4_a_poison_line_is_named_and_its_neighbours_answered(tiny, tmp_path, capsys, monkeypatch):
    lines = good_lines(tiny)
    lines[1:1] = [{"id": "oov", "prompt_ids": [1, 49152, 3]},
                  {"id": "seed", "prompt_ids": [4, 5], "temperature": 0.7, "seed": 2**64},
                  {"id": "crash", "prompt_ids": [4, 999]}]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    real = Engine.generate

    def crashing(self, prompts, *a, **kw):  # a failure nothing validates for: it must take only its own line
        if any(999 in p for p in prompts):
            raise IndexError("index out of range in self")
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(Engine, "generate", crashing)
    cache_with_store(tiny, tmp_path / "cache")
    code, text = run(capsys, tiny, inp, out, tmp_path / "cache")
    assert code == 3 and f"5 prompts (3 errors: see {errors_path(out)})" in text
    assert answers(out) == tiny["expected"]
    by_id = {e["id"]: e for e in errors(out)}
    assert "outside the model's vocabulary [0, 1000)" in by_id["oov"]["error"] and by_id["oov"]["line"] == 2
    assert "seed must be in [0, 2**64)" in by_id["seed"]["error"]
    assert by_id["crash"]["error"] == "generation failed: IndexError: index out of range in self"
    # a re-run answers nothing twice and reports the same lines again
    code, _ = run(capsys, tiny, inp, out, tmp_path / "cache")
    assert code == 3 and answers(out) == tiny["expected"] and len(out.read_text().splitlines()) == 5
    assert sorted(by_id) == sorted(e["id"] for e in errors(out))
    # a failure every line of a block hits alone is the setup's, not a line's: the job stops
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **kw: (_ for _ in ()).throw(IndexError("broken")))
    with pytest.raises(IndexError, match="broken"):
        main(["run", "--plan", str(tiny["plan"]), "--input", str(write_jsonl(tmp_path / "b.jsonl", good_lines(tiny))),
              "--output", str(tmp_path / "b-out.jsonl"), "--cache-dir", str(tmp_path / "cache")])


# 5 ---------------------------------------------------------------------------------------------------------

def test_5_an_oversized_line_gets_an_error_record_when_run_compiles_the_plan(tiny, tmp_path, capsys):
    lines = [dict(r, max_tokens=GEN_LEN) for r in good_lines(tiny)[:2]]
    lines += [{"id": "long", "prompt_ids": list(range(3, 103))},  # 100 tokens; the model has 64 positions
              {"id": "many", "prompt_ids": [4, 5], "max_tokens": 1_000_000_000}]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    capsys.readouterr()
    code = main(["run", "--model", str(tiny["dir"] / "ckpt"), "--profile", "cpu-small", "--input", str(inp),
                 "--output", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 3, capsys.readouterr().err
    assert answers(out) == {k: tiny["expected"][k] for k in ("p0", "p1")}
    by_id = {e["id"]: e["error"] for e in errors(out)}
    # the model's limit is named, not the plans' (which were sized for the lines the model can take)
    assert sorted(by_id) == ["long", "many"] and all("'s 64 positions" in m for m in by_id.values()), by_id


# 6 ---------------------------------------------------------------------------------------------------------

def test_6_output_lines_that_are_not_answers_never_make_an_id_done(tiny, tmp_path, capsys):
    inp, out = write_jsonl(tmp_path / "in.jsonl", good_lines(tiny)), tmp_path / "out.jsonl"
    cache_with_store(tiny, tmp_path / "cache")
    answer = {"id": "p0", "text": None, "token_ids": tiny["expected"]["p0"], "finish_reason": "length"}
    stray = [json.dumps(answer), '{"id": "p1"}', '{"id": "p2", "text": nu', '{"id": "p3", "error": "old"}']
    out.write_text("\n".join(stray) + "\n")
    code, err = run(capsys, tiny, inp, out, tmp_path / "cache")
    assert code == 0
    assert ("line(s) 2 (not an answer record), 3 (invalid JSON), 4 (an error record (errors go to the errors file)) "
            "are not answer records: left as they are") in err
    kept = out.read_text().splitlines()
    assert kept[:4] == stray  # the user's lines are left in place, reported once
    assert answers_of(kept[4:]) == {k: v for k, v in tiny["expected"].items() if k != "p0"}  # p0 once, not again


def answers_of(lines: list[str]) -> dict:
    return {r["id"]: r["token_ids"] for r in map(json.loads, lines)}


# 7 ---------------------------------------------------------------------------------------------------------

def test_7_input_bytes_are_never_replaced_and_a_bom_is_accepted(tiny, tmp_path, capsys):
    good = good_lines(tiny)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + json.dumps(good[0]).encode() + b"\n"
                    + b'{"id": "caf\xe9", "prompt_ids": [5, 6]}\n' + json.dumps(good[1]).encode() + b"\n")
    cache_with_store(tiny, tmp_path / "cache")
    code, _ = run(capsys, tiny, inp, out, tmp_path / "cache")
    assert code == 3 and answers(out) == {k: tiny["expected"][k] for k in ("p0", "p1")}
    first = len(b"\xef\xbb\xbf" + json.dumps(good[0]).encode() + b"\n")
    assert errors(out) == [{"line": 2, "error": f"line 2: invalid UTF-8 at byte 11 of the line (byte {first + 11} of "
                                                "the file); the input must be UTF-8"}]
    assert "\ufffd" not in out.read_text() + errors_path(out).read_text()


# 8 ---------------------------------------------------------------------------------------------------------

def test_8_a_full_disk_is_one_line_naming_path_and_bytes_and_leaves_no_partial_file(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    inp, out = write_jsonl(tmp_path / "in.jsonl", good_lines(tiny)), tmp_path / "out.jsonl"
    cache_with_store(tiny, tmp_path / "cache")
    real_write, answered = os.write, []

    def filling_up(fd, data):  # the output's disk fills up during the third answer, half of it written
        if b'"token_ids"' in bytes(data):
            if len(answered) == 2:
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            answered.append(1)
        return real_write(fd, data)

    monkeypatch.setattr(jobs.os, "write", filling_up)
    code, err = run(capsys, tiny, inp, out, tmp_path / "cache")
    last = err.splitlines()[-1]
    assert code == 2 and f"no space left on the disk of {out} (output): it needs" in last and "more bytes" in last
    text = out.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2  # the half-written answer was cut off again
    monkeypatch.undo()
    code, _ = run(capsys, tiny, inp, out, tmp_path / "cache")
    assert code == 0 and answers(out) == tiny["expected"] and len(out.read_text().splitlines()) == 5

    # the cache: refused before a byte is written when the import cannot fit, naming the folder and bytes
    monkeypatch.setattr(integrity, "free_bytes", lambda folder: 1000)
    code, err = run(capsys, tiny, inp, tmp_path / "o2.jsonl", tmp_path / "empty-cache")
    dest = store_dir(tiny["source"], tiny["store"].spec, tmp_path / "empty-cache")
    assert code == 2 and f"no space left on the disk of {dest}" in err and "more bytes" in err
    assert not list(dest.rglob("*.bin")) and not (dest / "manifest.json").exists()
    # a write cut short by a full disk never leaves a file under its final name, nor its temporary one
    target = tmp_path / "t.bin"
    with pytest.raises(DiskFullError, match=f"{target}: it needs 90 more bytes"):
        with integrity.atomic_file(target, 100) as f:
            f.write(b"x" * 10)
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.glob("t.bin*")) == []


# 9 ---------------------------------------------------------------------------------------------------------

def test_9_weights_of_another_model_are_refused_before_any_import_naming_both(tiny, tmp_path, capsys, monkeypatch):
    plan = tmp_path / "opt.fgplan"
    assert main(["compile", "--model", "facebook/opt-125m", "--prompt-len", "8", "--gen-len", "4",
                 "--gpu-batch-size", "1", "--num-gpu-batches", "1", "-o", str(plan)]) == 0
    monkeypatch.setattr(ws, "import_hf_folder", lambda *a, **kw: pytest.fail("imported before checking"))
    inp = write_jsonl(tmp_path / "in.jsonl", good_lines(tiny))
    capsys.readouterr()
    code = main(["run", "--plan", str(plan), "--weights", str(tiny["dir"] / "ckpt"), "--input", str(inp), "--output",
                 str(tmp_path / "out.jsonl"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and "the plan is for 'facebook/opt-125m'" in err
    assert f"are '{(tiny['dir'] / 'ckpt').resolve()}' (family: plan 'opt' vs weights 'llama'" in err
    assert not (tmp_path / "cache" / "weights").exists()


# the property ------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_one_flipped_byte_anywhere_in_a_store_gives_transformers_tokens_or_a_line_naming_the_file(
        tiny, tmp_path_factory, capsys, data):
    tmp = tmp_path_factory.mktemp("flip")
    cache = tmp / "cache"
    store = cache_with_store(tiny, cache)
    files = sorted(p for p in store.rglob("*") if p.is_file())
    victim = data.draw(st.sampled_from(files), label="file")
    flip(victim, data.draw(st.integers(0, 10**9), label="offset"), data.draw(st.integers(0, 7), label="bit"))
    inp, out = write_jsonl(tmp / "in.jsonl", good_lines(tiny)), tmp / "out.jsonl"
    code, err = run(capsys, tiny, inp, out, cache)
    event(f"{victim.parent.name}/: {'re-imported' if 're-imported' in err else 'refused' if code else 'no effect'}")
    if code == 0:
        assert answers(out) == tiny["expected"]
    else:
        assert str(victim) in err.splitlines()[-1], (victim, err)
        assert not out.exists() or answers(out) == {}
