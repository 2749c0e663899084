"""The benchmarks' command lines refuse bad options with one argparse error (status 2), before
any measuring: a count below one, an unknown group, an --out that cannot be written."""

from __future__ import annotations

import pytest

from benchmarks import ab_step, bench_dist, bench_newton_schulz, bench_rounding, bench_step


def refused(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # torch.set_num_threads raised 'RuntimeError: set_num_threads expects a positive integer'
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--threads", "-2"], "argument --threads: must be at least 1, got -2"),
        # --rounds 0 measured nothing and wrote a report of n/a rows and 'did not run' targets
        (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        (["--rounds", "-1"], "argument --rounds: must be at least 1, got -1"),
        # an unknown group ran no group and wrote an empty report
        (["--groups", "xyz"], "--groups 'xyz': unknown group 'x' (groups: a, b, c, d)"),
        (["--groups", ""], "--groups '': names no group (groups: a, b, c, d)"),
        (["--many", "--groups", "d"], "--groups 'd': unknown group 'd' (groups: a, b, c)"),
    ],
)
def test_bench_step_refuses_bad_options(capsys, argv, message):
    assert message in refused(capsys, bench_step.main, argv)


def test_bench_step_many_runs_its_groups_without_a_groups_option(monkeypatch):
    """--groups defaults to abcd, and --many has no group d: the documented
    `bench_step --many` was refused with "unknown group 'd'" before it measured anything."""

    class Measuring(Exception):
        pass

    def many_groups(*args, **kwargs):
        raise Measuring

    monkeypatch.setattr(bench_step, "many_groups", many_groups)
    monkeypatch.setattr(bench_step, "machine_info", lambda device: {})
    with pytest.raises(Measuring):
        bench_step.main(["--many", "--quick"])


def test_bench_step_refuses_an_out_it_cannot_write_before_measuring(capsys, tmp_path):
    """--out naming a directory or a file in a missing directory failed at the very end of the
    run (minutes on a CPU) with a traceback, the report lost."""
    err = refused(capsys, bench_step.main, ["--quick", "--out", str(tmp_path)])
    assert f"--out {str(tmp_path)!r} is a directory" in err
    missing = tmp_path / "no" / "RESULTS.md"
    err = refused(capsys, bench_step.main, ["--quick", "--out", str(missing)])
    assert f"--out {str(missing)!r}: directory {str(missing.parent)!r} does not exist" in err


@pytest.mark.parametrize("option", ["--rounds", "--steps", "--warmup", "--threads"])
def test_ab_step_refuses_counts_below_one(capsys, option):
    """ab_step --rounds 0 ended in statistics.StatisticsError; --threads 0 in a worker's traceback."""
    value = "-1" if option == "--warmup" else "0"
    err = refused(capsys, ab_step.main, ["HEAD", option, value])
    low = 0 if option == "--warmup" else 1
    assert f"argument {option}: must be at least {low}, got {value}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reps", "0"], "argument --reps: must be at least 1, got 0"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--sizes", "256x"], "--sizes: expected RxC[,RxC...] like 256x1024, got '256x'"),
        (["--sizes", "0x8"], "--sizes: expected RxC[,RxC...] like 256x1024, got '0x8'"),
    ],
)
def test_bench_newton_schulz_refuses_bad_options(capsys, argv, message):
    assert message in refused(capsys, bench_newton_schulz.main, argv)


def test_bench_rounding_refuses_bad_options(capsys):
    assert "argument --rounds: must be at least 1, got 0" in refused(capsys, bench_rounding.main, ["--rounds", "0"])


@pytest.mark.parametrize("option", ["--ranks", "--threads", "--rounds"])
def test_bench_dist_refuses_counts_below_one(capsys, option):
    """--ranks 0 ended in statistics.StatisticsError (a median of no rank's times)."""
    assert f"argument {option}: must be at least 1, got 0" in refused(capsys, bench_dist.main, [option, "0"])


def test_group_table_columns_line_up_when_every_peer_failed():
    """With no peer measured (all failed), the header and rows had an empty extra cell that the
    separator lacked, so the markdown table did not render, and a row with no times said 'nan'."""
    from benchmarks.report import group_table
    from benchmarks.runner import Group, Result

    g = Group("a", "AdamW", "all", [], 10, 3, 1, [("soapdsl adamw", "torch AdamW foreach")])
    res = [Result("soapdsl adamw", times=[0.01, 0.02], faults=4), Result("torch AdamW foreach", error="boom")]
    lines = group_table(g, res)
    assert len({line.count("|") for line in lines}) == 1, lines
    assert "nan" not in "\n".join(lines)
