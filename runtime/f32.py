"""Correctly rounded float32 arithmetic on numpy arrays: the same bits on every machine.

The entropy tables (runtime/entropy.py) decide every symbol of a stream, so encoder and decoder
must hold bit-identical tables wherever they run. The original implementation computes them in
float32 torch, whose transcendental kernels (exp, erfc, tanh, ...), fused multiply-adds and
reductions differ in the last bit between SIMD levels (scalar, AVX2, AVX-512) and libraries:
the same checkpoint gives different tables on different CPUs (issue 16).

Here every float32 operation is defined as the correctly rounded float32 value (round to
nearest, ties to even) of the exact mathematical result on its float32 operands: IEEE 754's
rule for + - * / and fma, extended to the elementary functions. That value is unique, so every
machine that computes it gets the same bits, whatever its SIMD level or math library.

How it is computed, and why each way is exact:
- + - * /: in float64, then rounded to float32. One float64 operation on float32 operands,
  rounded again to float32, equals the correctly rounded float32 result, because float64 has
  more than 2 * 24 + 2 bits of significand (double rounding is innocuous; Figueroa, "When is
  double rounding innocuous?", 1995). IEEE 754 requires + - * / and the float64 -> float32
  conversion to be correctly rounded on every conforming machine, vectorized or not.
- fma (torch's vectorized kernels contract a * b + c into one rounding): an exact float64
  product, and an error-free sum (see fma).
- exp, erfc, tanh, softplus, sigmoid: a float64 estimate (torch's float64 kernels; their error,
  a few float64 ulps, may differ between machines) is rounded to float32 and accepted where it
  lies farther than 2**-16 float32 ulps (2**-39 relative, 8000 float64 ulps) from a rounding
  boundary, the midpoint between two neighbouring float32 values: no estimate error that small
  can move it across. The few other values (about 1 in 30,000) are recomputed with mpmath at
  increasing precision until the side of the boundary is certain (Ziv's strategy), so the result
  never depends on the float64 estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath
import numpy as np
import torch

f32 = np.float32
_BOUNDARY_MARGIN = 2.0**-16  # in float32 ulps; see the module docstring
_MAX_PRECISION = 1024  # bits; Ziv's loop gives up beyond this (never reached in practice)
_MAX32 = np.finfo(np.float32).max
_OVERFLOW = mpmath.mpf(2) ** 128 - mpmath.mpf(2) ** 103  # from here on, float32 rounds to infinity


def as_f32(x: np.ndarray | float) -> np.ndarray:
    """float64 (or exact) values rounded to float32, ties to even."""
    return np.asarray(x, dtype=np.float64).astype(np.float32)


def _f64(x: np.ndarray | float) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def add(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return as_f32(_f64(a) + _f64(b))


def sub(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return as_f32(_f64(a) - _f64(b))


def mul(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return as_f32(_f64(a) * _f64(b))


def div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return as_f32(_f64(a) / _f64(b))


def fma(a: np.ndarray | float, b: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """a * b + c with one rounding.

    The product of two float32 values is exact in float64; the sum with c is split into its
    float64 rounding s and the exact error e (Knuth's TwoSum), so a * b + c == s + e exactly.
    Rounding s to float32 gives the right answer unless s lies exactly on a rounding boundary,
    where the sign of e decides: no boundary (a float64 value) can lie strictly between s and
    s + e, since it would be nearer to s + e than s is.
    """
    p = _f64(a) * _f64(b)
    c64 = _f64(c)
    s = p + c64
    v = s - p
    e = (p - (s - v)) + (c64 - v)
    y = np.atleast_1d(as_f32(s))
    s, e = np.broadcast_to(s, y.shape), np.broadcast_to(e, y.shape)
    toward = np.nextafter(y, np.where(s > y.astype(np.float64), f32(np.inf), f32(-np.inf)))
    tie = (s == (y.astype(np.float64) + toward.astype(np.float64)) / 2) & (e != 0)
    # on a tie the exact value lies on the side of e
    y = np.where(tie & ((e > 0) == (toward > y)), toward, y)
    return y.reshape(np.shape(s)) if np.ndim(s) else y[0]


def matmul(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Batched m @ x ((..., o, i) @ (..., i, n)), accumulated as AVX-512 GEMM kernels do: over
    the inner index in order, one fused multiply-add each (acc = fma(m_k, x_k, acc))."""
    acc = np.zeros(np.broadcast_shapes(m.shape[:-2], x.shape[:-2]) + (m.shape[-2], x.shape[-1]), np.float32)
    for k in range(m.shape[-1]):
        acc = fma(m[..., :, k : k + 1], x[..., k : k + 1, :], acc)
    return acc


def log(x: float) -> np.float32:
    """Natural logarithm of a float64 value, correctly rounded to float32 (the reference passes
    Python floats to torch, which rounds them to float32)."""
    return _round_exact(mpmath.log, float(x))


def linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 as its vectorized CPU kernel computes it: the step in float32,
    the first half as fma(step, i, start), the second as fma(-step, steps - 1 - i, end)."""
    start, end = f32(start), f32(end)
    step = div(sub(end, start), steps - 1)
    i = np.arange(steps)
    return np.where(i < steps // 2, fma(step, i, start), fma(-step, steps - 1 - i, end))


# ---------------------------------------------------------------------------------------------
# Elementary functions
# ---------------------------------------------------------------------------------------------


def _elementwise(x: np.ndarray, estimate: Callable[[torch.Tensor], torch.Tensor],
                 exact: Callable[[mpmath.mpf], mpmath.mpf]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    with torch.no_grad():
        y64 = estimate(torch.from_numpy(x.astype(np.float64))).numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is settled exactly below
        y = as_f32(y64)
        # the rounding boundaries around y: halfway to each float32 neighbour (exact in float64)
        y_64 = y.astype(np.float64)
        down = np.nextafter(y, f32(-np.inf)).astype(np.float64)
        up = np.nextafter(y, f32(np.inf)).astype(np.float64)
        distance = np.minimum(np.abs(y64 - (y_64 + down) / 2), np.abs(y64 - (y_64 + up) / 2))
        unsure = ~(distance > _BOUNDARY_MARGIN * (up - y_64)) & ~np.isnan(y64)  # NaN in, NaN out
    if unsure.any():
        y = y.copy()
        for i in np.flatnonzero(unsure):
            y.flat[i] = _round_exact(exact, float(x.flat[i]))
    return y


def _round_exact(fn: Callable[[mpmath.mpf], mpmath.mpf], x: float) -> np.float32:
    """fn(x) correctly rounded to float32, by Ziv's strategy with mpmath."""
    prec = 64
    while prec <= _MAX_PRECISION:
        with mpmath.workprec(prec):
            value = fn(mpmath.mpf(x))
            # mpmath's functions are accurate to a few ulps of the working precision
            tol = abs(value) * mpmath.mpf(2) ** (8 - prec)
            if value == 0:
                return f32(0.0)
            if abs(value) - _OVERFLOW > tol:
                return f32(np.inf) if value > 0 else f32(-np.inf)
            if _OVERFLOW - abs(value) > tol:
                with np.errstate(over="ignore"):
                    guess = f32(float(value))
                guess = np.clip(guess, -_MAX32, _MAX32)
                candidates = [np.nextafter(guess, f32(-np.inf)), guess, np.nextafter(guess, f32(np.inf))]
                nearest = min(candidates, key=lambda c: abs(value - mpmath.mpf(float(c))))
                boundary = min(abs(value - (mpmath.mpf(float(nearest)) + mpmath.mpf(float(c))) / 2)
                               for c in candidates if c != nearest)
                if boundary > tol:
                    return nearest
        prec *= 2
    raise ArithmeticError(f"cannot round {fn.__name__}({x!r}) to float32 with {_MAX_PRECISION}-bit arithmetic")


def exp(x: np.ndarray) -> np.ndarray:
    return _elementwise(x, torch.exp, mpmath.exp)


def erfc(x: np.ndarray) -> np.ndarray:
    return _elementwise(x, torch.special.erfc, mpmath.erfc)


def tanh(x: np.ndarray) -> np.ndarray:
    return _elementwise(x, torch.tanh, mpmath.tanh)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return _elementwise(x, torch.sigmoid, lambda v: 1 / (1 + mpmath.exp(-v)))


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x), and x itself above 20 (torch.nn.functional.softplus's threshold)."""
    x = np.asarray(x, dtype=np.float32)
    y = _elementwise(x, lambda t: torch.log1p(torch.exp(t)), lambda v: mpmath.log1p(mpmath.exp(v)))
    return np.where(x > 20, x, y)
