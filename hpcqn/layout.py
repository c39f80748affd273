"""How a flat vector is cut across ranks.

:class:`SliceLayout` describes a vector that is distributed by contiguous slices, one
per rank in rank order (slices may differ in length and may be empty), as a
simulation code's distributed vector is. :class:`BlockLayout` cuts a vector into
blocks that the problem defines (network layers, fixed-size chunks) and gives each
block one owner rank.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True)
class BlockLayout:
    """A flat vector of ``n`` entries cut into blocks (in parameter order) that the problem
    defines, each block owned by one rank.

    Blocks never depend on the rank count; only ``owners`` does. The *rank-major* order
    lists rank 0's blocks (in block order), then rank 1's, ...: in that order one
    ``reduce_scatter`` hands every owner the sum of its blocks' gradients and one
    ``allgatherv`` hands every rank all updated blocks.
    """

    sizes: tuple[int, ...]
    owners: tuple[int, ...]
    nranks: int

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("a block layout needs at least one block")
        if any(int(s) != s or s < 1 for s in self.sizes):
            raise ValueError(f"block sizes must be positive integers, got {self.sizes}")
        if len(self.owners) != len(self.sizes) or any(
            not 0 <= o < self.nranks for o in self.owners
        ):
            raise ValueError(f"owners {self.owners} do not fit {len(self.sizes)} blocks "
                             f"on {self.nranks} ranks")

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], nranks: int) -> BlockLayout:
        """Owners by the greedy rule: largest block first, to the least-loaded rank
        (ties: the lower block id, then the lower rank)."""
        sizes = tuple(int(s) for s in sizes)
        load = [0] * int(nranks)
        owners = [0] * len(sizes)
        for block in sorted(range(len(sizes)), key=lambda b: (-sizes[b], b)):
            rank = min(range(nranks), key=lambda r: (load[r], r))
            owners[block] = rank
            load[rank] += sizes[block]
        return cls(sizes, tuple(owners), int(nranks))

    @classmethod
    def chunks(cls, n: int, chunk: int, nranks: int) -> BlockLayout:
        """Fixed-size chunks of a flat vector (the last one shorter)."""
        if chunk < 1 or n < 1:
            raise ValueError(f"need n >= 1 and chunk >= 1, got n={n}, chunk={chunk}")
        return cls.from_sizes([min(chunk, n - start) for start in range(0, n, chunk)], nranks)

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def nblocks(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each block starts in parameter order."""
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        return tuple(starts)

    def blocks_of(self, rank: int) -> list[int]:
        """The blocks ``rank`` owns, in block order."""
        return [b for b, owner in enumerate(self.owners) if owner == rank]

    @property
    def counts(self) -> tuple[int, ...]:
        """Entries each rank owns (its segment of the rank-major order)."""
        return tuple(sum(self.sizes[b] for b in self.blocks_of(r)) for r in range(self.nranks))

    def rank_major_blocks(self) -> list[int]:
        return [b for r in range(self.nranks) for b in self.blocks_of(r)]

    def segment_start(self, rank: int) -> int:
        """Where ``rank``'s segment starts in the rank-major order."""
        return sum(self.counts[:rank])

    def flag_positions(self) -> list[int]:
        """The flag slots of a rank-major buffer with ``flag_slots``: one after each
        rank's segment."""
        counts = self.counts
        return [sum(counts[: r + 1]) + r for r in range(self.nranks)]

    def to_rank_major(self, x: Any, out: Any, flag_slots: bool = False) -> Any:
        """Copy ``x`` (parameter order) into ``out`` (rank-major order); with
        ``flag_slots`` leave one slot free after each rank's segment (``out`` then has
        ``n + nranks`` entries)."""
        offsets, position = self.offsets, 0
        for r in range(self.nranks):
            for b in self.blocks_of(r):
                size = self.sizes[b]
                out[position : position + size] = x[offsets[b] : offsets[b] + size]
                position += size
            position += 1 if flag_slots else 0
        return out

    def from_rank_major(self, buffer: Any, out: Any) -> Any:
        """Copy ``buffer`` (rank-major order) into ``out`` (parameter order)."""
        offsets, position = self.offsets, 0
        for b in self.rank_major_blocks():
            size = self.sizes[b]
            out[offsets[b] : offsets[b] + size] = buffer[position : position + size]
            position += size
        return out

    def rank_sorted(self) -> tuple[BlockLayout, list[int]]:
        """The same blocks and owners renumbered so that parameter order IS rank-major
        order (owners non-decreasing), and for each new block its old id. A caller that
        lays its storage out this way needs no packing copies."""
        order = self.rank_major_blocks()
        return (
            BlockLayout(tuple(self.sizes[b] for b in order),
                        tuple(self.owners[b] for b in order), self.nranks),
            order,
        )
