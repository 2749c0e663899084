"""A FLOP/byte model of each recipe's step on the benchmark's parameter set, the machine's
achievable bandwidth and matmul throughput, and the closed-form state memory of each recipe.

The model counts the *cheapest form* of each recipe's step (a refresh amortised over its
period), in fp32 (4 bytes a word):

* elementwise work as words read + written per element, fused: each state tensor, the
  gradient and the parameter touched once; an intermediate that must cross a matmul is written
  once and read once;
* a matmul ``[m, k] @ [k, n]`` as ``2 m k n`` flops and ``4 (m k + k n + m n)`` bytes;
* QR of a ``d x d`` matrix as ``8/3 d^3`` flops (Householder factorisation plus forming Q);
  the first step's ``eigh`` is not part of the steady state and is left out;
* Newton-Schulz per step: per quintic iteration on the wide orientation ``r x c`` (r <= c)
  ``X X^T`` (r (r+1) c: a symmetric product needs only one triangle), ``b A + c A A``
  (r^2 (r+1), symmetric too), ``B X`` (2 r^2 c); per cubic one, ``X X^T`` and ``A X``.
  SOAP-Muon's 10 + 2 steps take the cheaper of that and the spectral evaluation (float64
  ``X X^T``, ``eigh`` as 9 r^3, ``V diag(h) V^T``, ``M X``; float64 work counts twice, at half
  the fp32 rate, with 8-byte words). Muon's 5 steps stay iterated: the spectral count is lower
  there too, but ``eigh`` runs far below the matmul peak and soapdsl iterates them.

The lower bound of a step is ``max(flops / matmul peak, bytes / bandwidth)``, with both rates
measured on this machine in the same run (:func:`measure_machine`). It is a bound, not a
prediction: it assumes the flops and the bytes overlap perfectly and every matmul runs at the
peak of a large square one. What soapdsl actually executes is counted separately
(:func:`benchmarks.profiling.count_matmul_flops`), so the report shows how far its form is from
the cheapest one without this module having to track soapdsl's implementation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

Shapes = list[tuple[str, tuple[int, ...]]]
W = 4  # bytes per fp32 word
SOAP_FREQ_DEFAULT = 10  # the benchmark's SOAP settings (benchmarks/peers.py)
SOAP_MAX_DIM_DEFAULT = 2048


# -- the machine ------------------------------------------------------------------------------


def _best(fn, reps: int, device: torch.device | None = None) -> float:
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    best = math.inf
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _stream(n: int, reps: int, device: torch.device) -> dict[str, float]:
    """GB/s of a copy, an out-of-place add and an in-place add (words read + written; an
    out-of-place write also costs a read-for-ownership the count leaves out, which is why
    in-place updates, what optimizers do, run faster)."""
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    return {
        "copy_GBs": 2 * n * W / _best(lambda: c.copy_(a), reps, device) / 1e9,
        "add_GBs": 3 * n * W / _best(lambda: torch.add(a, b, out=c), reps, device) / 1e9,
        "add__GBs": 3 * n * W / _best(lambda: a.add_(b), reps, device) / 1e9,
    }


def measure_machine(quick: bool = False, device: str = "cpu") -> dict[str, float]:
    """Achievable memory bandwidth (GB/s: the best of a large copy, add and in-place add) and
    fp32 matmul GFLOP/s (a 1024^3 matmul on a CPU, 4096^3 on a GPU, at torch's default fp32
    precision; and a batched 256-wide one, the typical size here), best of a few runs."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    n = (16 if quick else 64) * 2**20 * (4 if gpu else 1)  # floats: 64 MiB or 256 MiB per tensor (x4 on a GPU)
    reps = 3 if quick else 8
    out = _stream(n, reps, dev)
    out["bandwidth_GBs"] = max(out.values())
    k = 4096 if gpu else 1024
    x, y = torch.rand(k, k, device=dev), torch.rand(k, k, device=dev)
    res = torch.empty(k, k, device=dev)
    out["mm_size"] = k
    out["mm_GFLOPs"] = 2 * k**3 / _best(lambda: torch.mm(x, y, out=res), reps * 2, dev) / 1e9
    xb, yb = torch.rand(8, 256, 1024, device=dev), torch.rand(8, 1024, 256, device=dev)
    out["bmm256_GFLOPs"] = 2 * 8 * 256 * 1024 * 256 / _best(lambda: torch.bmm(xb, yb), reps * 2, dev) / 1e9
    return out


# -- closed-form state memory -----------------------------------------------------------------


def adamw_state(shapes: Shapes) -> int:
    """AdamW: two moments, 2 mn per matrix (2 n per vector)."""
    return sum(2 * math.prod(s) for _, s in shapes) * W


def muon_state(shapes: Shapes) -> int:
    """Muon on hidden matrices: one momentum buffer, mn (embeddings/head/1-D would take AdamW)."""
    return sum((1 if len(s) == 2 and n.startswith("blocks.") else 2) * math.prod(s) for n, s in shapes) * W


def soap_state(shapes: Shapes, max_dim: int) -> int:
    """SOAP: 2 mn + 2 (m^2 + n^2), each dim counted only when <= max_dim; vectors 2 n."""
    total = 0
    for _, s in shapes:
        total += 2 * math.prod(s)
        if len(s) >= 2:
            total += sum(2 * d * d for d in s if d <= max_dim)
    return total * W


def soap_muon_state(shapes: Shapes) -> int:
    """SOAP-Muon: hidden matrices 2 mn + 2 min(m, n)^2; embedding, head and vectors AdamW 2 mn."""
    total = 0
    for n, s in shapes:
        total += 2 * math.prod(s)
        if len(s) == 2 and n.startswith("blocks."):
            total += 2 * min(s) ** 2
    return total * W


# -- the step model ---------------------------------------------------------------------------


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    parts: dict[str, list[float]] = field(default_factory=dict)  # name -> [flops, bytes]

    def add(self, name: str, flops: float, nbytes: float, times: float = 1.0) -> None:
        self.flops += flops * times
        self.bytes += nbytes * times
        acc = self.parts.setdefault(name, [0.0, 0.0])
        acc[0] += flops * times
        acc[1] += nbytes * times

    def bound(self, peak_flops: float, bandwidth: float) -> float:
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def _mm(c: Cost, name: str, m: int, k: int, n: int, times: float = 1.0, batch: int = 1) -> None:
    c.add(name, 2 * m * k * n * batch, W * (m * k + k * n + m * n) * batch, times)


def _ew(c: Cost, name: str, numel: int, words: int, flops_per: float) -> None:
    c.add(name, flops_per * numel, W * words * numel)


def _sym(c: Cost, name: str, r: int, k: int) -> None:
    """A symmetric product ``Y Y^T`` of an [r, k] matrix: one triangle of dot products (a
    symmetric kernel's count; soapdsl's halved form computes 3/4 of the full product on a CPU)."""
    c.add(name, r * (r + 1) * k, W * (r * k + r * r))


def _ns(c: Cost, m: int, n: int, steps: int, cleanup: int) -> None:
    r, k = min(m, n), max(m, n)
    for _ in range(steps):
        _sym(c, "newton-schulz", r, k)  # A = X X^T
        _sym(c, "newton-schulz", r, r)  # A A (= A A^T)
        _mm(c, "newton-schulz", r, r, k)  # B X
    for _ in range(cleanup):
        _sym(c, "newton-schulz", r, k)
        _mm(c, "newton-schulz", r, r, k)
    _ew(c, "newton-schulz", m * n, 2, 3)  # normalise (norm read, scale)


def _ns_spectral(c: Cost, m: int, n: int) -> None:
    """The spectral evaluation (soapdsl.ops._linalg._spectral_newton_schulz), whatever the
    steps: float64 work counted twice in flops (half the fp32 rate), 8-byte words."""
    r, k = min(m, n), max(m, n)
    fp64 = Cost()
    _sym(fp64, "newton-schulz", r, k)  # A = X X^T
    fp64.add("newton-schulz", 9 * r**3, W * 2 * r * r)  # eigh, vectors included
    _sym(fp64, "newton-schulz", r, r)  # V diag(h) V^T
    _mm(fp64, "newton-schulz", r, r, k)  # M X
    for name, (flops, nbytes) in fp64.parts.items():
        c.add(name, 2 * flops, 2 * nbytes)
    _ew(c, "newton-schulz", m * n, 2, 3)  # normalise (the norm, a read) and cast back


def _ns_cheapest(c: Cost, m: int, n: int, steps: int, cleanup: int) -> None:
    """The standard iteration or the spectral evaluation, whichever counts fewer flops."""
    iterated, spectral = Cost(), Cost()
    _ns(iterated, m, n, steps, cleanup)
    _ns_spectral(spectral, m, n)
    _add_cheaper(c, iterated, spectral)


def _add_cheaper(c: Cost, first: Cost, other: Cost) -> None:
    """Add to ``c`` the parts of whichever of two candidate forms counts fewer flops (``first``
    on a tie)."""
    for name, (flops, nbytes) in (other if other.flops < first.flops else first).parts.items():
        c.add(name, flops, nbytes)


def _ns_gram(c: Cost, m: int, n: int, steps: int, cleanup: int, restart: int) -> None:
    """The Gram form (newton_schulz form=gram) where it counts fewer flops, else the standard one.
    Runs of ``restart`` iterations, each between R = X X^T and X <- Q X; inside a run R R per
    quintic iteration, Q <- P Q from the run's second iteration, R <- P R P before its last."""
    r, k = min(m, n), max(m, n)
    gram, standard = Cost(), Cost()
    _ns(standard, m, n, steps, cleanup)
    iters = steps + cleanup
    for start in range(0, iters, restart):
        length = min(restart, iters - start)
        _sym(gram, "newton-schulz", r, k)  # R = X X^T
        for i in range(length):
            if start + i < steps:
                _sym(gram, "newton-schulz", r, r)  # R R (a cubic cleanup step has none)
            if i:
                _mm(gram, "newton-schulz", r, r, r)  # P Q
            if i < length - 1:
                _mm(gram, "newton-schulz", r, r, r, 2)  # P R P
        _mm(gram, "newton-schulz", r, r, k)  # Q X
    _ew(gram, "newton-schulz", m * n, 2, 3)
    _add_cheaper(c, standard, gram)


def _rotate(c: Cost, name: str, m: int, n: int, left: bool, right: bool, times: float = 1.0) -> None:
    """One projection of an m x n matrix: Q_L^T X (left) and/or X Q_R (right)."""
    if left:
        _mm(c, name, m, m, n, times)
    if right:
        _mm(c, name, m, n, n, times)


def _refresh(c: Cost, d: int, freq: int) -> None:
    """SOAP's refresh of one d x d factor, amortised over ``freq`` steps: the power step GG Q,
    the eigenvalue estimates from it (diag(Q^T GG Q) = colsum(Q * GG Q)), and QR."""
    t = 1.0 / freq
    _mm(c, "refresh", d, d, d, t)  # GG @ Q
    c.add("refresh", 2 * d * d, W * 2 * d * d, t)  # estimates
    c.add("refresh", 8.0 / 3.0 * d**3, W * 3 * d * d, t)  # QR


def adamw_cost(shapes: Shapes) -> Cost:
    """AdamW on every tensor, fused: read p, g, m, v; write p, m, v (7 words)."""
    c = Cost()
    for _, s in shapes:
        _ew(c, "elementwise", math.prod(s), 7, 14)
    return c


def muon_cost(shapes: Shapes, form: str = "standard", restart: int = 3) -> Cost:
    """Muon on hidden matrices: momentum + Nesterov (read g, buf; write buf, u: 4 words),
    Newton-Schulz (5 quintic steps; ``form="gram"``: the Gram form), update (read p, u; write p:
    3 words)."""
    c = Cost()
    for _, s in shapes:
        m, n = s
        _ew(c, "elementwise", m * n, 7, 8)
        if form == "gram":
            _ns_gram(c, m, n, 5, 0, restart)
        else:
            _ns(c, m, n, 5, 0)
    return c


def _factored(s: tuple[int, ...], max_dim: int) -> tuple[bool, bool]:
    return (s[0] <= max_dim, s[1] <= max_dim)


def soap_cost(shapes: Shapes, freq: int, max_dim: int) -> Cost:
    """SOAP (section 2.4) with the momentum kept in the rotated basis: per step 2 projections
    (rotate G, unrotate the update), the GG update, Adam in the rotated basis (read Gr, m, v;
    write m, v, U: 6 words) and the parameter update with decay (3 words); per refresh and
    factored dim, the momentum re-rotated once (R = Q_new^T Q_old, then one mode product) and
    v permuted. Vectors: AdamW (7 words)."""
    c = Cost()
    for _, s in shapes:
        numel = math.prod(s)
        if len(s) != 2:
            _ew(c, "elementwise", numel, 7, 14)
            continue
        m, n = s
        left, right = _factored(s, max_dim)
        _rotate(c, "projections", m, n, left, right, 2)
        if left:
            _mm(c, "GG update", m, n, m)
            _ew(c, "GG update", m * m, 3, 3)
        if right:
            _mm(c, "GG update", n, m, n)
            _ew(c, "GG update", n * n, 3, 3)
        _ew(c, "elementwise", numel, 9, 16)
        for d, on, is_left in ((m, left, True), (n, right, False)):
            if not on:
                continue
            _refresh(c, d, freq)
            c.add("refresh", 0, W * 2 * numel, 1.0 / freq)  # permute v
            _mm(c, "refresh", d, d, d, 1.0 / freq)  # R = Q_new^T Q_old
            _rotate(c, "refresh", m, n, is_left, not is_left, 1.0 / freq)  # re-rotate the momentum
    return c


def soap_muon_cost(shapes: Shapes, freq: int, form: str = "standard", restart: int = 3) -> Cost:
    """SOAP-Muon: hidden matrices get one-sided SOAP on the smaller side (2 projections, the
    momentum kept rotated), Adam-style normalisation in the rotated basis (read Gr, m, v; write
    m, v, X: 6 words), Newton-Schulz (10 quintic + 2 cubic steps, iterated or spectral,
    whichever counts fewer flops), the sqrt fix (read, write, a norm: 3 words) and the update
    (3 words); the embedding, head and vectors take AdamW (7 words). ``form="gram"``: the Gram
    form of Newton-Schulz."""
    c = Cost()
    for name, s in shapes:
        numel = math.prod(s)
        if not (len(s) == 2 and name.startswith("blocks.")):
            _ew(c, "elementwise", numel, 7, 14)
            continue
        m, n = s
        right = not (m < n)  # the smaller side; a square matrix takes the right factor
        d = n if right else m
        _rotate(c, "projections", m, n, not right, right, 2)
        _mm(c, "GG update", d, numel // d, d)
        _ew(c, "GG update", d * d, 3, 3)
        _ew(c, "elementwise", numel, 12, 24)
        if form == "gram":
            _ns_gram(c, m, n, 10, 2, restart)
        else:
            _ns_cheapest(c, m, n, 10, 2)
        _refresh(c, d, freq)
        c.add("refresh", 0, W * 2 * numel, 1.0 / freq)
        _mm(c, "refresh", d, d, d, 1.0 / freq)
        _rotate(c, "refresh", m, n, not right, right, 1.0 / freq)
    return c
