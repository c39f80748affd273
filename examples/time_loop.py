"""Ask and tell inside a simulation's own time loop: at every time step, fit a distributed
parameter field to that step's observations with ``hpcqn.Minimizer``, warm-started from
the previous step's fit, then advance the simulation with it.

The simulation is a 1-D reaction-diffusion equation on ``n`` cells split over the ranks,

    u_next = u + dt (D lap(u) - k u),

whose reaction rate ``k(x) >= 0`` is unknown. Observations of ``u_next`` come from a run
with the true ``k`` (a twin experiment, with noise). At each step the code minimises

    J(k) = 1/2 sum_i (u_i + dt (D lap(u)_i - k_i u_i) - obs_i)^2
           + alpha/2 sum_i (k_{i+1} - k_i)^2            subject to k >= 0

over its slice of ``k``: the smoothing term couples neighbouring cells, so every
evaluation exchanges a ghost cell of ``k`` with each neighbouring rank, as the simulation
does for ``u``. The loop is the simulation's: hpcqn never calls it, it only asks for the
next ``k`` to try and is told ``J`` and its gradient.

    python examples/time_loop.py
    mpiexec -n 4 python examples/time_loop.py --cells 20000 --steps 200
    mpiexec -n 2 python examples/time_loop.py --short --check    # what CI runs

``--check`` also solves the last step's fit on rank 0 with SciPy's L-BFGS-B over the whole
field and prints the largest difference.
"""

from __future__ import annotations

import argparse

import numpy as np
from mpi4py import MPI

import hpcqn

D, DT, ALPHA, NOISE = 1e-3, 0.1, 1e-4, 1e-4


class Cells:
    """``n`` cells of [0, 1] in contiguous slices over the ranks of ``comm``, with a ghost
    cell from each neighbour (zero-flux ends)."""

    def __init__(self, n: int, comm: MPI.Comm):
        self.n, self.comm = n, comm
        rank, size = comm.Get_rank(), comm.Get_size()
        bounds = np.linspace(0, n, size + 1).round().astype(int)
        self.mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
        self.left = rank - 1 if rank > 0 else MPI.PROC_NULL
        self.right = rank + 1 if rank < size - 1 else MPI.PROC_NULL
        self.x = (np.arange(n)[self.mine] + 0.5) / n

    def with_ghosts(self, v: np.ndarray) -> np.ndarray:
        """``v`` with one ghost cell on each side (a copy of the end cell at the ends of
        the domain: zero flux). Collective: every rank calls it."""
        padded = np.empty(v.size + 2)
        padded[1:-1] = v
        left, right = np.empty(1), np.empty(1)
        mine_first = v[:1] if v.size else np.zeros(1)
        mine_last = v[-1:] if v.size else np.zeros(1)
        self.comm.Sendrecv(np.ascontiguousarray(mine_first), dest=self.left, recvbuf=right,
                           source=self.right)
        self.comm.Sendrecv(np.ascontiguousarray(mine_last), dest=self.right, recvbuf=left,
                           source=self.left)
        padded[0] = left[0] if self.left != MPI.PROC_NULL else padded[1]
        padded[-1] = right[0] if self.right != MPI.PROC_NULL else padded[-2]
        return padded

    def laplacian(self, u: np.ndarray) -> np.ndarray:
        padded = self.with_ghosts(u)
        return (padded[:-2] - 2.0 * padded[1:-1] + padded[2:]) * self.n**2


def true_rate(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 3.0 * np.sin(2.0 * np.pi * x))


def step(u: np.ndarray, lap: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The simulation's time step."""
    return u + DT * (D * lap - k * u)


def misfit(cells: Cells, u: np.ndarray, lap: np.ndarray, obs: np.ndarray):
    """``fun(k_local) -> (this rank's share of J, its slice of dJ/dk)``."""

    def fun(k: np.ndarray) -> tuple[float, np.ndarray]:
        residual = step(u, lap, k) - obs
        padded = cells.with_ghosts(k)                       # collective: the ghost cells
        right_differences = padded[2:] - padded[1:-1]        # k_{i+1} - k_i
        if cells.right == MPI.PROC_NULL and k.size:
            right_differences[-1] = 0.0                      # no cell beyond the last
        share = 0.5 * residual @ residual + 0.5 * ALPHA * right_differences @ right_differences
        smoothing = ALPHA * (2.0 * padded[1:-1] - padded[:-2] - padded[2:])
        return share, -DT * u * residual + smoothing

    return fun


def observation(cells: Cells, u_true: np.ndarray, lap_true: np.ndarray, t: int) -> np.ndarray:
    """The true next state with noise (drawn for the whole field, so that every rank count
    sees the same observations)."""
    noise = np.random.default_rng(t).standard_normal(cells.n)[cells.mine]
    return step(u_true, lap_true, true_rate(cells.x)) + NOISE * noise


def scipy_fit(n: int, u: np.ndarray, lap: np.ndarray, obs: np.ndarray, k0: np.ndarray,
              gtol: float) -> np.ndarray:
    """One step's fit on one process with SciPy's L-BFGS-B (the whole field)."""
    import scipy.optimize

    result = scipy.optimize.minimize(misfit(Cells(n, MPI.COMM_SELF), u, lap, obs), k0,
                                     jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * n,
                                     options={"gtol": gtol, "ftol": 0.0, "maxiter": 10_000})
    return result.x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--gtol", type=float, default=1e-9)
    parser.add_argument("--short", action="store_true", help="a small run (CI)")
    parser.add_argument("--check", action="store_true",
                        help="compare the last fit with SciPy's L-BFGS-B on rank 0")
    args = parser.parse_args()
    n, steps = (100, 5) if args.short else (args.cells, args.steps)

    comm = MPI.COMM_WORLD
    cells = Cells(n, comm)
    u = 1.0 + 0.5 * np.cos(2.0 * np.pi * cells.x)       # the simulation's state
    u_true = u.copy()                                    # the twin that makes observations
    k = np.zeros_like(u)                                 # the first fit starts from k = 0
    options = {"gtol": args.gtol, "ftol": 0.0, "maxiter": 10_000}
    iterations = 0
    for t in range(steps):
        lap, lap_true = cells.laplacian(u), cells.laplacian(u_true)
        obs = observation(cells, u_true, lap_true, t)
        fun = misfit(cells, u, lap, obs)
        start = k.copy()
        solver = hpcqn.Minimizer(k, comm=comm, bounds=(0.0, np.inf), options=options)
        while not solver.done:
            trial = solver.ask()                         # this rank's slice of k to try
            try:
                share, gradient = fun(trial)
            except Exception as exc:
                solver.fail(exc)                         # every rank raises, none waits
            solver.tell(share, gradient)                 # collective
        fit = solver.result()
        k = fit.x.copy()                                 # warm start for the next step
        iterations += fit.nit
        last_fit = (u, lap, obs, start)                  # kept for --check
        u, u_true = step(u, lap, k), step(u_true, lap_true, true_rate(cells.x))
        error = hpcqn.gather_global(k - true_rate(cells.x), comm)
        if comm.Get_rank() == 0:
            print(f"step {t + 1}: {fit.nit} iterations, J {fit.fun:.6e}, "
                  f"{fit.nactive} cells at k = 0, max|k - k_true| {np.max(np.abs(error)):.3e}")
    if comm.Get_rank() == 0:
        print(f"result: steps={steps} iterations={iterations} J={fit.fun:.12e} "
              f"k_error={np.max(np.abs(error)):.12e}")
    if args.check:  # the last step's fit again, on one process, by SciPy
        whole = [hpcqn.gather_global(v, comm) for v in (*last_fit, k)]
        if comm.Get_rank() == 0:
            u_last, lap_last, obs_last, start_last, k_last = whole
            reference = scipy_fit(n, u_last, lap_last, obs_last, start_last, args.gtol)
            difference = np.max(np.abs(k_last - reference))
            print(f"check: max_difference={difference:.3e} (the largest |k - k_scipy|)")


if __name__ == "__main__":
    main()
