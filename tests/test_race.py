"""`soapdsl race`: the bundled dataset, fair runs, outputs, recipe specs, the lr grid.

Every race here is tiny (a one-layer, 32-wide model, a few steps), so the module runs in seconds.
"""

from __future__ import annotations

import io
import json
import math
from importlib import resources

import pytest

from soapdsl import library
from soapdsl.cli import main
from soapdsl.errors import SoapArgumentError, SoapError, SoapNameError
from soapdsl.race import run_race
from soapdsl.race.data import kjv_books, load_charlm
from soapdsl.race.progress import Progress
from soapdsl.race.spec import lr_params, parse_grid, parse_spec, parse_specs, scaled_lrs

TINY = dict(steps=6, batch=4, context=32, d_model=32, n_layers=1, n_heads=2, eval_every=3, eval_batches=1, threads=1)
TINY_CLI = [
    "--steps", "6", "--batch", "4", "--context", "32", "--d-model", "32", "--layers", "1", "--heads", "2",
    "--eval-every", "3", "--eval-batches", "1", "--threads", "1",
]  # fmt: skip


def tiny_race(recipes, **kw):
    args = {**TINY, "out": None, "progress": False, **kw}
    return run_race(recipes, **args)


# -- the dataset ------------------------------------------------------------------------------


def test_dataset_ships_inside_the_package():
    data = resources.files("soapdsl") / "data" / "kjv.txt.xz"
    assert data.is_file()
    assert data.stat().st_size < 3 * 2**20  # compressed, a few MB at most
    assert (resources.files("soapdsl") / "data" / "README.md").is_file()


def test_dataset_splits_are_disjoint_and_not_empty():
    books = kjv_books()
    assert len(books) == 66
    assert books[0].startswith("In the beginning God created the heaven and the earth.")
    assert books[-1].rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    c = load_charlm()
    assert c.train_chars > 3_000_000 and c.valid_chars > 300_000
    assert len(c.train) == c.train_chars and len(c.valid) == c.valid_chars
    assert c.train_chars + c.valid_chars == sum(len(b) for b in books) + 2 * 65 + 1
    train, valid = c.decode(c.train), c.decode(c.valid)
    # held out by book: Genesis..Acts train, Romans..Revelation validation
    assert "Paul, a servant of Jesus Christ" in valid and "Paul, a servant of Jesus Christ" not in train
    assert "In the beginning God created" in train and "In the beginning God created" not in valid
    assert not any(ch.isdigit() for ch in c.vocab)  # verse numbers are gone
    assert c.encode(c.decode(c.valid[:100])).tolist() == c.valid[:100].tolist()


# -- fairness ---------------------------------------------------------------------------------


def test_same_init_and_data_order_for_every_recipe():
    r = tiny_race(["adamw", "adamw:lr=0.001", "soap_muon"])  # the second is the first, spelled out
    a, b, c = (row.best for row in r.rows)
    assert [row.label for row in r.rows] == ["adamw", "adamw:lr=0.001", "soap_muon"]
    assert len(a.train_loss) == TINY["steps"]
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.train_loss[0] == c.train_loss[0]  # same weights, same first batch
    assert a.val_loss[0] == c.val_loss[0]
    assert a.val_steps == [0, 3, 6]
    again = tiny_race(["adamw"])
    assert again.rows[0].best.train_loss == a.train_loss
    other = tiny_race(["adamw"], seed=1)
    assert other.rows[0].best.train_loss != a.train_loss


def test_steps_to_target_uses_the_first_recipes_final_smoothed_loss():
    r = tiny_race(["adamw", "adamw:lr=0.001", "adamw:lr=1e-6"])
    first = r.rows[0].best
    assert r.target == first.final_train == first.train_smooth[-1]
    assert r.rows[0].steps_to_target is not None and r.rows[0].steps_to_target <= TINY["steps"]
    assert r.rows[1].steps_to_target == r.rows[0].steps_to_target
    assert r.rows[2].steps_to_target is None  # lr 1e-6 never gets there
    assert "-" in r.table().splitlines()[4].split()


# -- the command line -------------------------------------------------------------------------


def test_cli_writes_png_json_and_prints_every_run(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    legend: list[str] = []
    savefig = Figure.savefig

    def keep_legend(fig, *args, **kwargs):
        legend.extend(t.get_text() for t in fig.axes[1].get_legend().get_texts())
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_legend)
    out = tmp_path / "race"
    rc = main(["race", "adamw", "muon", "soap:freq=2", "--quiet", "--out", str(out), *TINY_CLI])
    assert rc == 0
    assert legend == ["adamw", "muon", "soap:freq=2"]
    stdout = capsys.readouterr().out
    png, js = out / "losses.png", out / "race.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in stdout and str(js) in stdout
    lines = stdout.splitlines()
    for label in ("adamw", "muon", "soap:freq=2"):  # a row says which overrides it ran with
        assert any(line.split()[:1] == [label] for line in lines), label
    assert "state MiB" in stdout and "steps to" in stdout
    data = json.loads(js.read_text())
    assert data["format"] == "soapdsl-race"
    assert [r["label"] for r in data["rows"]] == ["adamw", "muon", "soap:freq=2"]
    assert data["config"]["steps"] == 6 and data["config"]["seed"] == 0
    assert {"soapdsl", "torch", "python"} <= set(data["versions"])
    for run in data["runs"]:
        assert len(run["train_loss"]) == 6 and run["val_steps"] == [0, 3, 6]
        assert run["state_bytes"] > 0
    assert data["runs"][2]["args"] == {"freq": 2}


def test_cli_progress_lines_when_stderr_is_not_a_tty(tmp_path, capsys):
    assert main(["race", "adamw", "--out", str(tmp_path), *TINY_CLI]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "adamw: 6 steps" in err and "adamw: done in" in err


def test_progress_redraws_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = Progress("soap", 3, s)
    for i in range(1, 4):
        p.update(i, loss=2.0)
    p.close("ok")
    text = s.getvalue()
    assert "\r" in text and "soap |" in text and "3/3" in text and text.endswith("\n")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("soapp", "unknown recipe 'soapp'; did you mean 'soap'"),
        ("soap:fre=20", "has no parameter 'fre'"),
        ("soap:freq20", "expected KEY=VALUE"),
        (
            "soap:beta=0,95",
            "got '95' (the syntax is NAME[:KEY=VALUE[,KEY=VALUE...]], e.g. soap:freq=20,lr=0.01); a"
            " decimal comma? the decimal point is '.': beta=0.95",
        ),
        ("soap:", "nothing after ':'"),
        ("soap:freq=1,freq=2", "freq is set twice"),
        (
            "soap_soap:permute1=all:permute2=all",
            "overrides are separated by ',', not ':' (write soap_soap:permute1=all,permute2=all)",
        ),
        ("soap:freq=(", "error"),
    ],
)
def test_cli_bad_recipe_is_a_soap_error_not_a_traceback(tmp_path, capsys, spec, message):
    rc = main(["race", "adamw", spec, "--out", str(tmp_path / "o"), *TINY_CLI])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err
    assert "Traceback" not in err
    assert "adamw: 6 steps" not in err  # rejected before any training
    assert not (tmp_path / "o").exists()


def test_cli_bad_options(tmp_path, capsys):
    assert main(["race", "adamw", "--lr-grid", "1,x", "--out", str(tmp_path), *TINY_CLI]) == 1
    assert "--lr-grid" in capsys.readouterr().err
    assert main(["race", "adamw", "--task", "imagenet", "--out", str(tmp_path), *TINY_CLI]) == 1
    assert "unknown race task 'imagenet'" in capsys.readouterr().err
    assert main(["race", "adamw", "adamw", "--out", str(tmp_path), *TINY_CLI]) == 1
    assert "given twice" in capsys.readouterr().err


def no_training(*args, **kwargs):
    raise AssertionError("the race trained before rejecting its options")


def test_cli_out_that_cannot_be_a_directory_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("soapdsl.race.runner._train", no_training)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["race", "adamw", "--out", str(afile), *TINY_CLI]) == 1
    err = capsys.readouterr().err
    assert err == f"error: race output directory {str(afile)!r} is an existing file, not a directory\n"
    below = afile / "sub"
    assert main(["race", "adamw", "--out", str(below), *TINY_CLI]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot create race output directory {str(below)!r}: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["race.json", "losses.png"])
def test_cli_output_file_that_is_a_directory_fails_before_training(tmp_path, capsys, monkeypatch, name):
    """OUT/race.json or OUT/losses.png being a directory failed after every run had trained, with
    'cannot write ... Is a directory' naming neither file, and the table was never printed."""
    monkeypatch.setattr("soapdsl.race.runner._train", no_training)
    (tmp_path / name).mkdir()
    assert main(["race", "adamw", "--out", str(tmp_path), *TINY_CLI]) == 1
    err = capsys.readouterr().err
    assert err == f"error: race output {str(tmp_path / name)!r} is a directory, not a file\n"


def test_cli_no_plot_ignores_a_png_directory(tmp_path, capsys):
    (tmp_path / "losses.png").mkdir()
    assert main(["race", "adamw", "--no-plot", "--quiet", "--out", str(tmp_path), *TINY_CLI]) == 0
    assert (tmp_path / "race.json").is_file()


def test_cli_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """--out '' (an unset shell variable) wrote race.json and losses.png into the current directory."""
    monkeypatch.setattr("soapdsl.race.runner._train", no_training)
    monkeypatch.chdir(tmp_path)
    assert main(["race", "adamw", "--out", "", *TINY_CLI]) == 1
    assert capsys.readouterr().err.startswith("error: race output directory is empty")
    assert list(tmp_path.iterdir()) == []


def test_out_is_created_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("soapdsl.race.runner._train", no_training)
    with pytest.raises(AssertionError):
        tiny_race(["adamw"], out=tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--threads", "-3"], "race threads must be a positive integer or 0 (torch's default, at most 8), got -3"),
        (["--eval-every", "-1"], "race eval_every must be a positive integer or 0 (every steps // 10), got -1"),
        (["--lr-grid", "-1,0"], "--lr-grid multipliers must be positive finite numbers, got '-1'"),
        (["--lr-grid", "-.5"], "--lr-grid multipliers must be positive finite numbers, got '-.5'"),
    ],
)
def test_cli_negative_options_reach_their_check(tmp_path, capsys, option, message):
    assert main(["race", "adamw", "--out", str(tmp_path), *TINY_CLI, *option]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


# -- recipe specs -----------------------------------------------------------------------------


def test_parse_spec_overrides():
    s = parse_spec("soap:freq=20,lr=0.01")
    assert (s.recipe, s.overrides) == ("soap", {"freq": 20, "lr": 0.01})
    s = parse_spec("muon:adjust_lr=match_rms_adamw,nesterov=false,lr=3e-4, weight_decay = -1")
    assert s.overrides == {"adjust_lr": "match_rms_adamw", "nesterov": False, "lr": 3e-4, "weight_decay": -1}
    assert parse_spec("x:betas=(0.9, 0.95),lr=1").overrides == {"betas": (0.9, 0.95), "lr": 1}
    assert parse_spec("adamw").overrides == {}
    s = parse_spec("recipes/soap.soap::soap:freq=3")
    assert (s.recipe, s.overrides) == ("recipes/soap.soap::soap", {"freq": 3})
    # inline pipelines: overrides after the last ':' when they read as KEY=VALUE
    s = parse_spec("momentum(0.9) |> sign |> lr:lr=0.01")
    assert (s.recipe, s.overrides) == ("momentum(0.9) |> sign |> lr", {"lr": 0.01})
    text = "recipe r(lr=1e-3): route default: sign |> lr"
    assert parse_spec(text).recipe == text and parse_spec(text).overrides == {}


@pytest.mark.parametrize("spec", ["soap:freq20", "soap:", "soap:=3", "soap:freq=", "soap:freq=1,freq=2", "soap:1=2"])
def test_parse_spec_errors(spec):
    with pytest.raises(SoapArgumentError):
        parse_spec(spec)


def test_overrides_separated_by_colons_are_named():
    """'soap_soap:permute1=all:permute2=all' read permute1's value as 'all:permute2=all', and
    the error was the parser's 'unexpected ':'; expected ..., ')', ...' about the ':'."""
    with pytest.raises(SoapArgumentError) as info:
        parse_spec("soap:freq=20:lr=0.01,betas=(0.9, 0.95)")
    assert info.value.message == (
        "recipe spec 'soap:freq=20:lr=0.01,betas=(0.9, 0.95)': overrides are separated by ',', not ':'"
        " (write soap:freq=20,lr=0.01,betas=(0.9, 0.95))"
    )
    with pytest.raises(SoapArgumentError) as info:  # a ':' in a quoted value: no rewrite offered
        parse_spec("x:a='p:q':b=1")
    assert info.value.message == "recipe spec 'x:a='p:q':b=1': overrides are separated by ',', not ':'"
    assert parse_spec("x:a='p:q'").overrides == {"a": "p:q"}


def test_a_bad_override_value_points_into_the_spec():
    with pytest.raises(SoapError) as info:
        parse_spec("adamw:lr=1)")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("<adamw:lr=1)>:1:11: syntax error: unexpected ')'")
    assert lines[1:3] == ["    1 | adamw:lr=1)", "      |           ^"]


def test_labels_are_unique_and_name_the_overrides():
    """A row's overrides were shown only when two rows shared a name: `psoap:p=0.5` raced
    alone was labelled `psoap`, in the table, the plot's legend and race.json alike."""
    assert [s.label for s in parse_specs(["adamw", "soap:freq=20"])] == ["adamw", "soap:freq=20"]
    assert [s.label for s in parse_specs(["soap:lr=3e-3"])] == ["soap:lr=0.003"]
    assert [s.label for s in parse_specs(["soap", "soap:freq=20", "soap:lr=0.01,freq=5"])] == [
        "soap",
        "soap:freq=20",
        "soap:lr=0.01,freq=5",
    ]
    assert [s.label for s in parse_specs(["recipes/soap.soap", "momentum(0.9) |> sign |> lr"])] == ["soap", "inline"]
    assert [s.label for s in parse_specs(["recipes/soap.soap", "soap"])] == ["soap", "soap#2"]
    with pytest.raises(SoapArgumentError, match="given twice"):
        parse_specs(["soap:freq=2", "soap: freq=2"])
    with pytest.raises(SoapArgumentError):
        parse_specs([])


def test_inline_and_path_recipes_race():
    r = tiny_race(["recipes/adamw.soap:lr=2e-3", "momentum(0.9) |> sign |> lr:lr=1e-3"])
    assert [row.label for row in r.rows] == ["adamw:lr=0.002", "inline:lr=0.001"]
    assert r.rows[0].best.lrs == {"lr": 2e-3}


def test_unknown_recipe_parameter_names_the_choices():
    with pytest.raises(SoapNameError, match="did you mean 'freq'"):
        tiny_race(["soap:frq=2"])


# -- the lr grid ------------------------------------------------------------------------------


def test_lr_grid_scales_every_lr_parameter():
    muon = library.shipped("muon")
    assert lr_params(muon, {}) == {"lr": 0.02, "adam_lr": 3e-4}
    scaled = scaled_lrs(muon, {"lr": 0.01, "momentum": 0.9}, 2.0)
    assert scaled == {"lr": 0.02, "adam_lr": 6e-4, "momentum": 0.9}
    assert scaled_lrs(muon, {"lr": 0.01}, 1.0) == {"lr": 0.01}
    assert set(lr_params(library.shipped("soap_muon"), {})) == {"lr", "embed_lr", "head_lr", "adam_lr"}
    assert parse_grid("0.5,1,2") == [0.5, 1.0, 2.0]
    assert parse_grid(None) is None
    for bad in ("", "1,,2", "0", "-1", "a", "1,1"):
        with pytest.raises(SoapArgumentError):
            parse_grid(bad)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("1,,2", "--lr-grid '1,,2' has an empty multiplier (two commas in a row): write multipliers like 0.5,1,2"),
        ("1,2,", "--lr-grid '1,2,' has an empty multiplier (a comma at an end): write multipliers like 0.5,1,2"),
        ("", "--lr-grid names no multiplier"),
        (" ", "--lr-grid names no multiplier"),
    ],
)
def test_an_empty_lr_grid_multiplier_shows_the_grid(grid, message):
    """--lr-grid 1,,2 said "expects multipliers like 0.5,1,2, got ''", without the grid it was in."""
    with pytest.raises(SoapArgumentError) as info:
        parse_grid(grid)
    assert info.value.message == message


def test_an_lr_grid_past_a_float_names_the_multiplier():
    """adamw:lr=1e10 with --lr-grid 1e300 said 'recipe arguments given: lr=inf', a value nobody gave."""
    with pytest.raises(SoapArgumentError) as info:
        tiny_race(["adamw:lr=1e10"], lr_grid="1,1e300")
    assert str(info.value) == (
        "error: --lr-grid multiplier x1e+300 takes adamw:lr=10000000000.0's lr=1e+10 past the largest float"
    )


def test_lr_grid_keeps_the_best():
    r = tiny_race(["adamw", "soap"], lr_grid=[1e-4, 1, 10])
    assert len(r.runs) == 6
    for row in r.rows:
        mine = [run for run in r.runs if run.label == row.label]
        assert [run.lr_multiplier for run in mine] == [1e-4, 1.0, 10.0]
        assert row.grid == {run.lr_multiplier: run.final_val for run in mine}
        assert row.best.final_val == min(run.final_val for run in mine)
        assert row.best.lr_multiplier != 1e-4  # a 10000x smaller lr barely moves
    adamw = r.row("adamw")
    assert [run.lr for run in r.runs if run.label == "adamw"] == pytest.approx([1e-7, 1e-3, 1e-2])
    table = r.table()
    assert f"(x{adamw.best.lr_multiplier:g})" in table and "lr grid" in table
    lines = table.splitlines()
    grid = lines[next(i for i, line in enumerate(lines) if line.startswith("lr grid")) + 1 :]
    assert [line.split(":")[0].strip() for line in grid] == ["adamw", "soap"]
    for m in ("x0.0001 ", "x1 ", "x10 "):  # one column per multiplier, aligned across recipes
        assert len({line.index(m) for line in grid}) == 1
    assert [line.count("*") for line in grid] == [1, 1]


def test_diverged_run_is_reported(tmp_path):
    r = tiny_race(["adamw", "sign |> lr:lr=1e30"], out=tmp_path)
    bad = r.rows[1].best
    assert bad.diverged and math.isnan(bad.final_val)
    assert "diverged@" in r.table()
    data = json.loads((tmp_path / "race.json").read_text())  # valid JSON: no NaN
    assert data["rows"][1]["diverged"] is True and data["rows"][1]["final_val"] is None


def test_a_first_run_that_diverged_sets_no_target(tmp_path):
    """With no final loss of the first run there is nothing to reach: every row shows '-', and
    the legend said the column counted steps to reach that run's final train loss."""
    r = tiny_race(["sign |> lr:lr=1e30", "adamw"], out=tmp_path)
    assert r.rows[0].best.diverged and all(row.steps_to_target is None for row in r.rows)
    table = r.table()
    assert "steps to target" in table and "loss reaches" not in table
    assert f"steps to: none, since {r.rows[0].label} has no final train loss to reach;" in table


def _stop_at_second_run(monkeypatch, exc):
    """Make the race's second run raise ``exc`` at its start, as a ^C or an allocation would."""
    from soapdsl.race import runner

    train, calls = runner._train, []

    def train_or_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return train(*args, **kwargs)

    monkeypatch.setattr(runner, "_train", train_or_stop)


def test_ctrl_c_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    """Ctrl-C after a run had finished lost it: no table, no race.json, minutes of training gone."""
    _stop_at_second_run(monkeypatch, KeyboardInterrupt())
    rc = main(["race", "adamw", "muon", "soap", "--quiet", "--out", str(tmp_path), *TINY_CLI])
    captured = capsys.readouterr()
    assert rc == 130 and captured.err.endswith("interrupted\n")
    lines = captured.out.splitlines()
    assert any(line.split()[:1] == ["adamw"] for line in lines)
    assert not any(line.split()[:1] in (["muon"], ["soap"]) for line in lines)
    assert "stopped after 1 of 3 runs (interrupted); not finished: muon, soap" in captured.out
    assert f"wrote {tmp_path / 'losses.png'} and {tmp_path / 'race.json'}" in captured.out
    data = json.loads((tmp_path / "race.json").read_text())
    assert data["complete"] is False and data["stopped"] == "interrupted"
    assert data["unfinished"] == ["muon", "soap"]
    assert [r["label"] for r in data["rows"]] == ["adamw"] and len(data["runs"]) == 1
    assert (tmp_path / "losses.png").is_file()


def test_an_error_in_a_later_run_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    _stop_at_second_run(monkeypatch, MemoryError())
    rc = main(["race", "adamw", "muon", "--quiet", "--no-plot", "--out", str(tmp_path), *TINY_CLI])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.startswith("error: the race does not fit in memory")
    assert "Traceback" not in captured.err
    assert any(line.split()[:1] == ["adamw"] for line in captured.out.splitlines())
    data = json.loads((tmp_path / "race.json").read_text())
    assert data["complete"] is False and data["stopped"].startswith("the race does not fit in memory")
    assert data["unfinished"] == ["muon"]


def test_a_stopped_race_carries_its_finished_runs(monkeypatch):
    _stop_at_second_run(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as info:
        tiny_race(["adamw", "muon"], lr_grid="1,2")
    partial = info.value.race_result
    assert not partial.complete and partial.unfinished == ["adamw (lr x2)", "muon (lr x1)", "muon (lr x2)"]
    assert [row.label for row in partial.rows] == ["adamw"] and partial.rows[0].grid.keys() == {1.0}
    full = tiny_race(["adamw"])
    assert full.complete and full.stopped is None and full.unfinished == []
    assert full.to_dict()["complete"] is True


def test_ctrl_c_in_the_first_run_writes_nothing(tmp_path, monkeypatch):
    from soapdsl.race import runner

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_train", stop)
    with pytest.raises(KeyboardInterrupt) as info:
        tiny_race(["adamw", "muon"], out=tmp_path)
    assert not hasattr(info.value, "race_result")
    assert list(tmp_path.iterdir()) == []


def test_errors_are_soap_errors():
    with pytest.raises(SoapError):
        tiny_race(["adamw"], steps=0)
    with pytest.raises(SoapError):
        tiny_race(["adamw"], d_model=30, n_heads=4)
    with pytest.raises(SoapError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        tiny_race(["adamw"], seed=10**23)  # overflowed torch's generator
    with pytest.raises(SoapError, match="more than 4x this machine's"):
        tiny_race(["adamw"], threads=10_000)  # ran for minutes


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--steps", str(10**20)], "race steps is 100000000000000000000, more than a tensor can count (2**63)"),
        (["--context", str(10**9)], "race context 1000000000 is longer than the data"),
        (
            ["--steps", str(10**15)],  # 32 PB of batch positions: past any machine's address space
            "the race does not fit in memory: torch could not allocate 29,802,322.4 GiB on cpu",
        ),
        (["--steps", str(2**62)], "the race does not fit in memory: torch could not allocate more than 2**63 bytes"),
    ],
)
def test_cli_sizes_past_memory_are_one_error(tmp_path, capsys, option, message):
    """--steps 1e15 printed torch's allocator traceback; 1e20 a TypeError from torch.randint;
    --context 1e9 failed allocating the model before the check that it fits the data."""
    assert main(["race", "adamw", "--out", str(tmp_path / "o"), *TINY_CLI, *option]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--device", "tpu"], "race device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:x"], "race device must be cpu, cuda or cuda:N, got 'cuda:x'"),
        (["--cuda-graphs"], "race cuda_graphs needs a CUDA device (--device cuda)"),
    ],
)
def test_cli_bad_device_options_fail_before_training(tmp_path, capsys, monkeypatch, option, message):
    monkeypatch.setattr("soapdsl.race.runner._train", no_training)
    assert main(["race", "adamw", "--out", str(tmp_path / "o"), *TINY_CLI, *option]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cuda_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SoapArgumentError, match="race device 'cuda': CUDA is not available here"):
        tiny_race(["adamw"], device="cuda")


def test_the_device_is_recorded(tmp_path):
    tiny_race(["adamw"], out=tmp_path, device="cpu")
    data = json.loads((tmp_path / "race.json").read_text())
    assert data["config"]["device"] == "cpu" and data["config"]["cuda_graphs"] is False
    assert data["task"]["device"] == "cpu" and data["task"]["cuda_graphs"] is False
    # the thread count used, where the README says to look, and how it was chosen
    assert data["task"]["threads"] == 1 and data["task"]["threads_choice"] == "given"
    assert data["config"]["threads"] == 1


def test_a_pipe_is_read_once(tmp_path):
    """A race read each recipe file two or three times (a label, the runs, the grid's notes): a pipe
    (`soapdsl race <(gen)`, /dev/stdin) was empty the second time, and was first read as recipe text."""
    import subprocess
    import sys

    argv = ["race", "/dev/stdin:lr=0.01", "--lr-grid", "1,2", "--quiet", "--no-plot", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "soapdsl", *argv, *TINY_CLI],
        input="recipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n",
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert [row["label"] for row in json.loads((tmp_path / "race.json").read_text())["rows"]] == ["stdin:lr=0.01"]


def _race_stdin(tmp_path, text, *argv):
    import subprocess
    import sys

    opts = ["--quiet", "--no-plot", "--out", str(tmp_path), *TINY_CLI]
    cmd = [sys.executable, "-m", "soapdsl", "race", *opts, *argv]
    return subprocess.run(cmd, input=text, capture_output=True, text=True)


def test_dash_races_recipe_text_on_standard_input(tmp_path):
    """`soapdsl race -` was a syntax error at the '-', though compile, check and fmt read `-`.
    The text is read once and may race twice; `--` lets `-:KEY=VALUE` through argparse."""
    proc = _race_stdin(tmp_path, "momentum(0.9) |> sign |> lr\n", "--", "-", "-:lr=0.01", "adamw")
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = json.loads((tmp_path / "race.json").read_text())["rows"]
    assert [(r["label"], r["spec"], r["lr"]) for r in rows] == [
        ("stdin", "-", 1e-3),
        ("stdin:lr=0.01", "-:lr=0.01", 0.01),
        ("adamw", "adamw", 1e-3),
    ]


def test_dash_text_is_named_by_its_recipe_and_never_read_as_a_name(tmp_path):
    proc = _race_stdin(tmp_path, "recipe mine(lr=1e-3) = momentum(0.9) |> sign |> lr\n", "-")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert [r["label"] for r in json.loads((tmp_path / "race.json").read_text())["rows"]] == ["mine"]
    # as for `compile -`: text on standard input is recipe text, so a shipped name there is not one
    proc = _race_stdin(tmp_path, "soap\n", "-")
    assert proc.returncode == 1
    assert proc.stderr.startswith("<stdin>:1:1: error: unknown operator 'soap'")


def test_dash_overrides_before_double_dash_say_how(tmp_path):
    proc = _race_stdin(tmp_path, "sign |> lr\n", "-", "-:lr=0.01")
    assert proc.returncode == 1
    assert "note: overrides of the recipe on standard input go after '--'" in proc.stderr
