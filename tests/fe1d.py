"""A 1-D finite-element control problem whose conditioning depends on the inner product.

Source identification for -u'' = q on (0, 1), u(0) = u(1) = 0, with P1 elements on a
graded (non-uniform) mesh refined towards x = 1/3, where the target has a kink (see
:func:`graded_nodes`): with grading p the smallest elements are about N**-p long, the
largest about p / N, so h_max / h_min grows like N**(p-1) (2: about 1.33 N). The
refinement sits where the minimiser is large: a mesh (i / N)**2 graded towards x = 0,
where q* vanishes, shows a much weaker growth of the Euclidean iteration count
(measured with a plain L-BFGS with exact line searches: 36 to 48 iterations from N = 50
to 800, against 47 to 165 here), the error on its small elements carrying little L2
weight.
The control q and the state u are the nodal values at the N - 1 interior nodes. With
the stiffness matrix K and the mass matrix M (consistent, or lumped: diagonal),
S = K^{-1} M is the discrete solution operator and

    J(q) = 1/2 (S q - d)' M (S q - d) + alpha/2 q' M q,

a discretisation of 1/2 ||u(q) - d||_{L2}^2 + alpha/2 ||q||_{L2}^2 (d: the nodal
interpolant of a fixed target function). J is quadratic with Hessian
H = M K^{-1} M K^{-1} M + alpha M.

* Its Euclidean derivative g = dJ/dq = M K^{-1} M (S q - d) + alpha M q is a *dual*
  vector (M times a function): in the Euclidean inner product the Hessian's spectrum
  follows M's, whose eigenvalues scale like the local element sizes, so its condition
  number grows like h_max / h_min and L-BFGS needs more iterations on finer meshes.
* In the L2 inner product <u, v> = u' M v the gradient is the Riesz representer
  M^{-1} g and the Hessian M^{-1} H = K^{-1} M K^{-1} M + alpha I is the identity times
  alpha plus a compact operator: its spectrum, and the iteration count, do not depend on
  the mesh. The same holds with the Euclidean product and the initial inverse Hessian
  H0 = M^{-1} (consistent or lumped: both are spectrally equivalent to M^{-1}, uniformly
  in h).

The exact minimiser solves H q = M K^{-1} M d; :meth:`FE1D.solution` computes it by a
dense float64 solve of the equivalent (K^{-1} M K^{-1} M + alpha I) q = K^{-1} M d, an
independent reference for the iterative runs.

:class:`DistributedFE1D` splits the unknowns into contiguous slices over the ranks of a
communicator and uses the lumped (diagonal) mass matrix everywhere, so that H0 and the
inner product are local to each rank. The solve with K couples all nodes; each rank
gathers the whole q (one allgatherv per evaluation), evaluates the whole objective
redundantly and returns the *global* f together with its own slice of the gradient:
minimize it with the option ``fun_global=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

import hpcqn
from hpcqn.layout import SliceLayout

CENTRE = 1.0 / 3.0  # where the mesh is refined and the target has a kink


def graded_nodes(n_elements: int, grading: float, centre: float = CENTRE) -> np.ndarray:
    """The N + 1 nodes of a mesh of [0, 1] refined towards the node ``centre``: round(N c)
    elements on [0, c] and the rest on [c, 1], each side graded by a power law,
    c - c (1 - i / N_left)**grading and c + (1 - c) (j / N_right)**grading. The elements
    next to c are about N**-grading long, those at the ends about grading / N
    (grading 1: a uniform mesh)."""
    n_left = max(1, min(n_elements - 1, round(n_elements * centre)))
    n_right = n_elements - n_left
    left = centre - centre * (1.0 - np.arange(n_left) / n_left) ** grading
    right = centre + (1.0 - centre) * (np.arange(n_right + 1) / n_right) ** grading
    return np.concatenate([left, right])


def target(x: np.ndarray) -> np.ndarray:
    """The observed state d(x): continuous, zero at both ends, with a kink at x = CENTRE
    (where the mesh is refined)."""
    c = CENTRE
    return np.sin(np.pi * x) + 0.5 * (np.abs(x - c) - c - (1.0 - 2.0 * c) * x)


def assemble(nodes: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """P1 stiffness K and consistent mass M (scipy.sparse CSC, interior nodes only) and
    the lumped mass (its diagonal, the row sums of the full consistent mass)."""
    h = np.diff(nodes)
    n = nodes.size - 2  # interior nodes
    # Interior node i (1..N-1) touches elements i-1 (length h[i-1]) and i (length h[i]).
    left, right = h[:-1], h[1:]
    k_diag = 1.0 / left + 1.0 / right
    k_off = -1.0 / h[1:-1]
    m_diag = (left + right) / 3.0
    m_off = h[1:-1] / 6.0
    stiffness = scipy.sparse.diags([k_off, k_diag, k_off], [-1, 0, 1], shape=(n, n),
                                   format="csc")
    mass = scipy.sparse.diags([m_off, m_diag, m_off], [-1, 0, 1], shape=(n, n),
                              format="csc")
    lumped = (left + right) / 2.0
    return stiffness, mass, lumped


class FE1D:
    """The control problem on N elements (N - 1 unknowns), serial.

    ``lumped`` selects the mass matrix of the *objective* (consistent by default). The
    operators offered for the solver: :attr:`mass` (scipy.sparse), :meth:`mass_inverse`
    (M^{-1}, sparse LU factorised once), :meth:`lumped_mass_inverse`, :meth:`inner`
    (u' M v) and the two callbacks :meth:`value_and_grad` (Euclidean gradient) and
    :meth:`value_and_riesz_grad` (gradient in the M inner product, M^{-1} g).
    """

    def __init__(self, n_elements: int, alpha: float = 1e-3, grading: float = 2.0,
                 lumped: bool = False):
        self.n_elements = int(n_elements)
        self.alpha = float(alpha)
        self.nodes = graded_nodes(self.n_elements, grading)
        self.h = np.diff(self.nodes)
        self.stiffness, consistent, self.lumped_diagonal = assemble(self.nodes)
        self.lumped = bool(lumped)
        self.mass = (scipy.sparse.diags(self.lumped_diagonal, format="csc") if lumped
                     else consistent)
        self.n = self.nodes.size - 2
        self.d = target(self.nodes[1:-1])
        self._k_lu = scipy.sparse.linalg.splu(self.stiffness)
        self._m_lu = scipy.sparse.linalg.splu(self.mass)
        self._solution: np.ndarray | None = None

    @property
    def mesh_ratio(self) -> float:
        """h_max / h_min."""
        return float(self.h.max() / self.h.min())

    def x0(self) -> np.ndarray:
        return np.zeros(self.n)

    def state(self, q: np.ndarray) -> np.ndarray:
        """u = S q = K^{-1} M q."""
        return self._k_lu.solve(self.mass @ q)

    def value_and_grad(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        """J(q) and its Euclidean derivative dJ/dq (a dual vector)."""
        q = np.asarray(q, dtype=np.float64)
        r = self.state(q) - self.d
        mr = self.mass @ r
        mq = self.mass @ q
        f = 0.5 * float(r @ mr) + 0.5 * self.alpha * float(q @ mq)
        # S' M r = M K^{-1} M r (K and M symmetric).
        g = self.mass @ self._k_lu.solve(mr) + self.alpha * mq
        return f, g

    def value_and_riesz_grad(self, q: np.ndarray) -> tuple[float, np.ndarray]:
        """J(q) and its gradient in the M inner product, M^{-1} dJ/dq."""
        f, g = self.value_and_grad(q)
        return f, self.mass_inverse(g)

    def mass_inverse(self, v: np.ndarray) -> np.ndarray:
        """M^{-1} v (M: the objective's mass matrix)."""
        return self._m_lu.solve(np.asarray(v, dtype=np.float64))

    def lumped_mass_inverse(self, v: np.ndarray) -> np.ndarray:
        """M_L^{-1} v, M_L the lumped (diagonal) mass matrix."""
        return np.asarray(v, dtype=np.float64) / self.lumped_diagonal

    def inner(self, u: np.ndarray, v: np.ndarray) -> float:
        """<u, v> = u' M v, the discrete L2 inner product."""
        return float(u @ (self.mass @ v))

    def dual_norm(self, g: np.ndarray) -> float:
        """||g||_{M^{-1}} = sqrt(g' M^{-1} g): the L2 norm of the Riesz gradient, a
        mesh-independent size of a Euclidean derivative."""
        return float(np.sqrt(g @ self.mass_inverse(g)))

    def m_norm(self, v: np.ndarray) -> float:
        return float(np.sqrt(v @ (self.mass @ v)))

    def hessian(self) -> np.ndarray:
        """The dense Hessian M K^{-1} M K^{-1} M + alpha M (float64)."""
        m = self.mass.toarray()
        km = np.linalg.solve(self.stiffness.toarray(), m)  # K^{-1} M
        return m @ km @ km + self.alpha * m

    def solution(self) -> np.ndarray:
        """The exact minimiser: (K^{-1} M K^{-1} M + alpha I) q = K^{-1} M d, dense float64
        LU (H q = M K^{-1} M d divided by M on the left)."""
        if self._solution is None:
            km = np.linalg.solve(self.stiffness.toarray(), self.mass.toarray())
            a = km @ km + self.alpha * np.eye(self.n)
            self._solution = np.linalg.solve(a, km @ self.d)
        return self._solution

    def relative_error(self, q: np.ndarray) -> float:
        """||q - q*||_M / ||q*||_M."""
        q_star = self.solution()
        return self.m_norm(q - q_star) / self.m_norm(q_star)


class DistributedFE1D:
    """The lumped-mass problem with its unknowns split by contiguous slices over the
    ranks of ``comm`` (``layout``: a :class:`hpcqn.layout.SliceLayout`, by default even).

    Every callback runs on every rank at the same time. :meth:`value_and_grad` and
    :meth:`value_and_riesz_grad` gather q (one allgatherv), evaluate the whole objective
    redundantly and return the global f (the same bits on every rank: use the option
    ``fun_global=True``) and this rank's slice of the gradient. :meth:`mass_inverse`
    (H0) and :meth:`inner` are local (the lumped mass is diagonal); ``inner`` returns
    this rank's part of the sum, which the solver adds up over the ranks.
    """

    def __init__(self, n_elements: int, comm: Any = None, layout: SliceLayout | None = None,
                 alpha: float = 1e-3, grading: float = 2.0):
        self.comm = hpcqn.get_comm(comm)
        self.problem = FE1D(n_elements, alpha=alpha, grading=grading, lumped=True)
        n = self.problem.n
        self.layout = layout if layout is not None else SliceLayout.even(n, self.comm.size)
        if self.layout.n != n or self.layout.nranks != self.comm.size:
            raise ValueError(f"layout {self.layout.counts} does not split {n} unknowns "
                             f"over {self.comm.size} ranks")
        self.part = self.layout.local_slice(self.comm.rank)
        self.mass_local = self.problem.lumped_diagonal[self.part]

    def x0(self) -> np.ndarray:
        return self.problem.x0()[self.part].copy()

    def gather(self, q_local: np.ndarray) -> np.ndarray:
        return np.asarray(self.comm.allgatherv(np.ascontiguousarray(q_local, np.float64),
                                               list(self.layout.counts)))

    def value_and_grad(self, q_local: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = self.problem.value_and_grad(self.gather(q_local))
        return f, g[self.part].copy()

    def value_and_riesz_grad(self, q_local: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = self.value_and_grad(q_local)
        return f, g / self.mass_local

    def mass_inverse(self, v_local: np.ndarray) -> np.ndarray:
        return np.asarray(v_local, dtype=np.float64) / self.mass_local

    def inner(self, u_local: np.ndarray, v_local: np.ndarray) -> float:
        return float(u_local @ (self.mass_local * v_local))
