"""Stochastic rounding of bfloat16 and float16 parameter writes (the route option ``stochastic_round``).

A bfloat16 parameter keeps 8 bits of mantissa, so a step smaller than half the gap to the next
bfloat16 value is lost entirely when the new value is rounded to nearest: lr 1e-3 on weights
near 1 does not move them at all. A float16 one keeps 11 bits, and loses steps under 2^-11 of
the weight the same way. Rounding stochastically (away from zero with probability equal to the
value's distance from the representable value towards zero, as a fraction of the gap) makes
every write unbiased, so small steps add up on average (Gupta, Agrawal, Gopalakrishnan &
Narayanan, "Deep Learning with Limited Numerical Precision", 2015; Zamirai, Zhang, De Sa &
Kuang, "Revisiting BFloat16 Training", 2020).

How, for bfloat16: the new value is computed in float32, a random integer in [0, 2^16) is added
to its bit pattern and the low 16 bits are cleared. A float32 whose low 16 bits are zero is
exactly a bfloat16, and the carry into bit 16 happens with probability (low 16 bits) / 2^16.
Values that bfloat16 holds exactly are written exactly, infinities stay infinite and NaN stays
NaN. A value past the largest bfloat16 carries into infinity with the probability of its
position between that value and the next power of two, 2^128, as if infinity stood there.

For float16 (not a truncation of float32: its exponent is narrower, and under 2^-14 its values
are subnormal, multiples of 2^-24) the same is done in float32 arithmetic: the gap at the
value, 2^(e - 10) for an exponent e of at least -14, is read off the float32 exponent; the
value divided by it (exact: a power of two) splits into the whole gaps below it and a fraction
f, and the value goes one gap away from zero when f exceeds the element's noise u / 2^16 plus
half a step (u + 1/2 < 2^16 f). In float16's normal range a float32 has 13 bits below
float16's last place, so f is a multiple of 2^-13 and 16 random bits give probability f
exactly; so too for subnormals down to 2^-17. Below that f has more bits than the noise: the
probability is f rounded to a multiple of 2^-16, an expected error under 2^-17 of the gap,
2^-41 in value. Past the largest float16, 65504, a value becomes infinite with the probability
of its position between 65504 and 65536, where the next value would be: as bfloat16's bits do
at its largest. Values float16 holds are written exactly, infinities and NaN stay, and the
sign (also of a zero) is kept.

Where the random bits come from: the whole parameter, flattened in its logical (row-major)
order, is cut into blocks of :data:`BLOCK` elements, and each block's bits are drawn from
torch's generator for the parameter's device, seeded from (the parameter's name, its step
count, the writing stage, the block's index): a quarter as many full-range 64-bit words as the
block has elements, each element taking one 16-bit quarter (a generator call per word, not per
element: 2-2.5x faster on the CPU than 16 bits drawn an element). So a run is reproducible, a
checkpoint resumes on the same bits, every data-parallel rank writes the same values without
communicating, and an FSDP2 rank writing its rows draws the bits the whole parameter would
have (the blocks it touches, whole, then its part of them). The CPU and CUDA generators
differ, so the bits do too.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from soapdsl.runtime.context import eager

_MASK64 = (1 << 64) - 1
#: elements drawn from one seed: an FSDP2 rank draws at most two blocks' worth it does not use
BLOCK = 1 << 20
#: the int32 bit pattern that clears a float32's low 16 bits
_HIGH16 = -(1 << 16)
#: float16's smallest normal exponent, -14, biased as float32's: below it float16's gap stays 2^-24
_F16_MIN_EXPONENT = 127 - 14


def _mix64(x: int) -> int:
    """A 64-bit integer hash (xor-shift-multiply rounds, as in splitmix64's finaliser), on the host."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def name_key(name: str) -> int:
    """A parameter's key: the same on every rank and in every process (unlike Python's salted
    ``hash`` of a string)."""
    return zlib.crc32(name.encode("utf-8"))


def write_key(param_key: int, step: int, stage: str) -> int:
    """The key of one write: a parameter, its step count and the stage that writes it."""
    return _mix64(param_key ^ _mix64(step ^ _mix64(zlib.crc32(stage.encode("utf-8")) << 32)))


class Noise:
    """Random integers in [0, 2^16) for a range of a parameter's elements, from per-block seeds."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def draw(self, key: int, first: int, n: int, total: int, device: torch.device) -> torch.Tensor:
        """The noise of elements ``first .. first + n - 1`` of a parameter of ``total`` elements
        (int32, on ``device``), for the write ``key``.

        A block's noise is the 16-bit quarters of full-range 64-bit words, in memory order
        (element j of a block: quarter j % 4 of word j // 4), a quarter as many draws as
        elements: what a draw costs is mostly the generator, per word. Every block draws all
        its words, whoever needs which elements of it, so an element's noise depends on the
        key, its block and its place in the block only (a CUDA generator's value at a position
        depends on how many are drawn)."""
        if n == 0:
            return torch.empty(0, dtype=torch.int32, device=device)
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device)
        parts = []
        for block in range(first // BLOCK, (first + n - 1) // BLOCK + 1):
            start = block * BLOCK
            g.manual_seed(_mix64(key ^ _mix64(block + 1)) >> 1)  # a seed below 2^63
            words = torch.empty(-(-min(BLOCK, total - start) // 4), dtype=torch.int64, device=device)
            quarters = words.random_(-(1 << 63), None, generator=g).view(torch.uint16)
            parts.append(quarters[max(first - start, 0) : first + n - start].to(torch.int32))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


#: the parameter dtypes whose writes the option rounds stochastically; others are written as usual
DTYPES = (torch.bfloat16, torch.float16)


def round_into(p: torch.Tensor, value: torch.Tensor, noise: torch.Tensor) -> None:
    """Write the float32 ``value`` into the bfloat16 or float16 ``p``, rounded stochastically
    with ``noise`` (one integer in [0, 2^16) an element, in logical order; a bfloat16 write
    adds the value's bits into it)."""
    flat = value.reshape(-1).float()  # the elements in logical order, whatever the layout
    rounded = _to_bfloat16(flat, noise) if p.dtype == torch.bfloat16 else _to_float16(flat, noise)
    p.copy_(rounded.view(p.shape))


def _to_bfloat16(flat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``flat`` (float32) rounded stochastically to values bfloat16 holds, as float32."""
    bits = noise.add_(flat.view(torch.int32)).bitwise_and_(_HIGH16)
    # a NaN's pattern plus the noise may carry into the sign bit (CUDA's NaN is 0x7fffffff; a
    # negative one, 0xffffffff, may carry past it to a small positive number)
    return torch.where(flat.isnan(), flat, bits.view(torch.float32))


def _to_float16(flat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``flat`` (float32) rounded stochastically to values float16 holds (or to infinity past
    them), as float32: float32 and int32 arithmetic only, each step exact."""
    size = flat.abs()
    # float16's gap at the value, 2^(e - 10) for its exponent e, at least -14 (2^-24 for
    # subnormals): a float32 made of an exponent field alone (2^118 for infinities and NaN)
    exponent = size.view(torch.int32).bitwise_right_shift(23).clamp_(min=_F16_MIN_EXPONENT)
    gap = exponent.sub_(10).bitwise_left_shift_(23).view(torch.float32)
    gaps = size.div_(gap)  # |value| in gaps: a power of two's quotient, below 2^11, exact
    whole = gaps.floor()
    # a gap more when the fraction f > (u + 1/2) / 2^16: probability f where 2^16 f is whole.
    # An infinity's f is NaN (inf - inf): never
    up = gaps.sub_(whole).mul_(1 << 16).sub_(0.5) > noise
    # up to 2048 gaps, the next power of two: exact too; infinities and NaN stay
    return whole.add_(up).mul_(gap).copysign_(flat)


class Rounding:
    """The stochastic rounding of one route's parameter writes."""

    def __init__(self, names: Mapping[int, str], first: Mapping[int, tuple[int, int]]) -> None:
        self.keys = {i: name_key(n) for i, n in names.items()}  # id(parameter) -> its key
        #: id(parameter) -> (flat index of its first element in the whole parameter, the whole
        #: parameter's size), for an FSDP2 rank's rows; absent: the tensor is the whole parameter
        self.first = first
        self.noise = Noise()

    @staticmethod
    def rounds(p: torch.Tensor) -> bool:
        """Whether writes into ``p`` are rounded stochastically (bfloat16 and float16 ones are)."""
        return p.dtype in DTYPES

    @eager  # seeding a generator is not traceable: a compiled route writes here eagerly
    def write(self, p: torch.Tensor, value: torch.Tensor, step: int, stage: str) -> None:
        """``p <- value`` (a float32 tensor of ``p``'s shape), rounded stochastically."""
        first, total = self.first.get(id(p), (0, p.numel()))
        key = write_key(self.keys[id(p)], step, stage)
        round_into(p, value, self.noise.draw(key, first, p.numel(), total, p.device))
