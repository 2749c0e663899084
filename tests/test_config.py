"""from_config: dicts, YAML text and files, whole training configs, route overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import soapdsl
from soapdsl import (
    SoapArgumentError,
    SoapConfigError,
    SoapError,
    SoapNameError,
    SoapRecipeError,
    SoapRouteError,
    SoapShapeError,
    SoapSyntaxError,
)
from tests.conftest import batches, make_net, max_rel_err, train_step


def test_dict_yaml_text_and_path_agree(tmp_path):
    cfg = {"recipe": "adamw", "args": {"lr": 0.01, "beta1": 0.8}}
    text = "recipe: adamw\nargs: {lr: 0.01, beta1: 0.8}\n"
    path = tmp_path / "opt.yaml"
    path.write_text(text)
    opts = [soapdsl.from_config(make_net(), c) for c in (cfg, text, path, str(path))]
    for o in opts:
        assert o.param_groups[0]["lr"] == 0.01 and o.param_groups[0]["beta1"] == 0.8
    assert len({o.plan.fingerprint for o in opts}) == 1


def test_optimizer_key_of_a_training_config():
    text = "model: {width: 32}\ntrain: {steps: 10}\noptimizer:\n  recipe: adam\n  args: {lr: 0.002}\n"
    opt = soapdsl.from_config(make_net(), text)
    assert opt.plan.recipe.name == "adam" and opt.param_groups[0]["lr"] == 0.002


def test_route_override_sends_head_to_adamw_with_its_own_lr():
    text = (
        "recipe: adam\n"
        "args: {lr: 0.003}\n"
        "routes:\n"
        "  - match: ['head.*']\n"
        "    recipe: adamw\n"
        "    args: {lr: 0.0005, weight_decay: 0.1}\n"
    )
    model = make_net()
    opt = soapdsl.from_config(model, text)
    head = {id(model.head.weight), id(model.head.bias)}
    assert {id(p) for p in opt.param_groups[0]["params"]} == head
    assert opt.param_groups[0]["lr"] == 0.0005 and opt.param_groups[1]["lr"] == 0.003

    # equals torch with the same two groups
    ref_model = make_net()
    ref_head = [ref_model.head.weight, ref_model.head.bias]
    rest = [p for n, p in ref_model.named_parameters() if not n.startswith("head.")]
    ref_a = torch.optim.AdamW(ref_head, lr=0.0005, weight_decay=0.1)
    ref_b = torch.optim.Adam(rest, lr=0.003)

    class Both(torch.optim.Optimizer):
        def __init__(self):
            self.opts = (ref_a, ref_b)

        def zero_grad(self, set_to_none=True):
            for o in self.opts:
                o.zero_grad()

        def step(self, closure=None):
            for o in self.opts:
                o.step()

    both = Both()
    for batch in batches(30):
        train_step(model, opt, batch)
        train_step(ref_model, both, batch)
    assert max_rel_err(model, ref_model) < 1e-5


def test_override_where_selector_and_state_dict_identity():
    cfg = {"recipe": "adamw", "routes": [{"where": "vector", "recipe": "adam", "args": {"lr": 0.1}}]}
    a = soapdsl.from_config(make_net(), cfg)
    b = soapdsl.from_config(make_net(), {"recipe": "adamw"})
    assert a.param_groups[0]["route"] == "vector"
    assert a.plan.fingerprint != b.plan.fingerprint


def test_a_recipe_with_required_parameters_builds_from_a_config():
    """Each argument was checked on its own, as if it were the only one given, so every other
    required parameter was missing: `recipe 'r' needs argument 'beta'` with beta in args."""
    text = "recipe: 'recipe r(lr, beta) = momentum(beta) |> lr'\nargs: {lr: 0.1, beta: 0.8}\n"
    group = soapdsl.from_config(make_net(), text).param_groups[0]
    assert (group["lr"], group["beta"]) == (0.1, 0.8)
    err = config_error(text.replace(", beta: 0.8", ""), SoapArgumentError)
    assert err.message == "recipe 'r' needs argument 'beta': its header gives it no default"
    assert (err.loc.line, err.loc.col) == (1, 23)  # at beta in the header, inside the YAML string


# -- bad configs: one plain error, located -------------------------------------------------------


def config_error(cfg, cls=SoapConfigError) -> SoapError:
    with pytest.raises(SoapError) as info:
        soapdsl.from_config(torch.nn.Linear(3, 3), cfg)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfeoptimizer: adamw\n")
    assert config_error(path).message == f"config file {str(path)!r} is not UTF-8 text"


def test_a_config_file_that_is_not_utf8_points_at_the_byte(tmp_path):
    """A Latin-1 'e' in a comment on line 3 gave 'not UTF-8' and no location."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"optimizer:\r\n  recipe: adamw\r\n  args: {lr: 0.01}  # caf\xe9\r\n")
    err = config_error(path)
    assert (err.loc.file, err.loc.line, err.loc.col) == (str(path), 3, 26)
    assert err.notes == ("byte 0xe9 here is not UTF-8: save the file as UTF-8",)
    assert str(err).splitlines()[1:] == [
        "    3 |   args: {lr: 0.01}  # caf\ufffd",
        "      | " + " " * 25 + "^",
        "  note: byte 0xe9 here is not UTF-8: save the file as UTF-8",
    ]


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffrecipe: adamw\nargs: {lr: 0.01}\n".encode())
    assert soapdsl.from_config(make_net(), path).param_groups[0]["lr"] == 0.01


def test_a_directory_is_not_yaml_text(tmp_path):
    (tmp_path / "configs.yaml").mkdir()
    for cfg in (str(tmp_path), tmp_path, str(tmp_path / "configs.yaml")):
        assert config_error(cfg).message.endswith("' is a directory, not a config file")


def test_a_config_path_the_os_refuses_is_a_config_error():
    """A NUL character escaped as ValueError (embedded null byte) and a name past the file-system
    limit as OSError (File name too long), both from pathlib."""
    assert config_error("my\x00train.yaml").message == (
        "cannot read config file 'my\\x00train.yaml': a file name cannot hold a NUL character"
    )
    assert (
        config_error("c" * 300 + ".yaml").message == f"cannot read config file '{'c' * 300}.yaml': File name too long"
    )


def test_a_config_path_without_a_yaml_suffix_is_read(tmp_path):
    path = tmp_path / "optimizer.cfg"
    path.write_text("recipe: adamw\nargs: {lr: 0.02}\n")
    assert soapdsl.from_config(make_net(), str(path)).param_groups[0]["lr"] == 0.02


def test_a_duplicate_key_is_an_error_at_the_second():
    err = config_error("optimizer:\n  recipe: adamw\n  args:\n    lr: 0.1\n    lr: 0.2\n")
    assert err.message == "optimizer.args.lr: given twice (first on line 4)"
    assert (err.loc.line, err.loc.col) == (5, 5)
    err = config_error("optimizer: {recipe: adamw}\noptimizer: {recipe: adam}\n")
    assert err.message == "optimizer: given twice (first on line 1)" and err.loc.line == 2


@pytest.mark.parametrize(
    ("value", "where", "reading"),
    [
        ("010", "args.freq", "010 is octal to PyYAML (YAML 1.1), which reads 8; in decimal it is 10"),
        ("-0_20", "args.freq", "-0_20 is octal to PyYAML (YAML 1.1), which reads -16; in decimal it is -20"),
        ("[1, 010]", "args.freq.1", "010 is octal"),
        ("1:30", "args.freq", "1:30 is base 60 to PyYAML (YAML 1.1), which reads 90; YAML 1.2 reads a string"),
        ("1:30.5", "args.freq", "1:30.5 is base 60 to PyYAML (YAML 1.1), which reads 90.5"),
    ],
)
def test_a_number_only_yaml_1_1_reads_so_is_an_error_at_its_place(value, where, reading):
    """YAML 1.1 reads `010` as 8 and `1:30` as 90, where YAML 1.2 and recipe text read 10 and a
    string: a silent other number, so it is refused where it stands."""
    err = config_error(f"recipe: soap\nargs:\n  lr: 0.01\n  freq: {value}\n")
    assert err.message.startswith(f"{where}: {reading}"), err.message
    assert (err.loc.line, err.loc.col) == (4, 9 + value.find("010" if "[" in value else value))
    assert err.loc.end_col - err.loc.col == (3 if "[" in value else len(value))


def test_numbers_yaml_1_1_and_1_2_read_alike_pass_as_do_those_outside_the_optimizer():
    net = make_net()
    for value, freq in [("07", 7), ("01", 1), ("'010'", 10), ("0x10", 16), ("1_000", 1000)]:
        opt = soapdsl.from_config(net, f"recipe: soap\nargs: {{freq: {value}, max_dim: 7}}")
        assert opt.param_groups[0]["freq"] == freq, value
    # the rest of a training config is not ours to read
    text = "data: {shard: 010, time: 1:30}\noptimizer: {recipe: adamw, args: {lr: 0.1}}\n"
    assert soapdsl.from_config(net, text).param_groups[0]["lr"] == 0.1
    err = config_error("data: {shard: 010}\noptimizer: {recipe: adamw, args: {lr: 0.1, weight_decay: 00_1_0}}\n")
    assert err.message.startswith("optimizer.args.weight_decay: 00_1_0 is octal"), err.message


def test_duplicates_elsewhere_in_a_training_config_and_merge_keys_are_not_ours():
    text = "model: {width: 1, width: 2}\noptimizer: {recipe: adamw}\n"
    assert soapdsl.from_config(make_net(), text).plan.recipe.name == "adamw"
    text = "base: &b {lr: 0.1, beta1: 0.8}\noptimizer:\n  recipe: adamw\n  args:\n    <<: *b\n    lr: 0.2\n"
    group = soapdsl.from_config(make_net(), text).param_groups[0]
    assert (group["lr"], group["beta1"]) == (0.2, 0.8)


def test_an_empty_config(tmp_path):
    path = tmp_path / "empty.yaml"
    for text in ("", "# nothing here\n"):
        path.write_text(text)
        err = config_error(path)
        assert err.message == f"config file {str(path)!r} is empty (or only comments); it needs at least a 'recipe' key"
    assert "the config text is empty" in config_error("# nothing\n").message
    err = config_error("optimizer:\n")
    assert err.message == "optimizer: is empty; it needs at least a 'recipe' key" and err.loc.line == 1
    err = config_error(None)
    assert err.message == "a config is a dict, YAML text or a path to a YAML file, got NoneType"


def test_an_optimizer_one_level_down_is_pointed_at():
    """`training: {optimizer: ...}` said `recipe: is required` at the first line."""
    err = config_error("model: {d: 8}\ntraining:\n  steps: 10\n  optimizer:\n    recipe: adamw\n")
    assert err.message == (
        "the config has no 'recipe' or 'optimizer' key at its top level, where from_config looks;"
        " 'training.optimizer' is one level down: pass that part of the config, or move 'optimizer' to"
        " the top level"
    )
    assert (err.loc.line, err.loc.col) == (4, 3)
    err = config_error({"train": {"recipe": "adamw"}})
    assert "'train.recipe' is one level down" in err.message
    # nothing to point at: the schema's own message
    assert config_error("args: {lr: 1}\n").message == "recipe: is required"


@pytest.mark.parametrize(
    ("text", "hint", "where"),
    [
        # another library's schema: the unknown key is the news, not the missing recipe
        (
            "optimizer:\n  name: adamw\n  lr: 3.0e-4\n",
            "the recipe is named by the 'recipe' key (recipe: adamw)",
            (2, 3),
        ),
        ("_target_: torch.optim.AdamW\nlr: 0.1\n", "the recipe is named by the 'recipe' key (recipe: adamw)", (1, 1)),
        ("recipe: adamw\nlr: 3.0e-4\n", "recipe arguments go under 'args' (args: {lr: ...})", (2, 1)),
        ("recipe: adamw\narguments: {lr: 1}\n", "recipe arguments go under 'args'", (2, 1)),
        ("recipe: adamw\nroutess: []\n", "did you mean 'routes'?", (2, 1)),
        (
            "recipe: adamw\nroutes:\n  - match: x\n    recipe: adam\n    lr: 3\n",
            "recipe arguments go under 'args' (args: {lr: ...})",
            (5, 5),
        ),
    ],
)
def test_an_unknown_key_says_where_its_content_goes(text, hint, where):
    err = config_error(text)
    assert "unknown key (allowed: " in err.message and err.message.endswith("; " + hint), err.message
    assert (err.loc.line, err.loc.col) == where


def test_an_optimizer_given_as_a_name_is_shown_the_mapping():
    err = config_error("optimizer: adamw\n")
    assert err.message == (
        "an optimizer config is a mapping with a 'recipe' key, got str; write optimizer: {recipe: adamw}"
    )
    assert config_error("adamw\n").message.endswith("got str; write recipe: adamw")
    # not a name: nothing to suggest
    assert config_error("optimizer: [adamw]\n").message.endswith("got list")


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        (
            "recipe: adamw\nargs: [1, 2]\n",
            "args: must be a mapping of recipe parameters to values, such as {lr: 0.01}",
            (2, 1),
        ),
        (
            "recipe: adamw\nargs: 5\n",
            "args: must be a mapping of recipe parameters to values, such as {lr: 0.01}",
            (2, 1),
        ),
        (
            "recipe: 123\n",
            "recipe: must be a string: a shipped recipe name, a path to a .soap file, or recipe text",
            (1, 1),
        ),
        (
            "recipe: adamw\nroutes:\n  - match: 5\n    recipe: adam\n",
            'routes.0.match: must be a name pattern such as "embed*", or a list of them',
            (3, 5),
        ),
        (
            "recipe: adamw\nroutes:\n  - match: []\n    recipe: adam\n",
            "routes.0.match: needs at least one pattern",
            (3, 5),
        ),
        (
            "recipe: adamw\nroutes:\n  - match: ['', x]\n    recipe: adam\n",
            "routes.0.match: holds an empty pattern, which no parameter name matches",
            (3, 5),
        ),
        (
            "recipe: adamw\nroutes: {match: x, recipe: adam}\n",
            "routes: must be a list of route overrides, each a mapping with 'recipe' and 'match' or 'where'",
            (2, 1),
        ),
        ("recipe: adamw\nroutes: [5]\n", "routes.0: must be a mapping with 'recipe' and 'match' or 'where'", (2, 10)),
        (
            "recipe: adamw\nroutes:\n  - where: '  '\n    recipe: adam\n",
            'routes.0.where: is empty; it holds a selector, such as "matrix and max_dim < 4096"',
            (3, 5),
        ),
        (
            "recipe: adamw\ndistributed: 1\n",
            "distributed: must be true or false: true splits the matrix work across the ranks of a data-parallel run",
            (2, 1),
        ),
        (
            "recipe: adamw\ncuda_graphs: 'yes'\n",
            "cuda_graphs: must be true or false: true replays Newton-Schulz iterations from CUDA graphs on CUDA",
            (2, 1),
        ),
        (
            "recipe: adamw\ntorch_compile: 1\n",
            "torch_compile: must be true or false: true runs every route's pipeline through torch.compile",
            (2, 1),
        ),
    ],
)
def test_schema_errors_in_plain_words(text, message, where):
    err = config_error(text)
    assert err.message == message
    assert (err.loc.line, err.loc.col) == where
    assert "Input should" not in str(err) and "Value error" not in str(err)


TOP_KEYS = "recipe, args, routes, distributed, torch_compile, cuda_graphs, stochastic_round"
ARGS_ARE = ": args maps recipe parameter names to values, such as {lr: 0.01}"


@pytest.mark.parametrize(
    ("cfg", "message", "where"),
    [
        # "3: has the wrong type", said of the key's value
        ({"recipe": "adamw", 3: 4}, f"3: the key 3 (a number) is not a string (allowed: {TOP_KEYS})", None),
        ({"recipe": "adamw", "args": {3: 4}}, f"args.3: the key 3 (a number) is not a string{ARGS_ARE}", None),
        (
            {"recipe": "adamw", "routes": [{"match": "*", "recipe": "adam", 3: 4}]},
            "routes.0.3: the key 3 (a number) is not a string (allowed: match, where, recipe, args)",
            None,
        ),
        (
            {"recipe": "adamw", "routes": [{"match": "*", "recipe": "adam", "args": {None: 1}}]},
            f"routes.0.args.None: the key None is not a string{ARGS_ARE}",
            None,
        ),
        # YAML reads an unquoted 3, true (yes, on) or ~ as no string; the error was at the
        # enclosing mapping (line 1 for a top-level key), its path "args.1" for `true:`
        ("recipe: adamw\n3: 4\n", f"3: the key 3 (a number) is not a string (allowed: {TOP_KEYS})", (2, 1)),
        (
            "recipe: adamw\nargs:\n  lr: 1\n  true: 4\n",
            f"args.true: the key true (a boolean) is not a string{ARGS_ARE}",
            (4, 3),
        ),
        (
            "recipe: adamw\nargs: {lr: 1, yes: 4}\n",
            f"args.true: the key true (a boolean) is not a string{ARGS_ARE}",
            (2, 15),
        ),
        (
            "recipe: adamw\nroutes:\n  - where: vector\n    recipe: adam\n    5: 1\n",
            "routes.0.5: the key 5 (a number) is not a string (allowed: match, where, recipe, args)",
            (5, 5),
        ),
        (
            "optimizer:\n  recipe: adamw\n  args: {~: 1}\n",
            f"optimizer.args.null: the key null is not a string{ARGS_ARE}",
            (3, 10),
        ),
    ],
)
def test_a_key_that_is_not_a_string_is_named(cfg, message, where):
    err = config_error(cfg)
    assert err.message == message
    if where is None:
        assert err.loc is None
    else:
        assert (err.loc.line, err.loc.col) == where, str(err)


def test_keys_that_are_not_strings_outside_the_optimizer_are_not_ours():
    soapdsl.from_config(torch.nn.Linear(3, 3), "seeds: {1: 2}\noptimizer:\n  recipe: adamw\n")


def test_a_dict_config_with_args_not_a_mapping():
    err = config_error({"recipe": "adamw", "args": 5})
    assert err.message == "args: must be a mapping of recipe parameters to values, such as {lr: 0.01}"


def test_an_unknown_recipe_in_a_route_points_at_the_route():
    err = config_error("recipe: adamw\nroutes:\n  - match: '*bias'\n    recipe: adamm\n", SoapNameError)
    assert err.message.startswith("unknown recipe 'adamm'")
    # under the value, the whole name, not the key
    assert (err.loc.line, err.loc.col, err.loc.end_col) == (4, 13, 18)


def test_a_multiline_where_points_into_the_yaml():
    text = "recipe: adamw\nroutes:\n  - where: |\n      matrix and\n      ndims > 1\n    recipe: adam\n"
    err = config_error(text, SoapRouteError)
    assert err.message.startswith("unknown shape quantity 'ndims'")
    assert (err.loc.file, err.loc.line, err.loc.col, err.loc.end_col) == ("<config>", 5, 7, 16)
    assert not err.notes
    # a folded value cannot be mapped column by column: the error points at the value
    err = config_error(text.replace("|", ">"), SoapRouteError)
    assert (err.loc.file, err.loc.line, err.loc.col) == ("<config>", 3, 12)


# recipe text held in the config: (YAML, error class, line:col in the file, caret width)
INLINE_RECIPES = [
    # a literal block keeps its lines: line for line, after the block's indentation
    (
        "recipe: |\n  recipe r(lr=0.1):\n    route default:\n      momentum(0.9) |> sgn |> lr\n",
        SoapNameError,
        "4:24",
        3,
    ),
    ("recipe: |2\n    momentum(0.9) |> sgn\n", SoapNameError, "2:22", 3),
    ("optimizer:\n  recipe: |\n    momentum(0.9) |>\n", SoapSyntaxError, "3:21", 1),
    ("optimizer:\r\n  recipe: |\r\n    momentum(0.9)\r\n    |> sgn |> lr\r\n", SoapNameError, "4:8", 3),
    # a value on its key's line: column for column, after the quote
    ("recipe: momentum(0.9) |> |> lr\n", SoapSyntaxError, "1:26", 2),
    ("optimizer:\n  recipe: 'momentum(0.9) |> sgn |> lr'\n", SoapNameError, "2:29", 3),
    ('optimizer: {recipe: "momentum(0.9) |> sgn |> lr"}\n', SoapNameError, "1:39", 3),
    # an escape after the error does not move it
    ('recipe: "momentum(0.9) |> sgn |> \\u006cr"\n', SoapNameError, "1:27", 3),
    # an anchor or a tag before the value (and an alias that uses it) does not hide where it is
    ("optimizer:\n  recipe: &r 'momentum(0.9) |> sgn |> lr'\n", SoapNameError, "2:32", 3),
    ("r: &r |\n  momentum(0.9) |> sgn\noptimizer:\n  recipe: *r\n", SoapNameError, "2:20", 3),
    ("recipe: !!str momentum(0.9) |> sgn |> lr\n", SoapNameError, "1:32", 3),
    ("recipe: &r !!str |\n  momentum(0.9) |> sgn\n", SoapNameError, "2:20", 3),
    # an error found when the plan is compiled, in a route override's recipe
    (
        "recipe: adamw\nroutes:\n  - match: '*'\n    recipe: |\n      sign |> newton_schulz(5)\n",
        SoapShapeError,
        "5:15",
        13,
    ),
]


@pytest.mark.parametrize(
    ("text", "cls", "where", "width"),
    INLINE_RECIPES,
    ids=[
        "block",
        "block-indent",
        "block-end",
        "block-crlf",
        "plain",
        "quoted",
        "flow",
        "escape-after",
        "anchor",
        "alias",
        "tag",
        "anchor-tag-block",
        "override",
    ],
)
def test_an_error_in_recipe_text_points_into_the_yaml(text, cls, where, width):
    """It pointed at `<inline>:LINE:COL` of the text, with the file only in a note."""
    err = config_error(text, cls)
    assert err.loc.file == "<config>" and f"{err.loc.line}:{err.loc.col}" == where, str(err)
    assert err.loc.end_col - err.loc.col == width
    line = text.split("\n")[err.loc.line - 1].removesuffix("\r")
    assert f"{err.loc.line:>5} | {line}\n" in str(err)
    assert "<inline>" not in str(err) and not any("YAML" in n or "optimizer config" in n for n in err.notes)


def test_an_error_in_recipe_text_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: {width: 8}\noptimizer:\n  recipe: |\n    momentum(0.9) as a |> sign as a |> lr\n")
    err = config_error(path, SoapRecipeError)
    # a position quoted in the message moves too
    assert err.message == f"label 'a' is given twice in this pipeline (first at {path}:4:22)"
    assert (err.loc.file, err.loc.line, err.loc.col) == (str(path), 4, 35)
    assert str(err).splitlines()[1:] == [
        "    4 |     momentum(0.9) as a |> sign as a |> lr",
        "      |                                   ^",
    ]


def test_a_route_in_recipe_text_names_the_first_by_its_place_in_the_file():
    """'the route at line 2' counted lines of the text, not of the config file."""
    text = "optimizer:\n  recipe: |\n    recipe r(lr=0.1):\n      route vector: sign\n      route vector: lr\n"
    err = config_error(text, SoapRouteError)
    assert err.message == "route 'vector' duplicates the route at <config>:4:7; it can never match"
    assert (err.loc.line, err.loc.col) == (5, 7)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("recipe: >\n  momentum(0.9)\n  |> sgn |> lr\n", "a folded block (>), whose lines YAML joins"),
        ('recipe: "momentum(0.9) |> \\u0073gn |> lr"\n', "a quoted value that YAML rewrote (escapes, or lines joined)"),
        ("recipe: momentum(0.9)\n  |> sgn |> lr\n", "a plain value over several lines, which YAML joins"),
    ],
    ids=["folded", "escaped", "plain-over-lines"],
)
def test_recipe_text_that_yaml_rewrote_points_at_its_start_and_says_so(text, what):
    err = config_error(text, SoapNameError)
    assert (err.loc.line, err.loc.col, err.loc.end_col) == (1, 9, 10)
    assert err.notes == (
        f"recipe is {what}: the error is at line 1, column 18 of the text YAML read,"
        " 'momentum(0.9) |> sgn |> lr'; a literal block (|) keeps the lines as written, so errors point into them",
    )


def test_an_error_in_recipe_text_of_a_dict_names_the_key():
    err = config_error({"optimizer": {"recipe": "momentum(0.9) |> sgn |> lr"}}, SoapNameError)
    assert str(err.loc) == "<config>[optimizer.recipe]:1:18" and not err.notes
    assert "    1 | momentum(0.9) |> sgn |> lr\n" in str(err)


@pytest.mark.parametrize("as_dict", [False, True], ids=["yaml", "dict"])
def test_an_error_in_a_where_shows_the_selector_not_the_route_it_is_parsed_in(as_dict):
    """The selector is parsed as `route WHERE: lr` inside a recipe: from a dict, the error
    showed that text at its line 2 (`route matrix and ndims > 2: lr`), and a selector cut short
    was "unexpected ':'", a ':' the user never wrote."""
    where = ["matrix and ndims > 2", "matrix and", "matrix # hidden"]
    kinds = [SoapRouteError, SoapSyntaxError, SoapConfigError]
    if as_dict:
        cfgs = [{"recipe": "adamw", "routes": [{"where": w, "recipe": "adam"}]} for w in where]
        lines = [f"<config>[routes.0.where]:1:{col}" for col in (12, 11, 8)]
        shown = where
    else:
        cfgs = [f"recipe: adamw\nroutes:\n  - where: '{w}'\n    recipe: adam\n" for w in where]
        lines = [f"<config>:3:{col}" for col in (24, 23, 20)]
        shown = [f"  - where: '{w}'" for w in where]
    errors = [config_error(cfg, kind) for cfg, kind in zip(cfgs, kinds, strict=True)]
    assert [str(e.loc) for e in errors] == lines
    assert [str(e).splitlines()[1].split(" | ", 1)[1] for e in errors] == shown
    assert errors[1].message == "unexpected end of text; expected '(', 'not', a name, a string"
    if not as_dict:  # in a literal block, at the end of its text, not on the line after it
        block = "recipe: adamw\nroutes:\n  - where: |\n      matrix and\n    recipe: adam\n"
        err = config_error(block, SoapSyntaxError)
        assert (str(err.loc), err.message, err.notes) == ("<config>:4:17", errors[1].message, ())


def test_a_comment_in_a_where_is_refused_at_the_comment():
    """The selector is parsed inside a synthetic route, `route WHERE: lr`: a comment ran over its
    ':', and the error asked for a ':' (or ',', '[', ...) the user never wrote."""
    err = config_error("recipe: adamw\nroutes:\n  - where: 'matrix # hidden ones'\n    recipe: adam\n")
    assert err.message == "routes.0.where: a selector cannot hold a comment ('#' starts one): leave out '# hidden ones'"
    assert (err.loc.line, err.loc.col, err.loc.end_col) == (3, 20, 33)


def test_a_where_compares_with_the_route_recipes_parameters():
    """A `where:` comparison may name a parameter of its route's recipe, with the route's args,
    as a route in a recipe file names its recipe's: only `lr` was known, and `max_dim <= max_dim`
    was 'unknown name max_dim' of a recipe that has one."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 300))
    cfg = {
        "recipe": "adamw",
        "routes": [{"where": "matrix and max_dim <= max_dim", "recipe": "soap", "args": {"max_dim": 100}}],
    }
    opt = soapdsl.from_config(model, cfg)
    taken = {tuple(p.shape) for g in opt.param_groups if g["route"] != "default" for p in g["params"]}
    assert taken == {(3, 4)}
    cfg["routes"][0]["where"] = "matrix and max_dim <= nope"
    with pytest.raises(SoapNameError, match="unknown name 'nope'") as info:
        soapdsl.from_config(model, cfg)
    assert (info.value.loc.line, info.value.loc.col) == (1, 23)


@pytest.mark.parametrize(
    "where",
    ["matrix [lr=0.5]", "matrix: sign\n  route vector", "matrix: sign |> lr\n  route vector"],
    ids=["settings", "second_route", "pipeline"],
)
def test_a_where_holds_a_selector_only(where):
    """Text after the selector parsed inside the synthetic route and was dropped: `[lr=0.5]`
    silently left the route at the recipe's lr."""
    cfg = {"recipe": "adamw", "routes": [{"where": where, "recipe": "adam"}]}
    with pytest.raises(SoapConfigError, match=r"routes\.0\.where: holds a selector only.*'args'"):
        soapdsl.from_config(torch.nn.Linear(4, 3), cfg)


def test_distributed_key_builds_as_build_does():
    """``distributed: true`` is build(..., distributed=True), which needs torch.distributed
    initialised (tests/test_distributed.py runs it on two ranks); false is the default."""
    assert soapdsl.from_config(torch.nn.Linear(2, 2), "recipe: adamw\ndistributed: false")._split is None
    with pytest.raises(SoapArgumentError, match=r"needs torch\.distributed initialised first"):
        soapdsl.from_config(torch.nn.Linear(2, 2), "recipe: adamw\ndistributed: true")


def test_torch_compile_and_cuda_graphs_keys_mark_routes_as_build_does():
    model = torch.nn.Linear(4, 4)
    graphed = soapdsl.from_config(model, "optimizer:\n  recipe: muon\n  cuda_graphs: true\n")
    assert all(rp.options == {"cuda_graph": True} for rp in graphed.plan.routes)
    assert sorted(graphed._graphs) == [rp.index for rp in graphed._routes]
    compiled = soapdsl.from_config(model, {"recipe": "adamw", "torch_compile": True})
    assert all(rp.options == {"compile": True} for rp in compiled.plan.routes)
    plain = soapdsl.from_config(model, "recipe: muon\ncuda_graphs: false\ntorch_compile: false\n")
    assert all(rp.options == {} for rp in plain.plan.routes) and not plain._graphs


def test_torch_compile_with_cuda_graphs_is_refused_at_the_key():
    err = config_error("optimizer:\n  recipe: muon\n  torch_compile: true\n  cuda_graphs: true\n")
    assert "torch_compile=True and cuda_graphs=True: choose one" in err.message
    assert (err.loc.line, err.loc.col) == (4, 3)
    text = "recipe: 'recipe r(lr=0.1):\n  route default [compile=true]: sign |> lr'\ncuda_graphs: true\n"
    err = config_error(text)
    assert "route 'default' would run under torch.compile" in err.message
    assert (err.loc.line, err.loc.col) == (3, 1)


def test_an_override_that_takes_no_parameter_is_warned_of():
    """A misspelt match left the parameters with the main recipe without a word."""
    text = "recipe: adamw\nroutes:\n  - match: '*bais'\n    recipe: adam\n  - match: bias\n    recipe: adam\n"
    with pytest.warns(UserWarning) as record:
        opt = soapdsl.from_config(torch.nn.Linear(3, 3), text)
    assert [str(w.message) for w in record] == [
        "<config>:3:5: routes.0 (\"*bais\") takes no parameter of the model, so its recipe 'adam' steps"
        " nothing: check its match and where"
    ]
    assert record[0].filename == __file__  # the caller's line, not soapdsl's
    assert [g["route"] for g in opt.param_groups] == ['"bias"', "default"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soapdsl.from_config(torch.nn.Linear(3, 3), {"recipe": "adamw", "routes": [{"match": "bias", "recipe": "adam"}]})


def test_a_recipe_file_beside_the_config_is_named_when_not_found(tmp_path, monkeypatch):
    """Paths in a config are relative to the working directory; `recipe: my.soap` next to the
    config, read from elsewhere, said only that my.soap does not exist."""
    sub = tmp_path / "runs"
    sub.mkdir()
    (sub / "my.soap").write_text("recipe my(lr=1e-3) = momentum(0.9) |> sign\n")
    (sub / "train.yaml").write_text("optimizer:\n  recipe: my.soap\n")
    monkeypatch.chdir(tmp_path)
    err = config_error("runs/train.yaml", SoapNameError)
    assert err.message == "cannot read recipe file 'my.soap': No such file or directory"
    assert err.notes[-1] == (
        "a path in a config is relative to the working directory, not to the config; the file beside"
        f" the config is '{Path('runs') / 'my.soap'}'"
    )
    monkeypatch.chdir(sub)
    assert soapdsl.from_config(torch.nn.Linear(3, 3), "train.yaml").plan.recipe.name == "my"


def test_a_recipe_path_too_long_in_a_config_file_is_a_name_error(tmp_path):
    """Looking for the recipe file beside the config, for the note above, escaped as OSError
    (File name too long) from pathlib's is_file() where the recipe's path is too long a name."""
    (tmp_path / "train.yaml").write_text("recipe: " + "r" * 300 + ".soap\n")
    err = config_error(tmp_path / "train.yaml", SoapNameError)
    assert err.message == f"cannot read recipe file '{'r' * 300}.soap': File name too long"
