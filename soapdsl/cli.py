"""The soapdsl command line: compile, check, list, fmt, race.

soapdsl compile soap --set freq=40 --shapes "w=1024x256,b=256" --format json
soapdsl check my_recipe.soap other.soap
soapdsl list
soapdsl fmt my_recipe.soap          (--check, --diff, -w)
soapdsl race adamw soap:freq=20 --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from soapdsl import __version__, fmt
from soapdsl.errors import SoapArgumentError, SoapError, SoapWarning
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import decode_source, parse, parse_file

# torch and what needs it (the operators, the compiler) are imported by the commands that use
# them, inside main(): `soapdsl --help` and a bad command line answer without the seconds that
# importing torch takes, and a ^C during that import is an interruption like any other
if TYPE_CHECKING:
    import torch

#: parameter shapes `soapdsl compile` uses when none are given: a small GPT-like model
EXAMPLE_SHAPES = (
    "embed.weight=4096x256,"
    "blocks.0.attn.qkv.weight=768x256,blocks.0.attn.proj.weight=256x256,"
    "blocks.0.mlp.fc.weight=1024x256,blocks.0.mlp.proj.weight=256x1024,"
    "blocks.0.norm1.weight=256,blocks.0.norm2.weight=256,"
    "norm.weight=256,head.weight=4096x256"
)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``k=v`` pairs; values are soapdsl literals (numbers, true/false, names, tuples)."""
    from soapdsl.check import literal

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SoapArgumentError(f"--set expects KEY=VALUE, got {item!r}")
        if key in out:  # as a config's or a race override's repeated key is
            raise SoapArgumentError(f"--set {key} is given twice: give each parameter once")
        col = len(item.partition("=")[0]) + 2  # where the value starts in the item as typed
        out[key] = literal(text, f"<--set {key}>", item, col, f"--set {key}")
    return out


#: one dimension of --shapes
_DIM = re.compile(r"\s*[0-9]+\s*")


def parse_shapes(text: str) -> list[tuple[str, torch.Tensor]]:
    """``name=MxN,name2=K,s=`` -> meta tensors (no memory is allocated); ``s=`` is 0-d."""
    import torch

    out = []
    seen: set[str] = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, dims = item.partition("=")
        name = name.strip()
        parts = dims.lower().split("x") if dims.strip() else []
        # ASCII digits, as recipe text writes numbers (int() takes full-width ones too)
        shape = [int(d) for d in parts] if all(_DIM.fullmatch(d) for d in parts) else None
        if not sep or not name or shape is None:
            raise SoapArgumentError(f"--shapes expects NAME=MxN[,NAME=K...], got {item!r}")
        if name in seen:
            # a model cannot hold two parameters of one name; the second would shadow the first
            raise SoapArgumentError(f"--shapes names parameter '{name}' twice")
        seen.add(name)
        try:
            out.append((name, torch.empty(shape, device="meta")))
        except (RuntimeError, TypeError, OverflowError):  # past what a tensor can hold
            raise SoapArgumentError(
                f"--shapes: parameter '{name}' of shape {dims.strip()} has more elements than a tensor can hold"
            ) from None
    if not out:
        raise SoapArgumentError("--shapes names no parameter")
    return out


#: the FILE or RECIPE that stands for standard input, as in most command-line tools
STDIN = "-"


def read_stdin() -> str:
    """The text on standard input (``soapdsl fmt -``, an editor piping a buffer through)."""
    if sys.stdin is None:
        raise SoapArgumentError("'-' reads standard input, which this process does not have")
    try:
        raw = sys.stdin.buffer.read()
    except OSError as e:
        raise SoapArgumentError(f"cannot read standard input: {e.strerror}") from None
    return decode_source(raw, "<stdin>", "the text on standard input")


def read_module(path: str) -> tuple[A.Module, str]:
    """The module in ``path`` (``-``: on standard input) and the name its errors point at."""
    if path == STDIN:
        return parse(read_stdin(), "<stdin>"), "<stdin>"
    return parse_file(path), path


def refuse_stdin_twice(prog: str, files: Sequence[str]) -> None:
    """The first '-' would read all of standard input and a second find it empty (`soapdsl check
    - -` checked the text, then said the empty source after it was ok)."""
    if list(files).count(STDIN) > 1:
        raise bad_command_line(prog, "'-' is given more than once: standard input can be read only once")


def cmd_compile(ns: argparse.Namespace) -> int:
    from soapdsl import library
    from soapdsl.compiler import compile_plan

    args = parse_set(ns.set or [])
    if ns.recipe == STDIN:  # recipe text, as if given inline (never a name or a path)
        recipe = library.from_text(read_stdin(), args, "<stdin>")
    else:
        recipe = library.resolve(ns.recipe, args)
    shapes = parse_shapes(EXAMPLE_SHAPES if ns.shapes is None else ns.shapes)
    plan = compile_plan(recipe, shapes, args)
    if ns.format == "json":
        out = plan.to_dict()
        out["example_shapes"] = ns.shapes is None
        print(json.dumps(out, indent=2))
    else:
        text = plan.to_text()
        if ns.shapes is None:
            text += "(parameter shapes: a small GPT-like example; pass --shapes NAME=MxN,... for yours)\n"
        sys.stdout.write(text)
    return 0


def cmd_check(ns: argparse.Namespace) -> int:
    refuse_stdin_twice("soapdsl check", ns.files)
    from soapdsl import library

    bad = 0
    for path in ns.files:
        try:
            module, path = read_module(path)
            recipes, _ = library.check_source(module)
        except SoapError as e:
            print(e.format(), file=sys.stderr)
            bad += 1
            continue
        what = [f"recipe {r.name}" for r in recipes] + [f"macro {m.name}" for m in module.macros]
        if module.pipeline is not None:
            what.append("a pipeline")
        print(f"{path}: ok ({', '.join(what) or 'empty'})")
    return 1 if bad else 0


def cmd_list(ns: argparse.Namespace) -> int:
    from soapdsl import library, registry
    from soapdsl.check import constant

    ops = registry.all_ops()
    width = max(len(n) for n in ops)
    print("operators:")
    for name, cls in ops.items():
        print(f"  {name:<{width}}  {cls.summary()}")
    lib = library.library()
    print("\nrecipes:")
    for name in library.shipped_names():
        r = library.shipped(name)
        params = ", ".join(f"{k}={library.ir.const_text(v)}" for k, v in r.params)
        doc = r.doc.splitlines()[0] if r.doc else ""
        print(f"  {name}({params})")
        if doc:
            print(f"      {doc}")
    print("\nmacros (prelude):")
    for name, m in sorted(lib.macros.macros.items()):
        # defaults as a recipe's are shown (0.9, 1e-08); a required parameter bare
        params = ", ".join(
            p.name if p.default is None else f"{p.name}={library.ir.const_text(constant(p.default))}" for p in m.params
        )
        print(f"  {name}({params})")
    return 0


def cmd_fmt(ns: argparse.Namespace) -> int:
    if ns.mode == fmt.WRITE and STDIN in ns.files:
        raise bad_command_line("soapdsl fmt", "--write cannot rewrite standard input ('-'): leave out --write")
    refuse_stdin_twice("soapdsl fmt", ns.files)
    return fmt.run(ns.files, ns.mode or fmt.PRINT, read_stdin, STDIN)


def cmd_race(ns: argparse.Namespace) -> int:
    from soapdsl.race import run_race
    from soapdsl.race.spec import STDIN_FILE, parse_spec

    specs = [parse_spec(t) for t in ns.recipes]
    if any(s.recipe.strip() == STDIN for s in specs):
        text = read_stdin()  # once: `race - -:lr=0.01` races the same text twice
        specs = [s.with_text(text, STDIN_FILE) if s.recipe.strip() == STDIN else s for s in specs]
    try:
        result = run_race(
            specs,
            task=ns.task,
            steps=ns.steps,
            batch=ns.batch,
            lr_grid=ns.lr_grid,
            seed=ns.seed,
            out=ns.out,
            context=ns.context,
            d_model=ns.d_model,
            n_layers=ns.layers,
            n_heads=ns.heads,
            eval_every=ns.eval_every,
            eval_batches=ns.eval_batches,
            threads=ns.threads,
            device=ns.device,
            cuda_graphs=ns.cuda_graphs,
            progress=not ns.quiet,
            plot=not ns.no_plot,
        )
    except BaseException as e:
        partial = getattr(e, "race_result", None)
        if partial is not None:  # the runs that finished before ^C or an error: shown and written
            _show_race(partial)
        raise
    _show_race(result)
    return 0


def _show_race(result: Any) -> None:
    sys.stdout.write("\n" + result.table())
    written = [str(p) for p in (result.png_path, result.json_path) if p is not None]
    if written:
        print(f"\nwrote {' and '.join(written)}")
    sys.stdout.flush()


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line is one ``error:`` line with a note on where the
    options are listed, and status 1, as every other bad input is (not usage text and status 2)."""

    def error(self, message: str) -> NoReturn:
        raise bad_command_line(self.prog, message)


def bad_command_line(prog: str, message: str) -> SoapArgumentError:
    return SoapArgumentError(message, notes=(f"see '{prog} --help'",))


def make_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: --thr for --threads would break, or change meaning, in a
    # script the day an option starting --thr is added
    p = _Parser(prog="soapdsl", description="Compose PyTorch optimizers from recipes.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"soapdsl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", allow_abbrev=False, help="show what a recipe becomes: pipelines, routing, state")
    c.add_argument(
        "recipe",
        metavar="RECIPE",
        help="shipped name, path to a .soap file (FILE.soap::NAME picks one), inline text, or - for recipe"
        " text on standard input",
    )
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="set a recipe parameter (repeatable)")
    c.add_argument(
        "--shapes",
        metavar="NAME=MxN,...",
        help="parameter shapes; NAME= is a 0-d (scalar) parameter (default: a small GPT-like model)",
    )
    c.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    c.set_defaults(func=cmd_compile)

    k = sub.add_parser("check", allow_abbrev=False, help="check .soap files; errors on stderr, exit 1 if any is bad")
    k.add_argument("files", nargs="+", metavar="FILE", help=".soap files to check (- reads standard input)")
    k.set_defaults(func=cmd_check)

    s = sub.add_parser("list", allow_abbrev=False, help="operators and shipped recipes")
    s.set_defaults(func=cmd_list)

    f = sub.add_parser(
        "fmt",
        allow_abbrev=False,
        help="print .soap files in canonical form, or check, diff or rewrite them",
        description="Print each FILE in canonical form on stdout (the files are left as they are), or, with"
        " an option, check, diff or rewrite them. A file that cannot be read, parsed or checked has its"
        " error printed on stderr and the next file is taken; the status is then 1.",
    )
    f.add_argument("files", nargs="+", metavar="FILE", help=".soap files (- reads standard input)")
    how = f.add_mutually_exclusive_group()
    how.add_argument(
        "--check",
        dest="mode",
        action="store_const",
        const=fmt.CHECK,
        help="print the name of each file that is not in canonical form, and nothing else; exit 1 if any",
    )
    how.add_argument(
        "--diff",
        dest="mode",
        action="store_const",
        const=fmt.DIFF,
        help="print a unified diff of what formatting would change; exit 1 if it would change a file",
    )
    how.add_argument(
        "-w",
        "--write",
        dest="mode",
        action="store_const",
        const=fmt.WRITE,
        help="rewrite each file that is not in canonical form, in place, and print its name",
    )
    f.set_defaults(func=cmd_fmt)  # no option: mode None, print

    from soapdsl.race import defaults as race

    r = sub.add_parser(
        "race",
        allow_abbrev=False,
        help="train a small model with each recipe; print a table, write a loss plot and JSON",
        description="Train a small character-level transformer on the bundled King James Bible with each"
        " recipe, from the same initialisation and on the same batches, then print a table and write"
        " OUT/losses.png and OUT/race.json.",
    )
    r.add_argument(
        "recipes",
        nargs="+",
        metavar="RECIPE",
        help="shipped name, .soap path or inline pipeline, with optional overrides NAME:KEY=VALUE[,KEY=VALUE...]"
        " (e.g. soap:freq=20,lr=0.01); - is recipe text on standard input (-:KEY=VALUE after --)",
    )
    r.add_argument(
        "--task", default="charlm", help="what to train (default %(default)s: a char transformer on the KJV Bible)"
    )
    r.add_argument("--steps", type=int, default=race.DEFAULT_STEPS, help="training steps per run (default %(default)s)")
    r.add_argument("--batch", type=int, default=race.DEFAULT_BATCH, help="sequences per step (default %(default)s)")
    r.add_argument(
        "--lr-grid",
        metavar="M1,M2,...",
        help="learning-rate multipliers (e.g. 0.5,1,2): each recipe runs once per multiplier, every"
        " lr parameter (lr, *_lr) scaled, and keeps its best final validation loss (default: one run"
        " at each recipe's own lr)",
    )
    r.add_argument("--seed", type=int, default=0, help="initialisation and data order (default %(default)s)")
    r.add_argument(
        "--out", default="race_out", metavar="DIR", help="where to write losses.png and race.json (default %(default)s)"
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--no-plot", action="store_true", help="write race.json only, no losses.png")
    r.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads; 0 (the default) takes torch's default, at most 8, or 1 when the machine is busy",
    )
    r.add_argument("--device", default="cpu", help="where to train: cpu (the default), cuda or cuda:N")
    r.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="build every optimizer with cuda_graphs=True (Newton-Schulz replayed from CUDA graphs; same numbers)",
    )
    # model and evaluation size (docs/recipes.md's GPU race is 7.5x the default model)
    m = r.add_argument_group("model and evaluation")
    for flag, default, metavar, what in (
        ("--context", race.DEFAULT_CONTEXT, "T", "characters per sequence"),
        ("--d-model", race.DEFAULT_D_MODEL, "D", "transformer width"),
        ("--layers", race.DEFAULT_LAYERS, "L", "transformer blocks"),
        ("--heads", race.DEFAULT_HEADS, "H", "attention heads, a divisor of --d-model"),
        ("--eval-batches", race.DEFAULT_EVAL_BATCHES, "N", "validation batches of --batch held-out sequences each"),
    ):
        m.add_argument(flag, type=int, default=default, metavar=metavar, help=f"{what} (default %(default)s)")
    m.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="validation loss every N steps; 0 (the default) is every steps // 10, and at the end",
    )
    r.set_defaults(func=cmd_race)
    return p


#: options whose value may start with '-' (argparse reads "-1,0" as an unknown option and says
#: "expected one argument"; joined as "--lr-grid=-1,0" the value reaches the real check)
_NEGATIVE_OK = ("--lr-grid",)


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + list(argv[i:])
        if (
            argv[i] in _NEGATIVE_OK
            and i + 1 < len(argv)
            and argv[i + 1][:1] == "-"
            and argv[i + 1][1:2] in "0123456789."
        ):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _show_soap_warnings(previous: Any) -> Any:
    """A ``warnings.showwarning`` that prints a SoapWarning as an error prints (its own location
    and caret, no Python file and line of soapdsl's) and passes any other warning to ``previous``."""

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if not isinstance(message, SoapWarning):
            return previous(message, category, filename, lineno, file, line)
        try:
            print(message.format(), file=sys.stderr if file is None else file)
        except OSError:  # stderr is gone: a warning is not worth a traceback
            pass

    return show


def interrupted() -> None:
    """Say that Ctrl-C stopped the command (a race, mostly): one line, no traceback from inside
    torch. On a terminal the line starts below the progress bar that ^C interrupted."""
    try:
        print("\ninterrupted" if sys.stderr.isatty() else "interrupted", file=sys.stderr)
    except (OSError, ValueError):  # stderr is gone
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns, extra = make_parser().parse_known_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
        if extra:  # said by the command's parser, whose --help lists the options that exist
            err = bad_command_line(f"soapdsl {ns.command}", f"unrecognized arguments: {' '.join(extra)}")
            if ns.command == "race" and any(e.startswith(f"{STDIN}:") for e in extra):
                # `-:lr=3e-3` reads as an option to argparse, as any word that starts with '-'
                err.notes = (
                    "overrides of the recipe on standard input go after '--', which ends the options:"
                    " soapdsl race --steps 100 -- - -:lr=3e-3",
                    *err.notes,
                )
                err.args = (err.format(),)
            raise err
        with warnings.catch_warnings():
            warnings.showwarning = _show_soap_warnings(warnings.showwarning)
            code = int(ns.func(ns))
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return code
    except (SoapError, SoapWarning) as e:  # a warning made an error (python -W error) prints as one
        print(e.format(), file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader stopped early (`soapdsl list | head`): nothing is wrong with the input, so no
        # traceback; stdout goes to devnull, or the interpreter's last flush would raise again.
        # The status is a shell's for a program that SIGPIPE ended (`yes | head` under pipefail):
        # scripts that allow for one allow for the other, and 1 read as bad input
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE (13)
    except OSError as e:
        if e.filename is not None:  # a file's: every file soapdsl opens says so as a SoapError
            raise
        # writing the output failed (a full disk, `> /dev/full`): one line, as for bad input
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted()
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
