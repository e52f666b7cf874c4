"""What a new user meets first: help and version, mistakes refused before any work, models from the
Hugging Face cache, a progress bar that moves within a block, the README's examples, the step plot."""

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_jobs import tiny_plans, tiny_store, write_lines  # noqa: F401  (tiny_store: a fixture)
from test_openai_batch import byte_tokenizer, chat_checkpoint, hf_answer, write_chat_checkpoint  # noqa: F401

from flexgen_graph import __version__, planfile
from flexgen_graph.app import jobs
from flexgen_graph.app.cli import build_parser, main
from flexgen_graph.app.models import resolve_model
from runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_the_bare_command_prints_help_and_version_prints_the_package_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flexgen-graph") and all(c in out for c in ("compile", "run", "inspect"))
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"flexgen-graph {__version__}"
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "flexgen_graph.__version__"}


def test_every_argument_of_every_command_has_help_and_run_names_every_input_field():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("", parser), *subs.choices.items()]:
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction), \
                f"{name} {action.option_strings or action.dest} has no help"
    run_help = subs.choices["run"].format_help()
    for field in ("id", "prompt", "messages", "prompt_ids", "max_tokens", "temperature", "top_p", "seed", "custom_id",
                  "max_completion_tokens", "stop", "line", "finish_reason"):
        assert f'"{field}"' in run_help, field
    for cmd in ("compile", "run"):  # one default profile, and the help says which
        assert "default: local" in " ".join(subs.choices[cmd].format_help().split()), cmd


def test_compile_and_run_default_to_the_same_profile(chat_checkpoint, tmp_path, capsys):  # noqa: F811
    plan = tmp_path / "p.fgplan"
    assert main(["compile", "--model", str(chat_checkpoint), "--prompt-len", "8", "--gen-len", "2",
                 "-o", str(plan)]) == 0
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 1, "prompt_ids": [5, 6]}])
    assert main(["run", "--model", str(chat_checkpoint), "--input", str(inp), "--cache-dir", str(tmp_path / "c")]) == 0
    compiled, = (tmp_path / "c" / "plans").glob("*.fgplan")
    assert planfile.load_set(plan)[0].profile.name == planfile.load_set(compiled)[0].profile.name == "local"


@pytest.mark.parametrize("flag", ["--gen-len", "--prompt-len"])
def test_run_refuses_lengths_below_one_as_compile_does(flag, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 1, "prompt_ids": [5]}])
    for argv in (["run", "--input", str(inp)], ["compile", "--model", "facebook/opt-125m", "-o", "x.fgplan",
                                                "--prompt-len", "8", "--gen-len", "4"]):
        with pytest.raises(SystemExit) as e:
            main(argv + [flag, "0"])
        assert e.value.code == 2 and f"{flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_a_bad_output_is_refused_before_anything_is_imported(chat_checkpoint, tmp_path, capsys):  # noqa: F811
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 1, "prompt_ids": [5]}])
    cache = tmp_path / "cache"
    base = ["run", "--model", str(chat_checkpoint), "--input", str(inp), "--cache-dir", str(cache)]
    assert main(base + ["--output", str(tmp_path / "no-such-folder" / "out.jsonl")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main(base + ["--output", str(inp)]) == 2
    assert "is the input file" in one_line_error(capsys)
    assert main(base + ["--output", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)
    assert not cache.exists()  # no weights imported, no plan compiled
    assert inp.read_text() == json.dumps({"id": 1, "prompt_ids": [5]}) + "\n"


def test_dummy_weights_with_text_lines_are_refused_before_the_dummy_store_is_written(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 1, "prompt_ids": [5]}, {"id": 2, "prompt": "hi"}])
    cache = tmp_path / "cache"
    assert main(["run", "--model", "facebook/opt-125m", "--weights", "dummy", "--input", str(inp),
                 "--cache-dir", str(cache)]) == 2
    err = one_line_error(capsys)
    assert "line 2" in err and '"prompt_ids"' in err and "--tokenizer" in err
    assert not (cache / "weights").exists()


def test_a_tokenizer_folder_lets_dummy_weights_answer_text(chat_checkpoint, tmp_path, capsys):  # noqa: F811
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": 1, "prompt": "hi"}, {"id": 2, "messages": [{"role": "user", "content": "yo"}]}])
    assert main(["run", "--model", str(chat_checkpoint), "--weights", "dummy", "--tokenizer", str(chat_checkpoint),
                 "--input", str(inp), "--output", str(out), "--gen-len", "3", "--cache-dir", str(tmp_path / "c")]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    tok = byte_tokenizer()
    assert [r["id"] for r in recs] == [1, 2] and all("error" not in r for r in recs)
    assert all(r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True) for r in recs)


def test_a_model_path_that_does_not_exist_says_so(capsys, tmp_path):
    for missing in ("path/to/hf-checkpoint", str(tmp_path / "nothing"), "./ckpt", "model.gguf"):
        assert main(["compile", "--model", missing, "--prompt-len", "8", "--gen-len", "4", "-o", "x.fgplan"]) == 2
        err = one_line_error(capsys)
        assert f"--model {missing}: no such file or folder" in err and "known:" not in err


def test_inspect_plot_without_matplotlib_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plan = ROOT / "plans" / "opt-1.3b--t4-flexgen--float16--p512g32.fgplan"
    assert main(["inspect", str(plan), "--plot", "x.png"]) == 2
    assert "flexgen-graph[plot]" in one_line_error(capsys)


def write_hub_cache(root: Path, repo_id: str, folder: Path, old: Path) -> Path:
    """huggingface_hub's cache layout: blobs, snapshots/<commit> of links to them, refs/main naming the commit."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, src in (("0" * 40, old), ("a1" * 20, folder)):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a1" * 20)
    return repo / "snapshots" / ("a1" * 20)


def test_a_model_id_in_the_hugging_face_cache_runs_offline_from_its_main_snapshot(
        chat_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    old = write_chat_checkpoint(tmp_path / "old", layers=1)  # an older snapshot refs/main no longer names
    hub = tmp_path / "hub"
    snap = write_hub_cache(hub, "tiny-org/tiny-chat", chat_checkpoint, old)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, source = resolve_model("tiny-org/tiny-chat")
    assert source == f"hf:{snap.resolve()}" and spec.name == "tiny-org/tiny-chat" and spec.num_layers == 2
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub is the cache when HF_HUB_CACHE is not set
    assert resolve_model("tiny-org/tiny-chat")[1] == source
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompt = [5, 6, 7]
    write_lines(inp, [{"id": "a", "prompt_ids": prompt, "max_tokens": 4}])
    assert main(["run", "--model", "tiny-org/tiny-chat", "--input", str(inp), "--output", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads(out.read_text())["token_ids"] == hf_answer(chat_checkpoint, prompt, 4)


def test_driver_reports_every_decode_step_with_the_tokens_it_made(tiny_store):  # noqa: F811
    plan, = tiny_plans(tiny_store, gbs=4)
    steps: list[int] = []
    with Engine(plan, tiny_store) as engine:
        gens = engine.generate([[3, 4], [5], [6, 7, 8]], [6, 2, 4], on_step=steps.append)
    assert len(steps) == max(len(g.token_ids) for g in gens)  # one call per step the block ran
    assert sum(steps) == sum(len(g.token_ids) for g in gens)  # the tokens of the real prompts, no filler
    assert steps == sorted(steps, reverse=True) and steps[0] == 3


def test_the_progress_bar_moves_within_a_block(tiny_store, tmp_path, monkeypatch):  # noqa: F811
    moves: list[float] = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.postfix = total, ""

        def update(self, n):
            moves.append(n)

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def close(self):
            pass

    monkeypatch.setattr(jobs, "tqdm", Bar)
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": i, "prompt_ids": [3 + i, 4]} for i in range(2)])
    out = jobs.OutputFile(tmp_path / "out.jsonl")
    plans = tiny_plans(tiny_store)  # one block of 2, up to 6 steps
    summary = jobs.run_job(plans, lambda p: Engine(p, tiny_store), None, inp, out)
    out.close()
    assert len([m for m in moves if m > 0]) >= 2 and sum(moves) == pytest.approx(2)  # not one jump per block
    assert summary.tokens == sum(len(json.loads(x)["token_ids"]) for x in (tmp_path / "out.jsonl").read_text()
                                 .splitlines())


def readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split(f"## {title}", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_five_line_example_parses_and_names_inputs_that_exist_and_fit_its_weights():
    lines = readme_block("The CLI in five lines")
    assert len(lines) == 5
    for line in lines:
        argv = shlex.split(line.split("  #")[0])
        assert argv[0] == "flexgen-graph"
        args = build_parser().parse_args(argv[1:])
        if getattr(args, "input", None):
            inp = ROOT / args.input
            assert inp.is_file(), line
            if args.weights == "dummy" and not args.tokenizer:  # no tokenizer: every line gives token ids
                assert all("prompt_ids" in json.loads(x) for x in inp.read_text().splitlines()), line


def test_the_readme_shows_each_input_and_output_shape_as_json(chat_checkpoint):  # noqa: F811
    text = (ROOT / "README.md").read_text().split("## Input and output formats", 1)[1].split("\n## ", 1)[0]
    shapes = [json.loads(x) for x in re.findall(r"^\{.*\}$", text, flags=re.M)]
    assert any("prompt" in s and "id" in s for s in shapes) and any("custom_id" in s and "body" in s for s in shapes)
    assert any("token_ids" in s for s in shapes) and any(s.get("response") for s in shapes)
    assert any("line" in s and "error" in s for s in shapes)


def test_the_step_plot_keeps_its_legend_off_the_lanes_gives_each_op_kind_a_colour_and_marks_the_peak(tmp_path):
    pytest.importorskip("matplotlib")
    from flexgen_graph.app.inspect import describe, plot

    plan, = planfile.load_set(ROOT / "plans" / "opt-13b--t4-flexgen--float16--p512g32.fgplan")
    fig = plot(plan, tmp_path / "step.png")
    assert (tmp_path / "step.png").stat().st_size > 0
    fig.canvas.draw()
    lanes = fig.axes[0]
    legend = lanes.get_legend()
    assert legend.get_window_extent().x0 >= lanes.get_window_extent().x1  # beside the lanes, not over them
    colours = {c.get_label(): tuple(c.get_facecolor()[0]) for c in lanes.collections}
    assert len(colours) >= 4 and len(set(colours.values())) == len(colours)
    peaks = describe(plan)["tiers"]
    for ax, tier in zip(fig.axes[1:], ("gpu", "cpu")):
        marked = [line for line in ax.get_lines() if "peak" in line.get_label()]
        assert marked and marked[0].get_ydata()[0] == pytest.approx(peaks[tier]["simulated_peak_bytes"] / 2**30)


def test_console_entry_with_no_arguments_exits_0_with_usage():
    out = subprocess.run([sys.executable, "-m", "flexgen_graph"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "usage: flexgen-graph" in out.stdout and not out.stderr


def test_an_input_that_is_not_a_file_is_named_for_what_it_is(tmp_path, capsys):
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for given, why in (("-", "standard input is not read"), (str(tmp_path), "is a folder"),
                       (str(fifo), "is not a regular file (a pipe or a device"), (str(tmp_path / "no"), "no such file")):
        assert main(["run", "--input", given, "--output", str(tmp_path / "o.jsonl")]) == 2
        assert why in one_line_error(capsys), given


def test_an_unknown_profile_lists_every_name_run_takes(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 0, "prompt_ids": [3]}])
    assert main(["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--profile", "nope"]) == 2
    err = one_line_error(capsys)
    assert "unknown profile 'nope'" in err and "local, auto" in err and "cpu-small" in err


def test_a_cache_dir_that_cannot_take_files_is_refused_before_any_work(tmp_path, capsys):
    inp, afile = tmp_path / "in.jsonl", tmp_path / "a-file"
    write_lines(inp, [{"id": 0, "prompt_ids": [3]}])
    afile.write_text("x")
    assert main(["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--cache-dir", str(afile)]) == 2
    assert f"--cache-dir {afile} is a file, not a folder" in one_line_error(capsys)
    under = afile / "sub"  # a folder that cannot be made (its parent is a file)
    assert main(["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--cache-dir", str(under)]) == 2
    assert f"--cache-dir {under} cannot take files" in one_line_error(capsys)
