"""The PyTorch bridge: mL-BFGS as a ``torch.optim.Optimizer`` working on the model's
memory through DLPack, MKOR / MKOR-H and K-FAC with shared layer hooks, and data-parallel
helpers over MPI (no ``torch.distributed``)."""

from .data import (
    GlobalBatches,
    NonFiniteParameterError,
    average_gradients,
    broadcast_parameters,
    check_same_parameters,
    shard,
)
from .kfac import KFAC
from .lamb import LAMB
from .mkor import MKOR
from .mlbfgs import MLBFGS, layer_blocks

__all__ = ["KFAC", "LAMB", "MKOR", "MLBFGS", "GlobalBatches", "NonFiniteParameterError",
           "average_gradients", "broadcast_parameters", "check_same_parameters",
           "layer_blocks", "shard"]
