"""Data-parallel runs: two gloo ranks under torchrun on a tiny checkpoint, against a single-process run."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_cli import checkpoint  # noqa: F401  (a tiny Llama checkpoint folder, imported into the cache on first run)
from test_jobs import write_lines

from flexgen_graph.app.cli import main
from flexgen_graph.app.distributed import (
    Rank,
    merge,
    pick_device,
    shard_folder,
    shard_of,
    shard_path,
)
from flexgen_graph.app.jobs import Request, answer_key, errors_path, id_key, line_key, parse_line
from flexgen_graph.hardware import usable_cores

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def job(checkpoint, tmp_path_factory):  # noqa: F811
    """A plan (blocks of 2), an input with errors, a duplicate id and a sampled line, and the single-process output."""
    d = tmp_path_factory.mktemp("dp")
    plan = d / "tiny.fgplan"
    assert main(["compile", "--model", str(checkpoint), "--profile", "cpu-small", "--prompt-len", "8", "--gen-len",
                 "6", "--gpu-batch-size", "2", "--num-gpu-batches", "1", "-o", str(plan)]) == 0
    records = [{"id": f"p{i}", "prompt_ids": list(range(3, 4 + i % 6)), "max_tokens": 2 + i % 5} for i in range(16)]
    records += [{"id": "hot", "prompt_ids": [7, 8, 9], "temperature": 1.3}, {"id": "p3", "prompt_ids": [5]},
                {"id": "too-long", "prompt_ids": list(range(3, 20))}]
    inp = d / "in.jsonl"
    write_lines(inp, records)
    with open(inp, "a") as f:
        f.write("{not json\n")
    ref = d / "ref.jsonl"
    assert main(["run", "--plan", str(plan), "--input", str(inp), "--output", str(ref),
                 "--cache-dir", str(d / "ref-cache")]) == 3  # the errors file holds the bad lines
    return plan, inp, ref


def records(path: Path) -> list[dict]:
    """The answers in path, then the error records in its errors file."""
    errs = errors_path(path)
    return [json.loads(x) for x in path.read_text().splitlines()] + \
        ([json.loads(x) for x in errs.read_text().splitlines()] if errs.exists() else [])


def by_key(recs: list[dict]) -> dict[str, dict]:
    keys = [answer_key(r) or f"error on line {r['line']}" for r in recs]
    assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]  # each id exactly once
    return dict(zip(keys, recs))


def torchrun(entry: list[str], job, out: Path, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    plan, inp, _ = job
    return subprocess.run(TORCHRUN + entry + ["run", "--plan", str(plan), "--input", str(inp), "--output", str(out),
                                              "--cache-dir", str(cache)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})


def test_shard_of_is_a_stable_hash_of_the_id_key_that_splits_evenly():
    # pinned: a salted or platform-dependent hash would move lines between ranks on a re-launch
    assert [shard_of(id_key(k), 2) for k in ("a", "b", "c", 1, 2, 3)] == [1, 1, 1, 1, 0, 1]
    assert [shard_of(id_key(k), 3) for k in ("a", "b", "c", 1, 2, 3)] == [2, 0, 1, 1, 1, 1]
    counts = Counter(shard_of(id_key(i), 4) for i in range(4000))
    assert sorted(counts) == [0, 1, 2, 3] and min(counts.values()) > 900
    # the key a line is sharded by is the key its answer is resumed by (its id's), else its line number's
    for n, text in enumerate(['{"id": 7, "prompt_ids": [3]}', '{"id": "x", "prompt_ids": "bad"}', "{not json",
                              '{"prompt_ids": [3]}', '{"id": true, "prompt_ids": [3]}', "[1]"], 1):
        r = parse_line(text, n, None)
        has_id = isinstance(r, Request) or r.has_id
        assert line_key(text, n) == (id_key(r.id) if has_id else f"line:{n}"), text
        assert has_id == (n <= 2)


def test_two_ranks_give_the_single_process_output_token_for_token(job, tmp_path):
    out = tmp_path / "out.jsonl"
    run = torchrun(["-m", "flexgen_graph"], job, out, tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    want = by_key(records(job[2]))
    assert by_key(records(out)) == want
    assert not shard_folder(out).exists()
    # both ranks generated: rank r ran exactly the prompts whose id hashes to r
    per_rank = Counter(shard_of(id_key(r["id"]), 2) for r in want.values() if "token_ids" in r)
    for r in (0, 1):
        assert f"rank {r}/2: {per_rank[r]} prompts" in run.stderr and per_rank[r] >= 5
    answers = sum("token_ids" in r for r in want.values())
    assert f"merged 2 shards into {out}: {answers} records" in run.stderr
    assert not errors_path(shard_path(out, 0, 2)).exists() and errors_path(out).exists()


def test_a_rank_killed_mid_write_loses_only_its_block_and_a_relaunch_resumes(job, tmp_path):
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    fault = [str(ROOT / "tests" / "distributed_fault.py")]
    died = torchrun(fault, job, out, cache, env={"DIE_RANK": "1", "DIE_AFTER": "3"})
    assert died.returncode != 0
    assert not out.exists()  # nothing merged while a shard is unfinished
    shard = shard_path(out, 1, 2).read_text()
    assert shard.count("\n") == 3 and not shard.endswith("\n")  # three whole records and a torn one

    again = torchrun(["-m", "flexgen_graph"], job, out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert by_key(records(out)) == by_key(records(job[2]))
    assert not shard_folder(out).exists()
    assert "already done" in again.stdout  # the three records rank 1 kept were not generated again


def test_merge_cut_short_then_rerun_keeps_each_id_once(tmp_path):
    out = tmp_path / "out.jsonl"
    shard_folder(out).mkdir()
    answer = lambda i: {"id": i, "text": None, "token_ids": [i], "finish_reason": "length"}  # noqa: E731
    shards = {r: [answer(i) for i in range(12) if shard_of(id_key(i), 2) == r] for r in (0, 1)}
    for r, recs in shards.items():
        write_lines(shard_path(out, r, 2), recs)
    first = shards[0][0]
    out.write_text(json.dumps(first) + "\n" + json.dumps(shards[0][1])[:9])  # a merge killed mid-write
    merged = merge(out, 2)
    assert (merged.appended, merged.already) == (11, 1)
    assert by_key(records(out)) == {id_key(i): answer(i) for i in range(12)}
    assert not shard_folder(out).exists()


LAUNCH = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
          "MASTER_PORT": "1"}  # port 1: a test that reached the rendezvous would fail there, not hang


def launch_env(monkeypatch, env: dict) -> None:
    for var in LAUNCH:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("env, output, message", [
    ({}, "out.jsonl", "--distributed needs torchrun's environment"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "out.jsonl", "LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT not"),
    ({**LAUNCH, "RANK": "2"}, "out.jsonl", "inconsistent launch: RANK 2, WORLD_SIZE 2"),
    (LAUNCH, None, "pass --output FILE"),
    (LAUNCH, "no-such-folder/out.jsonl", "no-such-folder does not exist"),
])
def test_bad_launches_fail_before_the_rendezvous_with_one_line(tmp_path, monkeypatch, capsys, env, output, message):
    launch_env(monkeypatch, env)
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 1, "prompt_ids": [3]}])
    args = ["run", "--distributed", "--input", str(inp), "--weights", "dummy"]
    assert main(args + (["--output", str(tmp_path / output)] if output else [])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


def test_shards_of_another_world_size_are_refused_with_what_to_do(tmp_path, monkeypatch, capsys):
    launch_env(monkeypatch, LAUNCH)  # under torchrun: no --distributed needed
    out = tmp_path / "out.jsonl"
    shard_folder(out).mkdir()
    write_lines(shard_path(out, 0, 3), [{"id": 1, "token_ids": [4]}])
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 1, "prompt_ids": [3]}])
    assert main(["run", "--input", str(inp), "--output", str(out), "--weights", "dummy"]) == 2
    err = capsys.readouterr().err
    assert "a run with 3 processes, not 2" in err and "--nproc-per-node 3" in err, err
    assert f"delete {shard_folder(out)}" in err and shard_path(out, 0, 3).exists()


def test_each_rank_takes_its_share_of_the_cores_or_names_the_missing_gpu(job):
    from flexgen_graph import planfile

    plan = planfile.load_set(job[0])[0]  # a cpu-small plan
    threads = torch.get_num_threads()
    try:
        assert pick_device(Rank(1, 4, 1, 2), plan, "auto") == "cpu"
        assert torch.get_num_threads() == max(1, usable_cores() // 2)
    finally:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="LOCAL_RANK 1 needs a CUDA device but 0 are visible"):
            pick_device(Rank(1, 4, 1, 2), plan, "cuda")
