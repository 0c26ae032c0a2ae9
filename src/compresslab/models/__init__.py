"""Model zoo. Each model is a class or factory taking ``input_shape`` and ``num_classes``;
configs in ``conf/arch/`` name them with ``_target_`` and :func:`build_model` builds them."""

from compresslab.models.common import build_model
from compresslab.models.simple import CNN1D, MLP, ConvNet, LeNet5

__all__ = ["build_model", "MLP", "LeNet5", "ConvNet", "CNN1D"]
