"""Rebuilding a student whose structure a method changed, from its arch spec and plain data.

- :func:`resize_to_state_dict`: give every parameter/buffer the shape it has in a state dict
  (and fix ``in_channels`` / ``out_channels`` / ``num_features`` ...), so a channel-pruned
  network (``prune=structured``) loads into the model built from its arch spec; an attention
  module's ``num_heads`` follows its q projection's width (``prune=heads``).
- :func:`structure_of` / :func:`build_structure`: describe, then re-apply, the low-rank
  factorization plan (:mod:`compresslab.compress.lowrank.factorized`) and the channel-pruned shapes,
  so every artifact format composes with ``lowrank`` and ``prune=structured``.

No pickled code: the description is plain data and the model comes from ``build_model``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from compresslab.compress.lowrank.factorized import apply_plan, lowrank_plan
from compresslab.models import build_model


# ---- channel-pruned shapes ----------------------------------------------------------------
def _fix_attributes(module: nn.Module, old: Mapping[str, int]) -> None:
    """Update a resized layer's size attributes from its new parameter shapes."""
    if isinstance(module, _ConvNd):
        w = module.weight
        depthwise = old["groups"] > 1 and old["groups"] == old["in_channels"] == old["out_channels"]
        if module.transposed:
            module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
        elif depthwise:
            module.groups = module.in_channels = module.out_channels = w.shape[0]
        else:
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _NormBase):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()


@torch.no_grad()
def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Give each parameter/buffer of ``model`` the shape it has in ``state_dict`` (keys with
    ``prefix``); values are left uninitialized for ``load_state_dict`` to fill. Returns the names
    of the modules that changed."""
    changed = []
    heads = {n: (m.num_heads, m.q_proj.out_features) for n, m in model.named_modules()
             if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "q_proj", None), nn.Linear)}
    for mname, module in model.named_modules():
        base = prefix + (f"{mname}." if mname else "")
        old = {k: getattr(module, k, None) for k in ("groups", "in_channels", "out_channels")}
        touched = False
        for pname, p in list(module._parameters.items()):
            saved = state_dict.get(base + pname)
            if p is not None and saved is not None and tuple(saved.shape) != tuple(p.shape):
                setattr(module, pname, nn.Parameter(torch.empty(saved.shape, dtype=p.dtype, device=p.device),
                                                    requires_grad=p.requires_grad))
                touched = True
        for bname, b in list(module._buffers.items()):
            saved = state_dict.get(base + bname)
            if b is not None and saved is not None and tuple(saved.shape) != tuple(b.shape):
                module._buffers[bname] = torch.empty(saved.shape, dtype=b.dtype, device=b.device)
                touched = True
        if touched:
            _fix_attributes(module, old)
            changed.append(mname)
    for mname, (num_heads, width) in heads.items():  # head-pruned attention: heads follow q_proj's width
        module = model.get_submodule(mname)
        if module.q_proj.out_features != width:
            module.num_heads = module.q_proj.out_features // (width // num_heads)
            changed.append(mname)
    return changed


# ---- structure (arch spec + low-rank plan + resized shapes) ----------------------------
def structure_of(model: nn.Module, context: Mapping[str, Any]) -> dict[str, Any]:
    """Plain-data description of the structural changes made to a zoo model: the low-rank
    plan, and the shapes of the tensors that channel pruning resized (only those that differ
    from the model rebuilt from ``context``'s arch spec and that plan)."""
    plan = lowrank_plan(model)
    structure: dict[str, Any] = {"lowrank": plan} if plan else {}
    fresh = build_structure(context["arch"], context["input_shape"], context["num_classes"], structure)
    fresh_shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    resized = {k: [int(d) for d in v.shape] for k, v in model.state_dict().items()
               if k in fresh_shapes and tuple(v.shape) != fresh_shapes[k]}
    if resized:
        structure["resized"] = resized
    return structure


def build_structure(arch: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                    structure: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the zoo model from ``arch`` and re-apply a :func:`structure_of` description
    (low-rank factorization, then the channel-pruned tensor shapes)."""
    model = build_model(arch, input_shape, num_classes)
    if structure and structure.get("lowrank"):
        apply_plan(model, structure["lowrank"])
    if structure and structure.get("resized"):
        shapes = {k: torch.empty([int(d) for d in shape], device="meta") for k, shape in structure["resized"].items()}
        for name in resize_to_state_dict(model, shapes):  # defined values until the saved ones are loaded
            module = model.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def rebuildable_from_spec(student: nn.Module, context: Mapping[str, Any], same_shapes: bool = True) -> bool:
    """Whether the model rebuilt from ``context["arch"]`` (and ``context["structure"]``, a
    :func:`structure_of` description, when given) has the student's state-dict keys (and
    shapes), i.e. an artifact of arch spec + weights can rebuild it (an earlier method such as
    a low-rank factorization may have changed the module structure)."""
    ref = build_structure(context["arch"], context["input_shape"], context["num_classes"],
                          context.get("structure")).state_dict()
    mine = student.state_dict()
    if list(ref) != list(mine):
        return False
    return not same_shapes or all(tuple(ref[k].shape) == tuple(mine[k].shape) for k in ref)
