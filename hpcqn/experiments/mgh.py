"""Moré, Garbow and Hillstrom's separable test functions, extended to n variables by
repeating a block of 2 or 4 variables: each function's value and gradient and its
standard starting point.

The functions are written against the array's own namespace (NumPy or CuPy): each takes a
1-D array of whole blocks and returns ``(f, g)`` with ``g`` of ``x``'s kind. A slice of
whole blocks is itself an instance of the function, so a rank evaluates its slice with
no communication (``f`` summed over ranks is the objective).

The module imports nothing but NumPy, so that a script outside hpcqn's environment can
load this file by path and evaluate the same objectives: the TAO comparison
(``benchmarks/tao_solve.py``, NumPy and petsc4py only). :mod:`hpcqn.experiments.problems`
wraps them as problem classes.

Source: J. J. Moré, B. S. Garbow and K. E. Hillstrom, "Testing unconstrained optimization
software", ACM TOMS 7 (1981), problems 21 (extended Rosenbrock), 22 (extended Powell
singular) and 14 (Wood, extended by repeating its block of four).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def extended_rosenbrock(x: Any) -> tuple[float, Any]:
    """``sum_i 100 (x_2i - x_2i-1^2)^2 + (1 - x_2i-1)^2``; minimiser 1."""
    odd, even = x[0::2], x[1::2]
    t = even - odd * odd
    u = 1.0 - odd
    g = x.copy()  # same namespace, dtype and shape
    g[0::2] = -400.0 * t * odd - 2.0 * u
    g[1::2] = 200.0 * t
    return float(100.0 * (t @ t) + u @ u), g


def extended_powell(x: Any) -> tuple[float, Any]:
    """Powell's singular function on each block of four; minimiser 0 (singular Hessian)."""
    x1, x2, x3, x4 = x[0::4], x[1::4], x[2::4], x[3::4]
    a, b, c, d = x1 + 10 * x2, x3 - x4, x2 - 2 * x3, x1 - x4
    f = a @ a + 5 * (b @ b) + (c * c) @ (c * c) + 10 * ((d * d) @ (d * d))
    g = x.copy()
    g[0::4] = 2 * a + 40 * d**3
    g[1::4] = 20 * a + 4 * c**3
    g[2::4] = 10 * b - 8 * c**3
    g[3::4] = -10 * b - 40 * d**3
    return float(f), g


def extended_wood(x: Any) -> tuple[float, Any]:
    """Wood's function on each block of four; minimiser 1."""
    x1, x2, x3, x4 = x[0::4], x[1::4], x[2::4], x[3::4]
    t1, t2 = x2 - x1 * x1, x4 - x3 * x3
    f = (
        100 * (t1 @ t1) + (1 - x1) @ (1 - x1) + 90 * (t2 @ t2) + (1 - x3) @ (1 - x3)
        + 10.1 * ((x2 - 1) @ (x2 - 1) + (x4 - 1) @ (x4 - 1)) + 19.8 * ((x2 - 1) @ (x4 - 1))
    )
    g = x.copy()
    g[0::4] = -400 * t1 * x1 - 2 * (1 - x1)
    g[1::4] = 200 * t1 + 20.2 * (x2 - 1) + 19.8 * (x4 - 1)
    g[2::4] = -360 * t2 * x3 - 2 * (1 - x3)
    g[3::4] = 180 * t2 + 20.2 * (x4 - 1) + 19.8 * (x2 - 1)
    return float(f), g


# Each function's block of variables and its starting block (repeated n / block times).
STARTS: dict[str, tuple[float, ...]] = {
    "extended_rosenbrock": (-1.2, 1.0),
    "extended_powell": (3.0, -1.0, 0.0, 1.0),
    "extended_wood": (-3.0, -1.0, -3.0, -1.0),
}
FUNCTIONS: dict[str, Callable[[Any], tuple[float, Any]]] = {
    "extended_rosenbrock": extended_rosenbrock,
    "extended_powell": extended_powell,
    "extended_wood": extended_wood,
}


def block_size(name: str) -> int:
    """How many variables one block of function ``name`` has."""
    return len(STARTS[name])


def start(name: str, n: int, dtype: Any = np.float64) -> np.ndarray:
    """The standard starting point of function ``name`` with ``n`` variables (a
    multiple of its block size)."""
    block = STARTS[name]
    if n % len(block):
        raise ValueError(f"{name} needs n divisible by {len(block)}, got {n}")
    return np.tile(np.array(block, dtype=dtype), n // len(block))
