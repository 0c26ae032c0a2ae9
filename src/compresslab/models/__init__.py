"""Model zoo. Each model is a class or factory taking ``input_shape`` and ``num_classes``;
configs in ``conf/arch/`` name them with ``_target_`` and :func:`build_model` builds them.
``__all__`` lists exactly those factories (the allowlist test checks it); the LM wrapper
``compresslab.models.lm.CausalLM`` is not one (the factories return it)."""

from compresslab.models.common import build_model
from compresslab.models.lm import gpt2_lm, hf_causal_lm, llama_lm
from compresslab.models.mobilenetv2 import MobileNetV2
from compresslab.models.resnet_cifar import CifarResNet, resnet8x4, resnet32x4
from compresslab.models.simple import CNN1D, MLP, ConvNet, LeNet5
from compresslab.models.tv import torchvision_model
from compresslab.models.vgg import VGG
from compresslab.models.vit import DeiT, ViT
from compresslab.models.wrn import WideResNet

__all__ = [
    "build_model",
    "MLP",
    "LeNet5",
    "ConvNet",
    "CNN1D",
    "CifarResNet",
    "resnet8x4",
    "resnet32x4",
    "WideResNet",
    "VGG",
    "MobileNetV2",
    "torchvision_model",
    "ViT",
    "DeiT",
    "llama_lm",
    "gpt2_lm",
    "hf_causal_lm",
]
