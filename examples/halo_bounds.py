"""A bound-constrained finite-difference problem split over MPI ranks, solved with
``hpcqn.minimize``: the obstacle problem on the unit square.

    minimise  1/2 sum over grid edges (u_i - u_j)^2  -  h^2 sum_i f_i u_i
    subject to u >= obstacle,  u = 0 on the boundary

(the 5-point discretisation of 1/2 int |grad u|^2 - f u). A membrane pushed down by the
load ``f`` rests on an obstacle where they touch: the variables at the lower bound.

Each rank owns a band of grid rows. Every evaluation exchanges one ghost row with each
neighbouring rank (``Sendrecv``), applies the 5-point stencil to its band and returns its
share of the energy and its slice of the gradient; hpcqn sums the shares and does the
rest. Copy this file and replace ``Grid``'s stencil and ``load``/``obstacle`` with your
own discretisation.

    python examples/halo_bounds.py
    mpiexec -n 4 python examples/halo_bounds.py --nx 512
    mpiexec -n 2 python examples/halo_bounds.py --short --check   # what CI runs

``--check`` also solves the whole grid on rank 0 with SciPy's L-BFGS-B and prints the
largest difference between the two solutions.
"""

from __future__ import annotations

import argparse

import numpy as np
from mpi4py import MPI

import hpcqn


class Grid:
    """The interior ``nx x nx`` grid of the unit square (spacing ``h = 1 / (nx + 1)``),
    rows split into contiguous bands over the ranks of ``comm``."""

    def __init__(self, nx: int, comm: MPI.Comm):
        self.nx, self.comm = nx, comm
        rank, size = comm.Get_rank(), comm.Get_size()
        bounds = np.linspace(0, nx, size + 1).round().astype(int)
        self.rows = slice(int(bounds[rank]), int(bounds[rank + 1]))
        self.n_rows = self.rows.stop - self.rows.start
        self.h = 1.0 / (nx + 1)
        # the neighbours above and below (PROC_NULL at the boundary: ghosts stay zero)
        self.up = rank - 1 if rank > 0 else MPI.PROC_NULL
        self.down = rank + 1 if rank < size - 1 else MPI.PROC_NULL
        coordinates = (np.arange(nx) + 1) * self.h
        self.y, self.x = np.meshgrid(coordinates[self.rows], coordinates, indexing="ij")

    def laplacian(self, u_local: np.ndarray) -> np.ndarray:
        """``A u`` on this rank's band: 4 u_ij minus the four neighbours (zero outside the
        square), with one ghost row from each neighbouring rank."""
        u = u_local.reshape(self.n_rows, self.nx)
        padded = np.zeros((self.n_rows + 2, self.nx + 2))
        padded[1:-1, 1:-1] = u
        ghost_above, ghost_below = np.zeros(self.nx), np.zeros(self.nx)
        # send my first row up and receive the row above; then the same downwards
        self.comm.Sendrecv(np.ascontiguousarray(u[0]) if self.n_rows else ghost_above,
                           dest=self.up, recvbuf=ghost_below, source=self.down)
        self.comm.Sendrecv(np.ascontiguousarray(u[-1]) if self.n_rows else ghost_below,
                           dest=self.down, recvbuf=ghost_above, source=self.up)
        padded[0, 1:-1], padded[-1, 1:-1] = ghost_above, ghost_below
        result = (4.0 * padded[1:-1, 1:-1] - padded[:-2, 1:-1] - padded[2:, 1:-1]
                  - padded[1:-1, :-2] - padded[1:-1, 2:])
        return result.reshape(-1)


def load(grid: Grid) -> np.ndarray:
    """The downward force, this rank's slice."""
    return np.full(grid.x.size, -8.0)


def obstacle(grid: Grid) -> np.ndarray:
    """A ridge the membrane rests on, this rank's slice."""
    ridge = 0.1 - 4.0 * (grid.x - 0.5) ** 2 - 0.5 * np.abs(grid.y - 0.5)
    return ridge.reshape(-1)


def energy(grid: Grid):
    """``fun(u_local) -> (this rank's share of the energy, its slice of the gradient)``."""
    f = load(grid)

    def fun(u: np.ndarray) -> tuple[float, np.ndarray]:
        au = grid.laplacian(u)                      # collective: every rank calls it
        share = 0.5 * float(u @ au) - grid.h**2 * float(f @ u)
        return share, au - grid.h**2 * f

    return fun


def scipy_reference(nx: int, gtol: float) -> np.ndarray:
    """The same problem on one process with SciPy's L-BFGS-B (the whole grid)."""
    import scipy.optimize

    whole = Grid(nx, MPI.COMM_SELF)
    result = scipy.optimize.minimize(
        energy(whole), np.zeros(nx * nx), jac=True, method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(obstacle(whole), np.inf),
        options={"gtol": gtol, "ftol": 0.0, "maxiter": 100_000, "maxfun": 100_000})
    return result.x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nx", type=int, default=256, help="interior grid points per side")
    parser.add_argument("--gtol", type=float, default=1e-8)
    parser.add_argument("--short", action="store_true", help="a small grid (CI)")
    parser.add_argument("--check", action="store_true",
                        help="compare with SciPy's L-BFGS-B on rank 0 (small grids)")
    args = parser.parse_args()
    nx = 40 if args.short else args.nx

    comm = MPI.COMM_WORLD
    grid = Grid(nx, comm)
    res = hpcqn.minimize(energy(grid), np.zeros(grid.x.size), comm=comm,
                         bounds=(obstacle(grid), np.inf),
                         options={"gtol": args.gtol, "ftol": 0.0, "maxiter": 100_000,
                                  "maxfun": 100_000})
    u = hpcqn.gather_global(res.x, comm)              # the whole grid, for the check
    if comm.Get_rank() == 0:
        print(f"{nx}x{nx} grid on {comm.Get_size()} rank(s): {res.message}")
        print(f"result: f={res.fun:.12e} nit={res.nit} nfev={res.nfev} "
              f"nactive={res.nactive} seconds={res.seconds:.3f}")
        if args.check:
            difference = np.max(np.abs(u - scipy_reference(nx, args.gtol)))
            print(f"check: max_difference={difference:.3e} (the largest |u - u_scipy|)")


if __name__ == "__main__":
    main()
