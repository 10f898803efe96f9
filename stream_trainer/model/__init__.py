"""Network builders taking a norm name per layer, and in-place growth of their widths."""

from stream_trainer.model.growth import grow_linear_
from stream_trainer.model.mlp import ACTIVATIONS, StreamMLP

__all__ = ["ACTIVATIONS", "StreamMLP", "grow_linear_"]
