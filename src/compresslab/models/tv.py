"""Any torchvision classification model by name (``torchvision.models.get_model``), adapted
to the dataset's channel count and number of classes. Random init unless ``pretrained``."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from compresslab.errors import ConfigError
from compresslab.models.common import require_image_input

log = logging.getLogger(__name__)


def _classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def _replace_first_conv(model: nn.Module, name: str, channels: int) -> None:
    """Give the first Conv2d ``channels`` inputs; pretrained RGB filters are averaged over
    their input channels and spread evenly over the new ones."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ConfigError(f"torchvision model '{name}' has no Conv2d to adapt to {channels} input channels.")
    old = module
    if old.groups != 1:
        raise ConfigError(f"torchvision model '{name}': first conv '{path}' is grouped; cannot change its input channels.")
    new = nn.Conv2d(
        channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        mean = old.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, channels, 1, 1) * (old.in_channels / channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_submodule(model, path, new)
    # Inception-style models re-normalise 3 RGB channels in forward; that no longer applies.
    if hasattr(model, "transform_input"):
        model.transform_input = False


def _replace_heads(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """Swap every classification layer with ``old_classes`` outputs (main and auxiliary heads)
    for a freshly initialised one with ``num_classes`` outputs."""
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == old_classes]
    if linears:
        for path, m in linears:
            _set_submodule(model, path, nn.Linear(m.in_features, num_classes, bias=m.bias is not None))
        return
    convs = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == old_classes]
    if not convs:
        raise ConfigError(f"Could not find the {old_classes}-way classification head to replace.")
    for path, m in convs:  # SqueezeNet: a 1x1 conv head
        new = nn.Conv2d(m.in_channels, num_classes, m.kernel_size, stride=m.stride, padding=m.padding, bias=m.bias is not None)
        nn.init.normal_(new.weight, mean=0.0, std=0.01)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        _set_submodule(model, path, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def torchvision_model(
    input_shape: Sequence[int],
    num_classes: int,
    name: str = "resnet18",
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """A torchvision classification model (``torchvision.models.get_model``) named ``name``,
    e.g. resnet18 (He et al. 2016), mobilenet_v3_small, efficientnet_b0, vit_b_16.

    Randomly initialised by default. ``pretrained=True`` loads torchvision's DEFAULT ImageNet
    weights, which needs network access (or the file already in the torch hub cache), then
    puts a new ``num_classes``-way head on it. If the data has C != 3 channels the first
    conv is replaced by one taking C channels. Extra ``kwargs`` go to the model builder.
    """
    import torchvision

    c, _, _ = require_image_input(f"torchvision:{name}", input_shape)
    valid = _classification_models()
    if name not in valid:
        raise ConfigError(
            f"Unknown torchvision classification model '{name}'. Valid names: {', '.join(valid)}."
        )
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        log.warning(
            "torchvision model '%s' with pretrained=True downloads the %s weights from the network "
            "(unless already in the torch hub cache, %s). Use pretrained=false to work offline.",
            name, weights, torch.hub.get_dir(),
        )
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise ConfigError(
                f"Could not get pretrained weights {weights} for torchvision model '{name}': {err}. "
                "Pretrained weights need network access or a cached copy in "
                f"{torch.hub.get_dir()}; set pretrained=false for random init."
            ) from err
        old_classes = len(weights.meta["categories"])
        if num_classes != old_classes:
            _replace_heads(model, old_classes, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if c != 3:
        _replace_first_conv(model, name, c)
    return model
