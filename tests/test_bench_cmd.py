"""`flexgen-graph bench`: the scenarios are listed, an unknown one is a usage error, and c2 runs end to end
in a tiny configuration. No benchmark is run at its real size here."""

import re

import pytest

from flexgen_graph.app import bench_cmd


def bench_main(argv: list[str]) -> int:
    """`flexgen-graph bench ...` through the CLI's own entry point."""
    from flexgen_graph.app.cli import main

    try:
        return main(["bench", *argv])
    except SystemExit as e:  # argparse: --help or a usage error
        return e.code


def test_help_lists_scenarios(capsys):
    assert bench_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in bench_cmd.SCENARIOS:
        assert re.search(rf"^\s+{name}\s", out, re.M), f"scenario {name} missing from:\n{out}"


def test_unknown_scenario_is_a_usage_error(capsys):
    assert bench_main(["c9"]) == 2
    err = capsys.readouterr().err
    assert "c9" in err and "c1" in err  # names the bad input and the choices


def test_scenario_help_reaches_the_script(capsys):
    assert bench_main(["c1", "--help"]) == 0
    out = capsys.readouterr().out
    assert "flexgen-graph bench c1" in out and "--weights-ram-gib" in out


def test_bad_scenario_option_is_a_usage_error(capsys):
    assert bench_main(["c1", "--dtype", "float8"]) == 2
    assert "float8" in capsys.readouterr().err


@pytest.mark.real_model
def test_c2_tiny_run(smollm2_store, capsys):
    assert bench_main(["c2", "--store", str(smollm2_store.path), "--profile", "cpu-small", "--batches", "1,2",
                       "--gen-len", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [int(r[0]) for r in rows] == [1, 2]
    for r in rows:
        ours, theirs, ratio, pred, mp = (float(x.strip().rstrip("x")) for x in r[1:])
        assert min(ours, theirs, ratio, pred, mp) > 0
