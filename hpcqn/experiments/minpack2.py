"""Two bound-constrained membrane problems on the unit square, distributed by grid rows.

* :class:`ElasticPlasticTorsion` is MINPACK-2's ``dtorfg`` (``deptfg`` in the
  distribution): the stress potential of a twisted bar,
  ``q(v) = 1/2 int |grad v|^2 - c int v`` with ``|v| <= dist(z, boundary)``; ``c = 5`` by
  default, started from MINPACK-2's ``'XS'`` point ``v = dist(z, boundary)`` (the upper
  bound).
* :class:`Obstacle` is the obstacle problem of the same family: an elastic membrane
  pushed up by a constant force ``c = 1`` (``q(v) = 1/2 int |grad v|^2 - c int v``)
  between the obstacles ``vL = (sin(9.2 x) sin(9.3 y))^3`` and
  ``vU = (sin(9.2 x) sin(9.3 y))^2 + 0.2``, started from ``clip(0, vL, vU)``. The files of
  MINPACK-2's ``tprobs`` hold no obstacle routine; these formulas are those of the
  obstacle model of MCPLIB (Dirkse and Ferris, Optim. Methods Softw. 5, 1995), which
  uses the same triangulation and force (the offset of ``vU`` is a parameter).

Both use piecewise-linear finite elements on MINPACK-2's triangulation: ``nx * ny``
interior grid points ``z_ij = (i hx, j hy)``, ``hx = 1/(nx+1)``, ``hy = 1/(ny+1)``, zero
on the boundary, each grid cell cut into a lower triangle ``(i,j), (i+1,j), (i,j+1)``
and an upper triangle ``(i+1,j+1), (i,j+1), (i+1,j)``. The unknown ``v`` is ordered
as MINPACK-2 orders it (``k = nx*(j-1) + i``: ``i`` fastest), i.e. grid rows ``j`` one
after the other. Summed over the triangles, the element integrals give

    f(v) = hx hy [ 1/2 (sum (dv/dx)^2 + sum (dv/dy)^2) - c sum v ]

(every horizontal or vertical edge difference belongs to two triangles of area
``hx hy / 2``; every interior node to six triangles, each of which integrates ``v`` to
``area/3`` times its vertex sum) and ``g = hx hy (-Lap_h v - c)``, with ``Lap_h`` the
five-point Laplacian: the code evaluates that assembled form, vectorised (the tests
check it against an element-by-element loop). Note that ``g`` scales with the cell area
``hx hy``: absolute gradient tolerances do not carry over between grid sizes.

:meth:`Membrane.distributed` cuts the unknown by whole grid rows over the ranks of a
communicator (uneven splits allowed; a rank may own no row) and returns a callback that
exchanges one halo row with each neighbouring rank (``Sendrecv`` on the underlying
mpi4py communicator; no MPI at all on one rank).

The module imports nothing but NumPy at load time (hpcqn's communicator and layout only
inside :meth:`Membrane.distributed` and :meth:`Membrane.layout`), so that a script outside
hpcqn's environment can load this file by path and evaluate the same objective: the
TAO comparison (``benchmarks/tao_solve.py``, NumPy and petsc4py only) calls
:meth:`Membrane.block` with its own halo exchange.

Source: B. M. Averick, R. G. Carter, J. J. Moré and G.-L. Xue, "The MINPACK-2 test
problem collection", Argonne preprint MCS-P153-0692 (1992).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Fun = Callable[[Any], tuple[float, np.ndarray]]
Local = tuple[Fun, np.ndarray, np.ndarray, np.ndarray]  # (fun, x0, lo, hi) of this rank

# Message tags of the halo exchange: a row travelling to the next rank, to the previous.
TAG_UP, TAG_DOWN = 7301, 7302


class Membrane:
    """``q(v) = 1/2 int |grad v|^2 - c int v`` on an ``nx x ny`` interior grid of the unit
    square, zero on the boundary, between bounds the subclass defines."""

    name = ""

    def __init__(self, nx: int, ny: int | None = None, c: float = 1.0):
        ny = nx if ny is None else ny
        if int(nx) != nx or int(ny) != ny or nx < 1 or ny < 1:
            raise ValueError(f"nx and ny must be positive integers, got nx={nx}, ny={ny}")
        self.nx, self.ny = int(nx), int(ny)
        self.n = self.nx * self.ny
        self.hx, self.hy = 1.0 / (self.nx + 1), 1.0 / (self.ny + 1)
        self.c = float(c)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nx={self.nx}, ny={self.ny}, c={self.c:g})"

    # -- geometry --------------------------------------------------------------------
    def coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """The x and y coordinates of the interior grid points, as two ``(ny, nx)``
        arrays (row ``j - 1`` holds grid row ``j``)."""
        x = self.hx * np.arange(1, self.nx + 1, dtype=np.float64)
        y = self.hy * np.arange(1, self.ny + 1, dtype=np.float64)
        return np.broadcast_to(x, (self.ny, self.nx)), np.broadcast_to(y[:, None],
                                                                      (self.ny, self.nx))

    def boundary_distance(self) -> np.ndarray:
        """``dist(z_ij, boundary of the unit square)`` as MINPACK-2 computes it,
        ``min(min(i, nx-i+1) hx, min(j, ny-j+1) hy)``, as a whole vector."""
        i = np.arange(1, self.nx + 1)
        j = np.arange(1, self.ny + 1)
        dx = np.minimum(i, self.nx - i + 1) * self.hx
        dy = np.minimum(j, self.ny - j + 1) * self.hy
        return np.minimum(dx[None, :], dy[:, None]).ravel()

    # -- what the subclasses define ----------------------------------------------------
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)``, whole vectors."""
        raise NotImplementedError

    def x0(self) -> np.ndarray:
        """The standard starting point, a whole vector."""
        raise NotImplementedError

    # -- the objective -----------------------------------------------------------------
    def block(self, x: Any, below: np.ndarray, above: np.ndarray,
              last: bool) -> tuple[float, np.ndarray]:
        """This block of whole grid rows' part of ``f`` and its gradient, given the grid
        row just below the block and the one just above (zeros at the boundary).

        The part holds every horizontal difference of the block's rows, the vertical
        difference of each row with the row below it, and, when ``last`` (the block
        ends at the top boundary), the difference of its top row with the boundary: over
        blocks that tile the grid, every difference is counted once."""
        nx, hx, hy = self.nx, self.hx, self.hy
        v = np.ascontiguousarray(x, dtype=np.float64).reshape(-1, nx)
        rows = v.shape[0]
        # Horizontal differences, boundary columns included: (rows, nx + 1).
        ddx = np.empty((rows, nx + 1))
        ddx[:, 0] = v[:, 0]
        np.subtract(v[:, 1:], v[:, :-1], out=ddx[:, 1:-1])
        ddx[:, -1] = -v[:, -1]
        # Vertical differences, the halo rows included: (rows + 1, nx).
        ddy = np.empty((rows + 1, nx))
        ddy[0] = v[0] - below
        np.subtract(v[1:], v[:-1], out=ddy[1:-1])
        ddy[-1] = above - v[-1]
        counted = ddy if last else ddy[:-1]
        quadratic = (np.vdot(ddx, ddx) / hx**2 + np.vdot(counted, counted) / hy**2)
        area = hx * hy
        f = area * (0.5 * quadratic - self.c * v.sum())
        g = (ddx[:, :-1] - ddx[:, 1:]) * (area / hx**2)
        g += (ddy[:-1] - ddy[1:]) * (area / hy**2)
        g -= area * self.c
        return float(f), g.ravel()

    def fun_and_grad(self, v: Any) -> tuple[float, np.ndarray]:
        """``(f(v), grad f(v))`` for a whole vector ``v`` (serial)."""
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (self.n,):
            raise ValueError(f"{self.name}: v must have shape ({self.n},), got {v.shape}")
        zero = np.zeros(self.nx)
        return self.block(v, zero, zero, True)

    # -- distribution ----------------------------------------------------------------
    def row_counts(self, nranks: int) -> tuple[int, ...]:
        """Grid rows per rank for an even split (the first ``ny % nranks`` ranks one more;
        ranks beyond ``ny`` none)."""
        from ..layout import SliceLayout

        return SliceLayout.even(self.ny, nranks).counts

    def layout(self, nranks: int, rows: Sequence[int] | None = None) -> Any:
        """The :class:`~hpcqn.layout.SliceLayout` of the unknown for ``rows`` grid rows
        per rank (default :meth:`row_counts`)."""
        from ..layout import SliceLayout

        counts = tuple(int(r) for r in (self.row_counts(nranks) if rows is None else rows))
        if len(counts) != nranks or sum(counts) != self.ny or min(counts) < 0:
            raise ValueError(f"{self.name}: rows {counts} do not split {self.ny} grid rows "
                             f"over {nranks} ranks")
        return SliceLayout(tuple(r * self.nx for r in counts))

    def distributed(self, comm: Any = None, rows: Sequence[int] | None = None) -> Local:
        """``(fun, x0, lo, hi)`` for this rank of ``comm``: ``x0``, ``lo`` and ``hi`` are
        this rank's slices (its whole grid rows, ``rows[rank]`` of them; every rank must
        pass the same ``rows``), ``fun(x_local) -> (f_part, g_local)`` with ``f_part``
        summed over ranks the objective. ``fun`` is collective among the ranks that own
        rows: each sends its bottom row to the previous such rank and its top row to
        the next one (two ``Sendrecv``); a rank with no row returns ``(0.0, [])``."""
        from ..comm import get_comm

        c = get_comm(comm)
        layout = self.layout(c.size, rows)
        counts = [count // self.nx for count in layout.counts]
        part = layout.local_slice(c.rank)
        lo, hi = (bound[part].copy() for bound in self.bounds())
        x0 = self.x0()[part].copy()
        mine = counts[c.rank]
        if mine == 0:
            def empty(x_local: Any) -> tuple[float, np.ndarray]:
                return 0.0, np.zeros(0)

            return empty, x0, lo, hi
        owners = [r for r, count in enumerate(counts) if count > 0]
        index = owners.index(c.rank)
        previous = owners[index - 1] if index > 0 else None
        following = owners[index + 1] if index + 1 < len(owners) else None
        below, above = np.zeros(self.nx), np.zeros(self.nx)  # stay zero at the boundary
        mpi = c.mpi_comm if c.size > 1 else None
        n_local = mine * self.nx
        name = self.name

        def fun(x_local: Any) -> tuple[float, np.ndarray]:
            x = np.ascontiguousarray(x_local, dtype=np.float64)
            if x.shape != (n_local,):
                raise ValueError(f"{name}: this rank's slice has {n_local} entries, got "
                                 f"shape {x.shape}")
            if mpi is not None:
                from mpi4py import MPI

                nobody = MPI.PROC_NULL
                up = nobody if following is None else following
                down = nobody if previous is None else previous
                v = x.reshape(mine, self.nx)
                mpi.Sendrecv(v[-1], dest=up, sendtag=TAG_UP,
                             recvbuf=below, source=down, recvtag=TAG_UP)
                mpi.Sendrecv(v[0], dest=down, sendtag=TAG_DOWN,
                             recvbuf=above, source=up, recvtag=TAG_DOWN)
            return self.block(x, below, above, following is None)

        return fun, x0, lo, hi


class ElasticPlasticTorsion(Membrane):
    """MINPACK-2's elastic-plastic torsion problem (``dtorfg``): ``c`` is the angle of
    twist per unit length; ``-dist(z, boundary) <= v <= dist(z, boundary)``."""

    name = "torsion"

    def __init__(self, nx: int, ny: int | None = None, c: float = 5.0):
        super().__init__(nx, ny, c)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        hi = self.boundary_distance()
        return -hi, hi

    def x0(self) -> np.ndarray:
        """MINPACK-2's ``'XS'``: ``v = dist(z, boundary)``."""
        return self.boundary_distance()


class Obstacle(Membrane):
    """The obstacle problem: force ``c`` (default 1) between ``vL = (sin(9.2 x) sin(9.3
    y))^3`` and ``vU = (sin(9.2 x) sin(9.3 y))^2 + offset`` (default offset 0.2)."""

    name = "obstacle"

    def __init__(self, nx: int, ny: int | None = None, c: float = 1.0, offset: float = 0.2):
        super().__init__(nx, ny, c)
        self.offset = float(offset)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.coordinates()
        s = (np.sin(9.2 * x) * np.sin(9.3 * y)).ravel()
        return s**3, s**2 + self.offset

    def x0(self) -> np.ndarray:
        """``clip(0, vL, vU)`` (the zero membrane, lifted onto the lower obstacle)."""
        lo, hi = self.bounds()
        return np.clip(np.zeros(self.n), lo, hi)


PROBLEMS: dict[str, type[Membrane]] = {"torsion": ElasticPlasticTorsion, "obstacle": Obstacle}


def make(name: str, nx: int, ny: int | None = None, **params: Any) -> Membrane:
    """A problem of this module by name (``"torsion"``, ``"obstacle"``)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(sorted(PROBLEMS))}")
    return PROBLEMS[name](nx, ny, **params)
