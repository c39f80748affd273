"""The PyTorch bridge: mL-BFGS as a ``torch.optim.Optimizer`` working on the model's
memory through DLPack, and data-parallel helpers over MPI (no ``torch.distributed``)."""

from .data import GlobalBatches, average_gradients, broadcast_parameters, shard
from .optim import MLBFGS, layer_blocks

__all__ = ["MLBFGS", "GlobalBatches", "average_gradients", "broadcast_parameters",
           "layer_blocks", "shard"]
