"""How a flat vector is cut across ranks.

:class:`SliceLayout` describes a vector that is distributed by contiguous slices, one
per rank in rank order (slices may differ in length and may be empty), as a
simulation code's distributed vector is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .comm import Communicator, get_comm


@dataclass(frozen=True)
class SliceLayout:
    """Lengths of every rank's slice of a vector, in rank order."""

    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(c < 0 for c in self.counts):
            raise ValueError(f"slice lengths must be non-negative, got {self.counts}")

    @classmethod
    def even(cls, n: int, nranks: int) -> SliceLayout:
        """``n`` entries over ``nranks`` ranks, the first ``n % nranks`` one longer."""
        base, extra = divmod(int(n), int(nranks))
        return cls(tuple(base + (r < extra) for r in range(nranks)))

    @classmethod
    def from_local(cls, n_local: int, comm: Any = None) -> SliceLayout:
        """The layout of a vector whose local slice on this rank has ``n_local`` entries
        (collective: every rank calls it)."""
        return cls(tuple(get_comm(comm).allgather_counts(n_local)))

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def nranks(self) -> int:
        return len(self.counts)

    def start(self, rank: int) -> int:
        return sum(self.counts[:rank])

    def local_slice(self, rank: int) -> slice:
        start = self.start(rank)
        return slice(start, start + self.counts[rank])


def gather_global(x_local: Any, comm: Any = None) -> Any:
    """The whole distributed vector on every rank: the slices concatenated in rank order
    (collective)."""
    c: Communicator = get_comm(comm)
    return c.allgatherv(x_local)
