"""x_T: Gaussian noise that is the same on every machine, backend and library version.

A codec must decode the same bits to the same pixels everywhere, so the noise cannot come
from a device RNG or from numpy's Generator (whose distribution algorithms may change between
releases). It is built here from integer hashing (splitmix64 of a counter) and the Box-Muller
transform, using only IEEE-754 operations that are correctly rounded everywhere (+, -, *, /,
sqrt) in float64: log, cos and sin are evaluated with fixed polynomials instead of libm,
whose last bit differs between platforms.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_LN2 = 0.6931471805599453
_TWO_PI = 6.283185307179586


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, stream: int, n: int) -> np.ndarray:
    """n uniforms in (0, 1], 53 bits each."""
    key = _splitmix64(np.array([seed * 4 + stream], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        bits = _splitmix64(np.arange(n, dtype=np.uint64) + key)
    return ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)


def _log(u: np.ndarray) -> np.ndarray:
    """Natural log of u in (0, 1], to ~1e-16 relative, from basic operations only."""
    m, e = np.frexp(u)  # u = m * 2**e, m in [0.5, 1): exact
    small = m < 0.7071067811865476
    m = np.where(small, m * 2.0, m)
    e = np.where(small, e - 1, e).astype(np.float64)
    t = (m - 1.0) / (m + 1.0)  # |t| < 0.172; log(m) = 2 atanh(t)
    t2 = t * t
    s = np.zeros_like(t)
    for k in range(21, 0, -2):
        s = s * t2 + 1.0 / k
    return e * _LN2 + 2.0 * t * s


def _cos_sin(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of theta in [0, 2 pi), reduced to [-pi/4, pi/4] by quadrant."""
    q = np.floor(theta * (2.0 / np.pi) + 0.5)
    r = theta - q * (np.pi / 2.0)  # |r| <= pi/4 (to within one ulp of pi/2 * q)
    r2 = r * r
    c, s = np.ones_like(r), np.ones_like(r)
    for k in range(20, 0, -2):  # Taylor, 11 terms: error < 1e-17 on |r| <= pi/4
        c = 1.0 - c * r2 / (k * (k - 1))
        s = 1.0 - s * r2 / ((k + 1) * k)
    s = s * r
    qi = q.astype(np.int64) & 3
    cos = np.select([qi == 0, qi == 1, qi == 2], [c, -s, -c], s)
    sin = np.select([qi == 0, qi == 1, qi == 2], [s, c, -s], -c)
    return cos, sin


@lru_cache(maxsize=8)
def _noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    half = (n + 1) // 2
    u1, u2 = _uniform(seed, 0, half), _uniform(seed, 1, half)
    radius = np.sqrt(-2.0 * _log(u1))
    cos, sin = _cos_sin(_TWO_PI * (u2 - 1.0 / 9007199254740992.0))  # angle in [0, 2 pi)
    out = np.concatenate([radius * cos, radius * sin])[:n].astype(np.float32).reshape(shape)
    out.setflags(write=False)
    return out


def gaussian_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise of `shape`, a pure function of (seed, shape)."""
    if not 0 <= seed < (1 << 32):
        raise ValueError("seed must fit in 32 bits")
    return _noise(int(seed), tuple(int(s) for s in shape))
