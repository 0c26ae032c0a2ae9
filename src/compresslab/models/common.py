"""Helpers shared by the model definitions, and the safe model builder."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from compresslab.allowlist import Allowlist, with_module_aliases
from compresslab.errors import ConfigError
from compresslab.models.attention import explicit_attention

#: The model factories an arch spec may name: defining module -> names defined there.
#: Each is accepted as ``compresslab.models.<Name>`` and as ``<defining module>.<Name>``.
MODEL_DEFINITIONS = {
    "compresslab.models.simple": ("MLP", "LeNet5", "ConvNet", "CNN1D"),
    "compresslab.models.resnet_cifar": ("CifarResNet", "resnet8x4", "resnet32x4"),
    "compresslab.models.wrn": ("WideResNet",),
    "compresslab.models.vgg": ("VGG",),
    "compresslab.models.mobilenetv2": ("MobileNetV2",),
    "compresslab.models.tv": ("torchvision_model",),
    "compresslab.models.vit": ("ViT", "DeiT"),
    "compresslab.models.lm": ("llama_lm", "gpt2_lm", "hf_causal_lm"),
}
MODEL_FACTORIES = Allowlist(
    "architecture _target_",
    with_module_aliases("compresslab.models.", MODEL_DEFINITIONS),
    "Pick a model config: teacher=<name> / student=<name> (see conf/arch/); a file's arch spec "
    "may only name one of compresslab's model factories.",
)


def require_image_input(model_name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Check that ``input_shape`` is (C, H, W); a clear error otherwise."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"Model '{model_name}' needs image input (C, H, W) but the dataset gives {tuple(input_shape)}. "
            "For 1-D data (mnist1d) pick a 1-D or flat model, e.g. student=cnn1d, student=mlp."
        )
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def require_sequence_input(model_name: str, input_shape: Sequence[int]) -> tuple[int, int]:
    """Check that ``input_shape`` is (C, L) for 1-D convolutional models."""
    if len(input_shape) != 2:
        raise ConfigError(
            f"Model '{model_name}' needs 1-D input (C, L) but the dataset gives {tuple(input_shape)}. "
            "For images pick a 2-D model, e.g. student=lenet5 or student=resnet20."
        )
    return int(input_shape[0]), int(input_shape[1])


def build_model(arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a model from an arch spec ``{"_target_": "compresslab.models.<Factory>", **kwargs}``.

    The spec is plain data (it is stored inside artifacts next to the state dict). Its
    ``_target_`` is looked up in :data:`MODEL_FACTORIES`, an explicit allowlist of the zoo's
    factories, never resolved by walking attributes, so rebuilding a model from a file
    cannot reach any other callable. Every ``nn.MultiheadAttention`` of the model (torchvision's
    ViTs) becomes an equivalent :class:`~compresslab.models.attention.ExplicitAttention`, so
    the compression methods reach its q/k/v/out projections and artifacts rebuild that structure.
    """
    spec = dict(arch)
    factory = MODEL_FACTORIES.resolve(spec.pop("_target_", None))
    model = factory(input_shape=tuple(int(v) for v in input_shape), num_classes=int(num_classes), **spec)
    return explicit_attention(model)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, small-normal linear: the usual CIFAR-net init."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def flat_features(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of features ``module`` produces for one input of ``input_shape``, flattened."""
    was_training = module.training
    module.eval()
    out = module(torch.zeros(1, *input_shape))
    module.train(was_training)
    return int(out.flatten(1).shape[1])
