"""Model zoo: every conf/arch config builds and runs, parameter counts match the papers,
clear errors, and the models trace for torch-pruning and torch.export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from compresslab.errors import ConfigError
from compresslab.models import (
    VGG,
    CifarResNet,
    MobileNetV2,
    WideResNet,
    build_model,
    torchvision_model,
)

ARCH_DIR = Path(__file__).resolve().parents[1] / "conf" / "arch"
ARCH_FILES = sorted(ARCH_DIR.glob("*.yaml"))
IMAGE_SHAPES = [(1, 8, 8), (3, 32, 32)]
SEQUENCE_SHAPE = (1, 40)


def arch(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(ARCH_DIR / f"{name}.yaml"))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model: nn.Module, shape) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, *shape))


@pytest.mark.parametrize("path", ARCH_FILES, ids=[p.stem for p in ARCH_FILES])
def test_every_arch_config_builds_and_runs(path):
    """Each config runs on both image sizes (2-D models), on 1-D input (1-D models), or on
    all of them (flat models); a shape it cannot take is refused with ConfigError."""
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    if cfg["_target_"].startswith("compresslab.models.") and cfg["_target_"].endswith("_lm"):
        return check_language_model_config(cfg, path.stem)
    accepted = []
    for shape in [*IMAGE_SHAPES, SEQUENCE_SHAPE]:
        try:
            model = build_model(cfg, shape, 10)
        except ConfigError as err:
            assert "needs" in str(err), err
            continue
        model.train()  # BatchNorm in training mode must cope with 1x1 maps at batch 2
        assert run(model, shape).shape == (2, 10), (path.stem, shape)
        assert run(model.eval(), shape).shape == (2, 10), (path.stem, shape)
        accepted.append(shape)
    assert accepted, f"{path.stem} builds for no input shape"
    takes_images = [s in accepted for s in IMAGE_SHAPES]
    assert all(takes_images) or not any(takes_images), f"{path.stem} takes only some image sizes: {accepted}"


def check_language_model_config(cfg: dict, name: str) -> None:
    """A causal LM config takes token blocks (B, T) -> logits (B, T, vocab) and refuses images."""
    for shape in [*IMAGE_SHAPES, SEQUENCE_SHAPE]:
        with pytest.raises(ConfigError, match="needs"):
            build_model(cfg, shape, 10)
    if cfg["_target_"].endswith("hf_causal_lm"):  # needs a checkpoint dir: tests/test_language_models.py
        with pytest.raises(ConfigError, match="arch.path"):
            build_model(cfg, (16,), 10)
        return
    model = build_model(cfg, (16,), 11).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 11, (2, 16))).shape == (2, 16, 11), name


def test_expected_zoo_configs_exist():
    names = {p.stem for p in ARCH_FILES}
    expected = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
        "mobilenetv2", "torchvision",
    }
    assert expected <= names, expected - names
    for group in ("teacher", "student"):
        generated = {p.stem for p in (ARCH_DIR.parent / group).glob("*.yaml")}
        assert names <= generated, f"run conf/gen_model_groups.py: {names - generated}"


def cifar_resnet_params(depth: int, in_ch: int = 3, classes: int = 10, planes=(16, 32, 64), stem=16) -> int:
    """Exact count for a 6n+2 ResNet with 1x1-conv+BN projection shortcuts, by hand."""
    n = (depth - 2) // 6
    total = 9 * in_ch * stem + 2 * stem  # stem conv + BN
    q = stem
    for p in planes:
        for i in range(n):
            total += 9 * q * p + 9 * p * p + 4 * p  # two 3x3 convs, two BNs
            if q != p:
                total += q * p + 2 * p  # projection conv + BN
            q = p
    return total + q * classes + classes


@pytest.mark.parametrize(
    "name, depth, paper",
    [("resnet20", 20, 0.27e6), ("resnet56", 56, 0.85e6), ("resnet110", 110, 1.7e6)],
)
def test_cifar_resnet_parameter_counts(name, depth, paper):
    """He et al. 2016, Table 6: ResNet-20/56/110 have 0.27M/0.85M/1.7M parameters (their
    option A shortcuts add none; our 1x1 projections add ~2.7k)."""
    model = build_model(arch(name), (3, 32, 32), 10)
    count = n_params(model)
    assert count == cifar_resnet_params(depth)
    assert abs(count - paper) / paper < 0.02, count


def test_wide_cifar_resnets_match_repdistiller():
    """RepDistiller/CRD (Tian et al. 2020) list resnet8x4 1.23M and resnet32x4 7.43M on CIFAR-100."""
    r8x4 = n_params(build_model(arch("resnet8x4"), (3, 32, 32), 100))
    r32x4 = n_params(build_model(arch("resnet32x4"), (3, 32, 32), 100))
    assert r8x4 == cifar_resnet_params(8, classes=100, planes=(64, 128, 256), stem=32)
    assert r32x4 == cifar_resnet_params(32, classes=100, planes=(64, 128, 256), stem=32)
    assert abs(r8x4 - 1.23e6) / 1.23e6 < 0.02 and abs(r32x4 - 7.43e6) / 7.43e6 < 0.02
    model = build_model(arch("resnet8x4"), (3, 32, 32), 100)
    assert model.conv1.out_channels == 32
    assert [m[0].conv1.out_channels for m in (model.layer1, model.layer2, model.layer3)] == [64, 128, 256]


def test_wrn_parameter_counts():
    """Zagoruyko & Komodakis 2016 / RepDistiller: WRN-40-2 2.2M, WRN-16-2 0.7M parameters."""
    wrn40 = n_params(build_model(arch("wrn_40_2"), (3, 32, 32), 10))
    wrn16 = n_params(build_model(arch("wrn_16_2"), (3, 32, 32), 10))
    assert abs(wrn40 - 2.2e6) / 2.2e6 < 0.03, wrn40
    assert abs(wrn16 - 0.7e6) / 0.7e6 < 0.03, wrn16


def test_vgg_and_mobilenet_parameter_counts():
    """RepDistiller lists vgg8 3.96M and vgg13 9.46M on CIFAR-100; MobileNetV2 (width 1) ~2.2M."""
    vgg8 = n_params(build_model(arch("vgg8"), (3, 32, 32), 100))
    vgg13 = n_params(build_model(arch("vgg13"), (3, 32, 32), 100))
    mnv2 = n_params(build_model(arch("mobilenetv2"), (3, 32, 32), 10))
    assert abs(vgg8 - 3.96e6) / 3.96e6 < 0.02, vgg8
    assert abs(vgg13 - 9.46e6) / 9.46e6 < 0.02, vgg13
    assert abs(mnv2 - 2.24e6) / 2.24e6 < 0.02, mnv2


def test_module_paths_used_by_distillation():
    model = CifarResNet((3, 32, 32), 10, depth=20)
    for path in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"):
        model.get_submodule(path)
    feats = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o.shape))
             for n in model.stage_names]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert feats == {
        "layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8),
    }
    small = CifarResNet((1, 8, 8), 10, depth=8)
    out = small.layer3(small.layer2(small.layer1(small.conv1(torch.randn(2, 1, 8, 8)))))
    assert out.shape[-2:] == (2, 2)
    wrn = WideResNet((3, 32, 32), 10, depth=16, widen_factor=2)
    for path in ("conv1", "layer1", "layer2", "layer3", "bn1", "fc"):
        wrn.get_submodule(path)


def test_vgg_skips_pools_on_tiny_inputs():
    small = VGG((1, 8, 8), 10, depth=8)
    big = VGG((3, 32, 32), 10, depth=8)
    assert [type(small.get_submodule(f"pool{i}")) for i in range(1, 5)] == [nn.MaxPool2d] * 3 + [nn.Identity]
    assert all(isinstance(big.get_submodule(f"pool{i}"), nn.MaxPool2d) for i in range(1, 5))


@pytest.mark.parametrize(
    "factory, kwargs",
    [(CifarResNet, {}), (WideResNet, {}), (VGG, {}), (MobileNetV2, {}), (torchvision_model, {})],
)
def test_image_models_refuse_1d_input(factory, kwargs):
    with pytest.raises(ConfigError, match="image input"):
        factory(SEQUENCE_SHAPE, 10, **kwargs)


@pytest.mark.parametrize(
    "factory, kwargs",
    [(CifarResNet, {"depth": 21}), (WideResNet, {"depth": 18}), (VGG, {"depth": 12}), (MobileNetV2, {"width_mult": 0})],
)
def test_bad_sizes_are_config_errors(factory, kwargs):
    with pytest.raises(ConfigError):
        factory((3, 32, 32), 10, **kwargs)


def test_torchvision_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match="resnet18") as info:
        build_model({"_target_": "compresslab.models.torchvision_model", "name": "resnet19"}, (3, 32, 32), 10)
    assert "resnet19" in str(info.value) and "mobilenet_v2" in str(info.value)


def test_torchvision_other_model_and_channels():
    model = torchvision_model((1, 32, 32), 7, name="mobilenet_v3_small")
    assert model.features[0][0].in_channels == 1
    assert run(model.eval(), (1, 32, 32)).shape == (2, 7)


def test_torchvision_pretrained_offline_is_clear(monkeypatch):
    import torchvision.models._api as tv_api

    def no_network(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(ConfigError, match="network"):
        torchvision_model((3, 32, 32), 10, name="resnet18", pretrained=True)


@pytest.mark.parametrize("name, in_ch", [("resnet18", 1), ("squeezenet1_1", 3)])
def test_torchvision_pretrained_replaces_head(monkeypatch, name, in_ch):
    """With weights (faked here from a random 1000-class model: no download) the head is
    swapped for a num_classes one and the first conv keeps the averaged RGB filters."""
    import torchvision
    import torchvision.models._api as tv_api

    reference = torchvision.models.get_model(name, weights=None)
    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", lambda self, *a, **k: reference.state_dict())
    model = torchvision_model((in_ch, 32, 32), 5, name=name, pretrained=True)
    assert run(model.eval(), (in_ch, 32, 32)).shape == (2, 5)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    ref_first = next(m for m in reference.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == in_ch
    if in_ch == 3:  # untouched pretrained filters
        expected = ref_first.weight
    else:
        expected = ref_first.weight.mean(dim=1, keepdim=True).repeat(1, in_ch, 1, 1) * (3 / in_ch)
    torch.testing.assert_close(first.weight, expected)


def test_build_model_rejects_targets_outside_the_zoo():
    with pytest.raises(ConfigError, match="compresslab.models"):
        build_model({"_target_": "os.system", "command": "true"}, (3, 32, 32), 10)
    with pytest.raises(ConfigError):
        build_model({"_target_": "torchvision.models.resnet18"}, (3, 32, 32), 10)


def test_resnet20_dependency_graph_and_structured_pruning():
    tp = pytest.importorskip("torch_pruning")
    model = build_model(arch("resnet20"), (3, 32, 32), 10).eval()
    example = torch.randn(1, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    # The stage-1 output channels are tied through every identity shortcut.
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1])
    assert dg.check_pruning_group(group)
    group.prune()
    assert model.conv1.out_channels == 14 and model.layer1[2].conv2.out_channels == 14
    assert model.layer2[0].shortcut[0].in_channels == 14
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vit_tiny", "deit_tiny"])
def test_torch_export(name):
    model = build_model(arch(name), (3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))
