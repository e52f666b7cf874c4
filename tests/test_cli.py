"""The command line: compile -> inspect -> run on a tiny checkpoint, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexgen_graph.app.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=300, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("ckpt")
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def test_compile_inspect_run(checkpoint, tmp_path, capsys):
    plan = tmp_path / "tiny.fgplan"
    assert main(["compile", "--model", str(checkpoint), "--profile", "cpu-small", "--prompt-len", "8",
                 "--gen-len", "4", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
                 "--weights-frac", "0,1,0", "-o", str(plan)]) == 0
    assert main(["inspect", str(plan), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["policy"]["weights"] == [0.0, 1.0, 0.0]
    assert info["policy"]["gpu_batch_size"] == 2 and info["policy"]["num_gpu_batches"] == 2
    assert info["weights_source"].startswith("hf:")

    inp = tmp_path / "in.jsonl"
    lines = [{"id": f"p{i}", "prompt_ids": list(range(3, 3 + i + 1)), "max_tokens": 1 + i % 4} for i in range(5)]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
                   + json.dumps({"id": "long", "prompt_ids": list(range(3, 20))}) + "\n"
                   + json.dumps({"prompt_ids": [5]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", "--plan", str(plan), "--input", str(inp), "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 3  # some lines are in the errors file
    by_id = {r["id"]: r for r in (json.loads(x) for x in out.read_text().splitlines())}
    assert sorted(by_id) == [f"p{i}" for i in range(5)]  # answers only
    for i in range(5):
        r = by_id[f"p{i}"]
        assert len(r["token_ids"]) <= 1 + i % 4 and r["finish_reason"] in ("stop", "length")
        assert r["text"] is None  # this checkpoint has no tokenizer
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert {r["line"] for r in errors} == {6, 7, 8}  # bad JSON, the too-long prompt, the line without an id
    assert [r["id"] for r in errors if "id" in r] == ["long"] and "at most 8" in errors[1]["error"]
    summary = capsys.readouterr().out
    assert "plan prompt 8, gen 4: 2 blocks, 5 sequences" in summary and "peak bytes" in summary
    assert f"3 errors: see {tmp_path / 'out.errors.jsonl'}" in summary


def test_errors_are_one_line_with_exit_code_2(checkpoint, tmp_path, capsys):
    assert main(["compile", "--model", "facebook/opt-13", "--prompt-len", "8", "--gen-len", "4", "-o",
                 str(tmp_path / "x.fgplan")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'facebook/opt-13'" in err and "facebook/opt-13b" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.fgplan"
    bad.write_bytes(b"\x93garbage")
    assert main(["inspect", str(bad)]) == 2
    assert "not" in capsys.readouterr().err
    assert main(["compile", "--model", str(checkpoint), "--profile", "no-such-profile", "--prompt-len", "8",
                 "--gen-len", "4", "-o", str(tmp_path / "y.fgplan")]) == 2
    assert "unknown profile 'no-such-profile'" in capsys.readouterr().err


def test_plan_refuses_weights_of_another_model(checkpoint, tmp_path, capsys):
    plan = tmp_path / "opt.fgplan"
    assert main(["compile", "--model", "facebook/opt-125m", "--prompt-len", "8", "--gen-len", "4",
                 "--gpu-batch-size", "1", "--num-gpu-batches", "1", "-o", str(plan)]) == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt_ids": [4, 5]}) + "\n")
    assert main(["run", "--plan", str(plan), "--weights", str(checkpoint), "--input", str(inp),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "the plan is for 'facebook/opt-125m' but the weights" in err and f"are '{checkpoint.resolve()}'" in err
    assert "nothing was imported" in err and not (tmp_path / "cache" / "weights").exists()


def test_console_help_teaches():
    out = subprocess.run([sys.executable, "-m", "flexgen_graph", "compile", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--profile", "--prompt-len", "--gen-len", "--weights-frac", "t4-flexgen"):
        assert flag in out.stdout


def test_plan_refuses_another_profile_or_workload(checkpoint, tmp_path, capsys):
    plan = tmp_path / "p.fgplan"
    assert main(["compile", "--model", str(checkpoint), "--profile", "cpu-small", "--prompt-len", "8",
                 "--gen-len", "4", "--gpu-batch-size", "1", "--num-gpu-batches", "1", "-o", str(plan)]) == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt_ids": [4, 5]}) + "\n")
    base = ["run", "--plan", str(plan), "--input", str(inp), "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main(base + ["--profile", "t4-flexgen"]) == 2
    assert "compiled for profile 'cpu-small', not 't4-flexgen'" in capsys.readouterr().err
    assert main(base + ["--prompt-len", "16"]) == 2
    assert "--prompt-len 16 does not match the plan's workload (prompt 8, gen 4)" in capsys.readouterr().err
    assert main(base + ["--profile", "cpu-small", "--prompt-len", "8"]) == 0
