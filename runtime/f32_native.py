"""The operations of runtime/f32.py by torch's float32 kernels on this CPU: the original
implementation's own arithmetic.

Their last bits depend on the CPU's SIMD level (and on the torch version), so tables derived
with them are not portable (docs/entropy-tables.md). They exist for one purpose: the original
implementation's raw stream format, whose streams the original wrote with tables derived this
way, so that such streams made on a machine like this one still decode here (runtime/entropy.py
`EntropyModels.original`). Arrays in, float32 arrays out, like runtime/f32.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _t(x: np.ndarray | float) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def add(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return (_t(a) + _t(b)).numpy()


def sub(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return (_t(a) - _t(b)).numpy()


def mul(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return (_t(a) * _t(b)).numpy()


def div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return (_t(a) / _t(b)).numpy()


def matmul(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    return torch.matmul(_t(m), _t(x)).numpy()


def log(x: float) -> np.float32:
    return np.float32(math.log(x))  # a float64 logarithm, rounded to float32 by torch.linspace


def linspace(start: float, end: float, steps: int) -> np.ndarray:
    return torch.linspace(float(start), float(end), steps).numpy()


def exp(x: np.ndarray) -> np.ndarray:
    return torch.exp(_t(x)).numpy()


def erfc(x: np.ndarray) -> np.ndarray:
    return torch.erfc(_t(x)).numpy()


def tanh(x: np.ndarray) -> np.ndarray:
    return torch.tanh(_t(x)).numpy()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return torch.sigmoid(_t(x)).numpy()


def softplus(x: np.ndarray) -> np.ndarray:
    return F.softplus(_t(x)).numpy()
