"""The race: train the same model on the same data with several recipes and compare.

Every run starts from the same initial weights (drawn once from ``seed``) and sees the same
batches in the same order (their positions are drawn once, before the first run). Train loss is
recorded at every step; validation loss on a fixed set of held-out sequences every
``eval_every`` steps and at the end.
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from soapdsl import ir
from soapdsl.compiler import compile_plan, mark_routes
from soapdsl.errors import SoapArgumentError, SoapError
from soapdsl.race.data import Corpus, load_charlm
from soapdsl.race.defaults import (
    DEFAULT_BATCH,
    DEFAULT_CONTEXT,
    DEFAULT_D_MODEL,
    DEFAULT_EVAL_BATCHES,
    DEFAULT_HEADS,
    DEFAULT_LAYERS,
    DEFAULT_STEPS,
    MAX_THREADS,
    TASKS,
)
from soapdsl.race.model import CharTransformer, ModelConfig
from soapdsl.race.progress import Progress
from soapdsl.race.spec import RecipeSpec, lr_params, parse_grid, parse_specs, scaled_lrs
from soapdsl.runtime.optimizer import SoapOptimizer

#: EMA factor of the smoothed train loss (debiased); "steps to target" and the plot use it
EMA_BETA = 0.9


@dataclass
class RaceConfig:
    task: str = "charlm"
    steps: int = DEFAULT_STEPS
    batch: int = DEFAULT_BATCH
    context: int = DEFAULT_CONTEXT
    d_model: int = DEFAULT_D_MODEL
    n_layers: int = DEFAULT_LAYERS
    n_heads: int = DEFAULT_HEADS
    eval_every: int = 0  # 0: steps // 10
    eval_batches: int = DEFAULT_EVAL_BATCHES
    lr_grid: list[float] | None = None
    seed: int = 0
    ema: float = EMA_BETA
    threads: int = 0  # 0: min(torch's default, MAX_THREADS)
    device: str = "cpu"  # where the model, data and optimizer state live ("cuda", "cuda:1", ...)
    cuda_graphs: bool = False  # build(cuda_graphs=True): Newton-Schulz replayed from CUDA graphs

    def validate(self) -> None:
        if self.task not in TASKS:
            raise SoapArgumentError(f"unknown race task '{self.task}' (tasks: {', '.join(TASKS)})")
        for name in ("steps", "batch", "context", "d_model", "n_layers", "n_heads", "eval_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SoapArgumentError(f"race {name} must be a positive integer, got {v!r}")
            if v >= 2**63:  # torch.randint((steps, batch)) raised a TypeError from C++
                raise SoapArgumentError(f"race {name} is {v}, more than a tensor can count (2**63)")
        for name, zero in (("eval_every", "every steps // 10"), ("threads", f"torch's default, at most {MAX_THREADS}")):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SoapArgumentError(f"race {name} must be a positive integer or 0 ({zero}), got {v!r}")
        cores = os.cpu_count() or 1
        if self.threads > 4 * cores:
            raise SoapArgumentError(
                f"race threads {self.threads} is more than 4x this machine's {cores} cores: each step would"
                " spend its time switching threads (0 takes torch's default, at most"
                f" {MAX_THREADS})"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise SoapArgumentError(f"race seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.d_model % self.n_heads:
            raise SoapArgumentError(f"race d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0 <= self.ema < 1:
            raise SoapArgumentError(f"race ema must be in [0, 1), got {self.ema}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise SoapArgumentError(f"race device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise SoapArgumentError(f"race device must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SoapArgumentError(f"race device {self.device!r}: CUDA is not available here")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise SoapArgumentError(
                    f"race device {self.device!r}: there are {torch.cuda.device_count()} CUDA devices"
                )
        if not isinstance(self.cuda_graphs, bool):
            raise SoapArgumentError(f"race cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.cuda_graphs and device.type != "cuda":
            raise SoapArgumentError("race cuda_graphs needs a CUDA device (--device cuda): off CUDA it changes nothing")

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)


@dataclass
class RunResult:
    """One training run: a recipe at one learning-rate multiplier."""

    label: str
    spec: str
    recipe: str
    lr_multiplier: float
    lrs: dict[str, float]  # every learning-rate parameter of the run
    args: dict[str, Any]  # the recipe arguments given (overrides, scaled lrs)
    train_loss: list[float]  # raw, one per step (a diverged run stops early)
    train_smooth: list[float]  # debiased EMA of train_loss
    val_steps: list[int]
    val_loss: list[float]
    train_s: float  # optimizer + forward/backward time, evaluation excluded
    eval_s: float
    state_bytes: int  # Plan.state_bytes(): what the recipe's state takes
    measured_state_bytes: int  # the tensors in optimizer.state after the run
    diverged_at: int | None = None  # the step whose loss was not finite

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def final_train(self) -> float:
        return self.train_smooth[-1] if self.train_smooth and not self.diverged else math.nan

    @property
    def final_val(self) -> float:
        return self.val_loss[-1] if self.val_loss and not self.diverged else math.nan

    @property
    def lr(self) -> float | None:
        return self.lrs.get("lr")

    def steps_to(self, target: float) -> int | None:
        """First step (1-based) whose smoothed train loss is at or below ``target``."""
        if not math.isfinite(target):
            return None
        for i, v in enumerate(self.train_smooth):
            if v <= target:
                return i + 1
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            diverged=self.diverged,
            final_train=_num(self.final_train),
            final_val=_num(self.final_val),
            train_loss=[_num(x) for x in self.train_loss],
            train_smooth=[_num(x) for x in self.train_smooth],
            val_loss=[_num(x) for x in self.val_loss],
        )
        return d


@dataclass
class Row:
    """One line of the race's table: a recipe's best run."""

    label: str
    best: RunResult
    grid: dict[float, float] = field(default_factory=dict)  # lr multiplier -> final val loss
    steps_to_target: int | None = None

    def to_dict(self) -> dict[str, Any]:
        b = self.best
        return {
            "label": self.label,
            "spec": b.spec,
            "recipe": b.recipe,
            "lr": b.lr,
            "lrs": b.lrs,
            "lr_multiplier": b.lr_multiplier,
            "final_train": _num(b.final_train),
            "final_val": _num(b.final_val),
            "steps_to_target": self.steps_to_target,
            "train_s": b.train_s,
            "state_mib": b.state_bytes / 2**20,
            "diverged": b.diverged,
            "grid": {str(k): _num(v) for k, v in self.grid.items()},
        }


@dataclass
class RaceResult:
    config: RaceConfig
    task: dict[str, Any]
    rows: list[Row]
    runs: list[RunResult]
    target: float  # the first recipe's final smoothed train loss
    versions: dict[str, str]
    out_dir: Path | None = None
    json_path: Path | None = None
    png_path: Path | None = None
    #: why the race stopped before its last run (``interrupted``, an error's message); None when
    #: every run finished
    stopped: str | None = None
    unfinished: list[str] = field(default_factory=list)  # the runs it never finished, as their bars name them

    @property
    def complete(self) -> bool:
        return self.stopped is None

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    def table(self) -> str:
        from soapdsl.race.report import format_table

        return format_table(self)

    def to_dict(self) -> dict[str, Any]:
        from soapdsl.race.report import result_to_dict

        return result_to_dict(self)


def _num(x: float) -> float | None:
    """JSON has no NaN: a missing or diverged value is null."""
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def versions() -> dict[str, str]:
    import soapdsl

    out = {"soapdsl": soapdsl.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover
        pass
    out["platform"] = platform.platform()
    return out


# -- the training loop ------------------------------------------------------------------------


@dataclass
class _Job:
    spec: RecipeSpec
    recipe: ir.Recipe
    multiplier: float
    args: dict[str, Any]


class _Task:
    """The charlm task: data, fixed batches, the initial weights. Everything is drawn on the CPU,
    so every device starts from the same weights and sees the same batches."""

    def __init__(self, cfg: RaceConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.corpus: Corpus = load_charlm()
        T = cfg.context
        train, valid = self.corpus.train, self.corpus.valid
        if len(train) <= T + 1 or len(valid) <= T + 1:  # before the model's position table is allocated
            raise SoapArgumentError(f"race context {T} is longer than the data")
        self.model_cfg = ModelConfig(
            vocab=len(self.corpus.vocab),
            context=cfg.context,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
        )
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        model = CharTransformer(self.model_cfg)
        self.init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.n_params = sum(p.numel() for p in model.parameters())
        self.param_shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        # the batches of every step, drawn once: each run sees the same data in the same order
        self.starts = torch.randint(0, len(train) - T - 1, (cfg.steps, cfg.batch), generator=g)
        # a fixed set of held-out sequences
        n_eval = cfg.eval_batches * cfg.batch
        eval_starts = torch.randint(0, len(valid) - T - 1, (n_eval,), generator=g)
        self.eval_x, self.eval_y = (t.to(self.device) for t in self._window(valid, eval_starts))
        self._init_val: float | None = None

    def _window(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offs = torch.arange(self.cfg.context + 1)
        seq = data[starts[:, None] + offs].long()
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._window(self.corpus.train, self.starts[step])
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def model(self) -> CharTransformer:
        m = CharTransformer(self.model_cfg)
        m.load_state_dict(self.init_state)
        return m.to(self.device)

    @torch.no_grad()
    def evaluate(self, model: CharTransformer) -> float:
        total = 0.0
        B = self.cfg.batch
        n = self.eval_x.shape[0]
        for i in range(0, n, B):
            loss = model.loss(self.eval_x[i : i + B], self.eval_y[i : i + B])
            total += loss.item() * min(B, n - i)
        return total / n

    def initial_val(self, model: CharTransformer) -> float:
        if self._init_val is None:  # the same weights for every run: evaluate them once
            self._init_val = self.evaluate(model)
        return self._init_val


def _one_thread_is_faster(task: _Task, n_threads: int) -> bool:
    """On a busy machine torch's thread pool stalls (a thread waits for a core at every op):
    time a few forward/backward passes with ``n_threads`` and with one thread."""
    model = task.model()
    x, y = task.batch(0)

    def timed(n: int) -> float:
        torch.set_num_threads(n)
        model.loss(x, y).backward()  # warm up
        t0 = time.perf_counter()
        for _ in range(2):
            model.loss(x, y).backward()
        return time.perf_counter() - t0

    many, one = timed(n_threads), timed(1)
    torch.set_num_threads(n_threads)
    return one < 0.8 * many


def _run_label(job: _Job, grid: Sequence[float] | None) -> str:
    return f"{job.spec.label} (lr x{job.multiplier:g})" if grid else job.spec.label


def _train(task: _Task, job: _Job, grid: Sequence[float] | None, progress: bool, stream: TextIO | None) -> RunResult:
    cfg = task.cfg
    model = task.model()
    plan = compile_plan(job.recipe, model, job.args)
    mark_routes(plan, cuda_graphs=cfg.cuda_graphs)
    opt = SoapOptimizer(plan)
    train_loss: list[float] = []
    smooth: list[float] = []
    val_steps = [0]
    val_loss = [task.initial_val(model)]
    ema, diverged_at = 0.0, None
    train_s = eval_s = 0.0
    every = cfg.eval_interval
    bar = Progress(_run_label(job, grid), cfg.steps, stream, enabled=progress)
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        x, y = task.batch(step - 1)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.detach().item()
        train_s += time.perf_counter() - t0
        train_loss.append(value)
        if not math.isfinite(value):
            diverged_at = step
            smooth.append(math.nan)
            bar.update(step, loss=None)
            break
        ema = cfg.ema * ema + (1 - cfg.ema) * value
        smooth.append(ema / (1 - cfg.ema**step))
        if step % every == 0 or step == cfg.steps:
            t1 = time.perf_counter()
            v = task.evaluate(model)
            eval_s += time.perf_counter() - t1
            val_steps.append(step)
            val_loss.append(v)
            if not math.isfinite(v):
                diverged_at = step
                break
        bar.update(step, loss=smooth[-1], val=val_loss[-1])
    measured = sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)
    )
    result = RunResult(
        label=job.spec.label,
        spec=job.spec.text,
        recipe=job.recipe.name,
        lr_multiplier=job.multiplier,
        lrs=lr_params(job.recipe, job.args),
        args={k: (list(v) if isinstance(v, tuple) else v) for k, v in job.args.items()},
        train_loss=train_loss,
        train_smooth=smooth,
        val_steps=val_steps,
        val_loss=val_loss,
        train_s=train_s,
        eval_s=eval_s,
        state_bytes=plan.state_bytes(),
        measured_state_bytes=measured,
        diverged_at=diverged_at,
    )
    if result.diverged:
        bar.close(f"DIVERGED at step {diverged_at}")
    else:
        bar.close(f"train {result.final_train:.3f}  val {result.final_val:.3f}")
    return result


def _device_name(device: torch.device) -> str:
    return "the CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)


def _rank(run: RunResult) -> float:
    v = run.final_val
    return v if math.isfinite(v) else math.inf


def _does_not_fit(cfg: RaceConfig, e: BaseException) -> SoapArgumentError | None:
    """The error to raise for an allocation that failed (torch's CPU allocator, CUDA out of
    memory, Python's MemoryError), or None for any other error."""
    text = str(e)
    overflow = "size calculation overflowed" in text  # past 2**63 bytes
    if not (isinstance(e, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text or overflow):
        return None
    m = re.search(r"(?i)tried to allocate (?:(\d+) bytes|([\d.]+ \w+))", text)
    size = "more than 2**63 bytes" if overflow else "memory" if m is None else m[2] or f"{int(m[1]) / 2**30:,.1f} GiB"
    return SoapArgumentError(
        f"the race does not fit in memory: torch could not allocate {size} on {cfg.device}",
        notes=(
            "what a race holds grows with steps x batch (every batch is drawn before training), batch x"
            " context, eval_batches, d_model and n_layers (--steps, --batch, --context, --eval-batches,"
            " --d-model, --layers)",
        ),
    )


def run_race(
    recipes: Sequence[str | RecipeSpec],
    task: str = "charlm",
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    lr_grid: Sequence[float] | str | None = None,
    seed: int = 0,
    out: str | Path | None = "race_out",
    *,
    context: int = DEFAULT_CONTEXT,
    d_model: int = DEFAULT_D_MODEL,
    n_layers: int = DEFAULT_LAYERS,
    n_heads: int = DEFAULT_HEADS,
    eval_every: int = 0,
    eval_batches: int = DEFAULT_EVAL_BATCHES,
    threads: int = 0,
    device: str = "cpu",
    cuda_graphs: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    plot: bool = True,
) -> RaceResult:
    """Race ``recipes`` on ``task`` and return the results; write ``race.json`` and
    ``losses.png`` into ``out`` (nothing is written when ``out`` is None).

    ``recipes`` are specs ``NAME[:KEY=VALUE,...]`` (see :mod:`soapdsl.race.spec`).
    ``lr_grid`` lists learning-rate multipliers (``[0.5, 1, 2]`` or ``"0.5,1,2"``): each recipe
    runs once per multiplier, with every learning-rate parameter (``lr`` and each ``*_lr``)
    scaled by it, and keeps its run with the lowest final validation loss. Every bad recipe,
    override or option raises a :class:`~soapdsl.errors.SoapError` before any training starts.

    A race stopped after some runs finished (Ctrl-C's ``KeyboardInterrupt``, a run that does not
    fit in memory) keeps them: the exception it raises carries them as ``race_result``, a
    :class:`RaceResult` whose ``complete`` is False (``stopped`` says why, ``unfinished`` lists the
    rest), and they are written into ``out`` as a finished race's are.
    """
    grid = parse_grid(lr_grid)
    if out is not None and not str(out).strip():  # Path("") is ".": an unset $OUT wrote into the cwd
        raise SoapArgumentError(
            "race output directory is empty: give the directory to write race.json and losses.png into"
        )
    cfg = RaceConfig(
        task=task,
        steps=steps,
        batch=batch,
        context=context,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        eval_every=eval_every,
        eval_batches=eval_batches,
        lr_grid=grid,
        seed=seed,
        threads=threads,
        device=device,
        cuda_graphs=cuda_graphs,
    )
    cfg.validate()
    specs = parse_specs(recipes)

    old_threads = torch.get_num_threads()
    n_threads = cfg.threads or min(old_threads, MAX_THREADS)
    torch.set_num_threads(n_threads)
    runs: list[RunResult] = []
    try:
        state = _Task(cfg)
        # resolve and compile everything first: a bad recipe fails before any training
        jobs: list[_Job] = []
        probe = state.model()
        resolved = [(spec, spec.resolve()) for spec in specs]  # once each: a pipe (<(gen)) reads once
        for spec, recipe in resolved:
            for m in grid or [1.0]:
                args = scaled_lrs(recipe, spec.overrides, m, spec.label)
                mark_routes(compile_plan(recipe, probe, args), cuda_graphs=cfg.cuda_graphs)
                jobs.append(_Job(spec, recipe, m, args))
        if out is not None:
            from soapdsl.race.report import prepare_out

            prepare_out(Path(out), plot)
        for spec, recipe in resolved if grid else []:
            if not lr_params(recipe, spec.overrides):
                print(f"note: {spec.label} has no lr parameter; the grid repeats one run", file=stream or sys.stderr)
        del probe
        threads_how = "given" if cfg.threads else "default"
        on_cpu = state.device.type == "cpu"
        if on_cpu and not cfg.threads and n_threads > 1 and _one_thread_is_faster(state, n_threads):
            n_threads, threads_how = 1, "auto: the machine is busy"
            torch.set_num_threads(1)
        if progress:
            print(
                f"race: {cfg.task}, {state.n_params / 1e6:.2f}M parameters, {cfg.steps} steps of"
                f" {cfg.batch}x{cfg.context} characters, {len(jobs)} run{'s' * (len(jobs) != 1)},"
                + (
                    f" {n_threads} thread{'s' * (n_threads != 1)} ({threads_how})"
                    if on_cpu
                    else f" on {_device_name(state.device)}" + (", CUDA graphs" if cfg.cuda_graphs else "")
                ),
                file=stream or sys.stderr,
                flush=True,
            )
        for job in jobs:
            runs.append(_train(state, job, grid, progress, stream))
    except BaseException as e:
        stop: BaseException = e
        if isinstance(e, RuntimeError | MemoryError):  # torch.OutOfMemoryError is a RuntimeError
            stop = _does_not_fit(cfg, e) or e
        if runs:  # keep what finished: a ^C or a failure in the last run must not lose the others
            why = "interrupted" if isinstance(stop, KeyboardInterrupt) else str(getattr(stop, "message", "") or stop)
            partial = _result(cfg, state, specs, runs, grid, n_threads, threads_how, on_cpu)
            partial.stopped = why or type(stop).__name__
            partial.unfinished = [_run_label(job, grid) for job in jobs[len(runs) :]]
            if out is not None:
                from soapdsl.race.report import write_outputs

                try:
                    write_outputs(partial, Path(out), plot=plot)
                except SoapError:  # the error that stopped the race is the one to report
                    pass
            stop.race_result = partial  # type: ignore[attr-defined]
        if stop is e:
            raise
        raise stop from None
    finally:
        torch.set_num_threads(old_threads)

    result = _result(cfg, state, specs, runs, grid, n_threads, threads_how, on_cpu)
    if out is not None:
        from soapdsl.race.report import write_outputs

        write_outputs(result, Path(out), plot=plot)
    return result


def _result(
    cfg: RaceConfig,
    state: _Task,
    specs: Sequence[RecipeSpec],
    runs: list[RunResult],
    grid: Sequence[float] | None,
    n_threads: int,
    threads_how: str,
    on_cpu: bool,
) -> RaceResult:
    """The race's rows, target and task description from the runs that finished."""
    rows: list[Row] = []
    for spec in specs:
        mine = [r for r in runs if r.label == spec.label]
        if not mine:  # a race stopped early: this recipe never finished a run
            continue
        best = min(mine, key=_rank)  # ties (and all diverged) keep the first
        rows.append(Row(spec.label, best, {r.lr_multiplier: r.final_val for r in mine} if grid else {}))
    target = rows[0].best.final_train
    for row in rows:
        row.steps_to_target = row.best.steps_to(target)

    corpus = state.corpus
    task_info = {
        "name": cfg.task,
        "dataset": "King James Bible (Debian bible-kjv-text 4.38), character level",
        "train": "Genesis..Acts (44 books)",
        "valid": "Romans..Revelation (22 books)",
        "train_chars": corpus.train_chars,
        "valid_chars": corpus.valid_chars,
        "vocab": len(corpus.vocab),
        "model": state.model_cfg.to_dict(),
        "n_params": state.n_params,
        "params": [[n, list(s)] for n, s in state.param_shapes],
        "threads": n_threads,
        "device": str(state.device) if on_cpu else f"{state.device} ({_device_name(state.device)})",
        "cuda_graphs": cfg.cuda_graphs,
        "threads_choice": threads_how,
        "eval_every": cfg.eval_interval,
        "eval_sequences": cfg.eval_batches * cfg.batch,
        "tokens_per_step": cfg.batch * cfg.context,
        "smoothing": f"debiased EMA of the train loss, beta={cfg.ema}",
        "steps_to_target": "first step whose smoothed train loss <= the first recipe's final smoothed train loss",
        "lr_grid": "multipliers of every learning-rate parameter (lr and *_lr); best by final validation loss",
    }
    return RaceResult(cfg, task_info, rows, runs, target, versions())
