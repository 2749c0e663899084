"""The race's outputs: the table, ``race.json`` and ``losses.png``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soapdsl.errors import SoapArgumentError

if TYPE_CHECKING:
    from soapdsl.race.runner import RaceResult

JSON_NAME = "race.json"
PNG_NAME = "losses.png"
JSON_VERSION = 1


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "-"


def _lr(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_table(result: RaceResult) -> str:
    """The table the CLI prints, with a legend of what each column means."""
    grid = result.config.lr_grid
    first = result.rows[0]
    target_col = f"steps to {_f(result.target)}" if math.isfinite(result.target) else "steps to target"
    head = ["recipe", "lr", "train", "val", target_col, "time", "state MiB"]
    lines: list[list[str]] = []
    for row in result.rows:
        b = row.best
        lr = _lr(b.lr)
        if grid:
            lr += f" (x{b.lr_multiplier:g})"
        if b.diverged:
            train = val = f"diverged@{b.diverged_at}"
        else:
            train, val = _f(b.final_train), _f(b.final_val)
        steps = "-" if row.steps_to_target is None else str(row.steps_to_target)
        lines.append([row.label, lr, train, val, steps, f"{b.train_s:.1f}s", f"{b.state_bytes / 2**20:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in lines]
    cfg = result.config
    out.append("")
    if not result.complete:
        n = len(result.runs)
        out.append(
            f"stopped after {n} of {n + len(result.unfinished)} runs ({result.stopped}); not finished: "
            + ", ".join(result.unfinished)
        )
    out.append(
        f"train: smoothed train loss (debiased EMA, beta {cfg.ema:g}) at step {cfg.steps}; val: loss on"
        f" {cfg.eval_batches * cfg.batch} held-out sequences (Romans..Revelation)"
    )
    # a first run that diverged (or stopped) has no final loss: no row is measured against it
    target = (
        f"first step whose smoothed train loss reaches {first.label}'s final train loss"
        if math.isfinite(result.target)
        else f"none, since {first.label} has no final train loss to reach"
    )
    out.append(
        f"steps to: {target}; time: training wall time (evaluation excluded); state: optimizer state (Plan.state_bytes)"
    )
    if grid:
        out.append(
            "lr grid: every learning-rate parameter (lr, *_lr) times "
            + ", ".join(f"x{m:g}" for m in grid)
            + "; the best final val loss wins:"
        )
        cells = [
            [f"x{m:g} {_f(v)}" + ("*" if m == row.best.lr_multiplier else " ") for m, v in row.grid.items()]
            for row in result.rows
        ]
        label_w = max(len(row.label) for row in result.rows) + 1
        cell_w = [max(len(c[i]) for c in cells if i < len(c)) for i in range(max(map(len, cells)))]
        for row, cs in zip(result.rows, cells):
            text = "  ".join(c.ljust(w) for c, w in zip(cs, cell_w))
            out.append(f"  {(row.label + ':').ljust(label_w)} {text}".rstrip())
    return "\n".join(out) + "\n"


def result_to_dict(result: RaceResult) -> dict[str, Any]:
    cfg = asdict(result.config)
    return {
        "format": "soapdsl-race",
        "version": JSON_VERSION,
        "complete": result.complete,  # false: stopped early (Ctrl-C, an error); rows hold the finished runs
        "stopped": result.stopped,
        "unfinished": result.unfinished,
        "config": cfg,
        "task": result.task,
        "target": result.target if math.isfinite(result.target) else None,
        "rows": [r.to_dict() for r in result.rows],
        "runs": [r.to_dict() for r in result.runs],
        "lr_grid": (
            {r.label: {str(m): (v if math.isfinite(v) else None) for m, v in r.grid.items()} for r in result.rows}
            if result.config.lr_grid
            else None
        ),
        "versions": result.versions,
    }


def plot_losses(result: RaceResult, path: Path) -> None:
    """Smoothed train loss and validation loss of each recipe's best run, against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = result.config
    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_train, ax_val = fig.subplots(1, 2)
    finite: list[float] = []
    for i, row in enumerate(result.rows):
        b = row.best
        color = f"C{i % 10}"
        label = row.label
        if cfg.lr_grid:
            label += f" (lr {_lr(b.lr)}, x{b.lr_multiplier:g})"
        if b.diverged:
            label += f" [diverged@{b.diverged_at}]"
        steps = range(1, len(b.train_loss) + 1)
        ax_train.plot(steps, b.train_loss, color=color, alpha=0.15, linewidth=0.6)
        ax_train.plot(steps, b.train_smooth, color=color, linewidth=1.6, label=label)
        ax_val.plot(b.val_steps, b.val_loss, color=color, marker="o", markersize=3.5, linewidth=1.6, label=label)
        finite += [v for v in b.train_smooth[len(b.train_smooth) // 10 :] if math.isfinite(v)]
        finite += [v for v in b.val_loss[1:] if math.isfinite(v)]
    if finite:  # leave out the first steps' plateau near ln(vocab), so the race is visible
        lo, hi = min(finite), max(finite)
        pad = 0.05 * (hi - lo or 1.0)
        for ax in (ax_train, ax_val):
            ax.set_ylim(lo - pad, hi + 3 * pad)
    ax_train.set_title(f"train loss (EMA {cfg.ema:g}; raw faint)")
    ax_val.set_title("validation loss (held-out books)")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/char)")
        ax.set_xlim(0, cfg.steps)
        ax.grid(True, alpha=0.3)
    ax_val.legend(loc="upper right", fontsize=9)
    m = result.task.get("model", {})
    fig.suptitle(
        f"soapdsl race: {cfg.task} (KJV)  d_model {m.get('d_model')}, {m.get('n_layers')} layers,"
        f" context {m.get('context')}, batch {cfg.batch}, {cfg.steps} steps, seed {cfg.seed}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)


def prepare_out(out: Path, plot: bool = True) -> None:
    """Create the output directory ``out``, or say why it cannot be one or cannot take the
    race's files (``race.json`` and, with ``plot``, ``losses.png``).

    The race calls this before training, so that a bad ``--out`` fails in a second, not after
    minutes of training with a traceback.
    """
    if out.exists() and not out.is_dir():
        raise SoapArgumentError(f"race output directory {str(out)!r} is an existing file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoapArgumentError(f"cannot create race output directory {str(out)!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SoapArgumentError(f"race output directory {str(out)!r} is not writable")
    for name in (JSON_NAME, PNG_NAME) if plot else (JSON_NAME,):
        if (out / name).is_dir():
            raise SoapArgumentError(f"race output {str(out / name)!r} is a directory, not a file")


def write_outputs(result: RaceResult, out: Path, plot: bool = True) -> None:
    """Write ``race.json`` and (with ``plot``) ``losses.png`` into ``out``."""
    prepare_out(out, plot)
    result.out_dir = out
    result.json_path = out / JSON_NAME
    try:
        with open(result.json_path, "w", encoding="utf-8") as f:
            json.dump(result_to_dict(result), f, indent=1)
            f.write("\n")
        if plot:
            result.png_path = out / PNG_NAME
            plot_losses(result, result.png_path)
    except OSError as e:
        where = str(e.filename) if e.filename is not None else str(out)
        raise SoapArgumentError(f"cannot write the race's results into {where!r}: {e.strerror}") from None
