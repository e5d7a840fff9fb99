"""runtime/f32.py: every operation is the correctly rounded float32 result, checked against
exact arithmetic (Fractions for + - * / fma, mpmath at 200 bits for the elementary functions)."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest

from osdiff.runtime import f32

F32 = np.float32


def correctly_rounded(x: Fraction | mpmath.mpf) -> np.float32:
    """The float32 nearest to x, ties to even, by exact comparison with its neighbours."""
    if isinstance(x, Fraction):
        exact = x
    else:
        sign, mantissa, exponent, _ = mpmath.mpf(x)._mpf_
        exact = (-1) ** sign * Fraction(int(mantissa)) * Fraction(2) ** int(exponent)
    guess = F32(float(exact))
    candidates = [np.nextafter(guess, F32(-np.inf)), guess, np.nextafter(guess, F32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(np.uint32)) & 1))


def samples(n: int, seed: int, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * scale * 10.0 ** rng.integers(-3, 2, n)).astype(F32)


@pytest.mark.parametrize("op, exact", [
    (f32.add, lambda a, b: a + b), (f32.sub, lambda a, b: a - b),
    (f32.mul, lambda a, b: a * b), (f32.div, lambda a, b: a / b),
])
def test_basic_operations_are_correctly_rounded(op, exact):
    a, b = samples(3000, 1), samples(3000, 2)
    got = op(a, b)
    assert got.dtype == np.float32
    for x, y, z in zip(a, b, got):
        assert z == correctly_rounded(exact(Fraction(float(x)), Fraction(float(y)))), (x, y)


def test_fma_rounds_once():
    a, b, c = samples(3000, 3), samples(3000, 4), samples(3000, 5, scale=30.0)
    got = f32.fma(a, b, c)
    for x, y, z, r in zip(a, b, c, got):
        assert r == correctly_rounded(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))


def test_fma_on_a_float64_tie_follows_the_exact_value():
    """a * b + c = (2^30 + 2^7 + 2^6) - 2^-40: its float64 rounding is exactly halfway between
    two float32 values, and ties-to-even would pick the wrong one (2^30 + 2^8)."""
    a, b, c = F32(8 * (1 + 2**-23)), F32(8 * (1 - 2**-23)), F32(2**30 + 2**7)
    assert f32.fma(a, b, c) == F32(2**30 + 2**7)
    assert f32.fma(a, -b, -c) == -F32(2**30 + 2**7)


@pytest.mark.parametrize("name, exact", [
    ("exp", mpmath.exp), ("erfc", mpmath.erfc), ("tanh", mpmath.tanh),
    ("sigmoid", lambda x: 1 / (1 + mpmath.exp(-x))), ("softplus", lambda x: mpmath.log1p(mpmath.exp(x))),
])
def test_elementary_functions_are_correctly_rounded(name, exact):
    x = np.clip(samples(2000, 6), -80, 80)  # exp overflows float32 beyond 88.7
    got = getattr(f32, name)(x)
    with mpmath.workprec(200):
        for v, y in zip(x, got):
            if name == "softplus" and v > 20:
                assert y == v  # torch's threshold
            else:
                assert y == correctly_rounded(exact(mpmath.mpf(float(v)))), (name, v)


def test_values_near_a_rounding_boundary_take_the_exact_path(monkeypatch):
    """With a margin so wide that every value is 'unsure', everything goes through mpmath's
    Ziv loop, and the result is the same."""
    x = samples(300, 7)
    fast = f32.erfc(x)
    monkeypatch.setattr(f32, "_BOUNDARY_MARGIN", 1.0)
    calls = []
    exact_path = f32._round_exact
    monkeypatch.setattr(f32, "_round_exact", lambda fn, v: calls.append(v) or exact_path(fn, v))
    assert np.array_equal(f32.erfc(x), fast)
    assert len(calls) == x.size


def test_overflow_underflow_and_nan():
    big = np.array([88.5, 89.0, 1000.0, -1000.0, np.nan], dtype=F32)
    got = f32.exp(big)
    assert got[0] == correctly_rounded(mpmath.exp(mpmath.mpf(88.5)))
    assert np.isinf(got[1]) and np.isinf(got[2]) and got[3] == 0 and np.isnan(got[4])
    assert f32.erfc(np.array([30.0], F32))[0] == 0 and f32.erfc(np.array([-30.0], F32))[0] == 2


def test_log_of_a_float64_is_correctly_rounded():
    with mpmath.workprec(200):
        for v in (0.11, 256.0, 1e-9, 3.0):
            assert f32.log(v) == correctly_rounded(mpmath.log(mpmath.mpf(v)))


def test_matmul_accumulates_with_fused_multiply_adds():
    rng = np.random.default_rng(8)
    m, x = rng.standard_normal((5, 3, 3)).astype(F32), rng.standard_normal((5, 3, 7)).astype(F32)
    acc = np.zeros((5, 3, 7), F32)
    for k in range(3):
        acc = f32.fma(m[:, :, k : k + 1], x[:, k : k + 1, :], acc)
    assert np.array_equal(f32.matmul(m, x), acc)
    np.testing.assert_allclose(f32.matmul(m, x), m @ x, rtol=1e-5, atol=1e-6)
