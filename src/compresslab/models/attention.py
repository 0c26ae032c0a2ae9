"""Multi-head attention whose four projections are plain ``nn.Linear`` layers.

``nn.MultiheadAttention`` keeps its q/k/v weights in one ``in_proj_weight`` parameter and reads
``in_proj_weight`` and ``out_proj.weight`` directly inside ``F.multi_head_attention_forward``:
a method that swaps a Linear's forward (fake quantization), replaces a Linear (low rank) or
selects layers by type (pruning, weight sharing, the codecs) never sees q/k/v and only pretends
to act on ``out_proj``. :class:`ExplicitAttention` computes the same function with
``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears called as modules, so every method that
works on Linears reaches attention, ``torch.export`` (PT2E int8) and ONNX see four ``linear``
ops around ``scaled_dot_product_attention``, and Torch-Pruning sees Linears whose heads can be
removed (``num_heads`` and the projections' widths change together; ``head_dim`` follows
``q_proj.out_features // num_heads``).

Why a module rather than ``torch.nn.utils.parametrize`` on ``in_proj_weight``: a parametrization
makes fake quantization see the weight, but low rank, the codecs, PT2E's quantizer and
structured pruning still meet one fused ``in_proj_weight`` that is not a Linear. A module swap
needs none of them to learn about attention.

:func:`explicit_attention` replaces every ``nn.MultiheadAttention`` of a model in place (the
model zoo's :func:`~compresslab.models.build_model` does it for every model it builds, so
artifacts rebuild the same structure); :class:`ExplicitAttention` also loads an
``nn.MultiheadAttention`` state dict (``in_proj_weight``/``in_proj_bias``, or the separate
``q_proj_weight``/``k_proj_weight``/``v_proj_weight``) so older checkpoints keep loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.errors import ConfigError

__all__ = ["ExplicitAttention", "explicit_attention"]

_PROJ = ("q", "k", "v")


class ExplicitAttention(nn.Module):
    """The function of ``nn.MultiheadAttention`` (same arguments and outputs) with explicit
    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` Linears (Vaswani et al. 2017 §3.2.2)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, kdim: int | None = None, vdim: int | None = None,
                 head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
            head_dim = embed_dim // num_heads
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self._register_load_state_dict_pre_hook(_split_in_proj)

    @property
    def head_dim(self) -> int:
        """Width of one head (after head pruning: the q projection's width over ``num_heads``)."""
        return self.q_proj.out_features // self.num_heads

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, where: str = "") -> "ExplicitAttention":
        """An :class:`ExplicitAttention` computing what ``mha`` computes (weights copied)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError(f"nn.MultiheadAttention {where or ''} uses add_bias_kv/add_zero_attn, which "
                              "ExplicitAttention does not implement; build it without them.")
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first, kdim=mha.kdim, vdim=mha.vdim)
        new.load_state_dict(mha.state_dict())
        return new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype).train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """``(output, attention weights or None)`` exactly as ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, ls = query.shape[0], query.shape[1], key.shape[1]
        h = self.num_heads
        # the projections see 2-D (tokens, features) inputs: the x86 int8 lowering matches a 2-D linear
        q = self.q_proj(query.reshape(n * lq, -1)).view(n, lq, h, -1).transpose(1, 2)
        k = self.k_proj(key.reshape(n * ls, -1)).view(n, ls, h, -1).transpose(1, 2)
        v = self.v_proj(value.reshape(n * ls, -1)).view(n, ls, h, -1).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, n, h, lq, ls, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(attn, p) @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n * lq, -1)).view(n, lq, -1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


def _additive_mask(attn_mask, key_padding_mask, is_causal, n, h, lq, ls, dtype):
    """One float mask broadcastable to (n, h, lq, ls) from MHA's masks (bool True = masked out)."""
    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        m = additive(attn_mask)
        mask = m.view(n, h, lq, ls) if m.dim() == 3 else m.view(1, 1, lq, ls)
    elif is_causal:
        causal = torch.ones(lq, ls, dtype=torch.bool).triu(1)
        mask = additive(causal).view(1, 1, lq, ls)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(n, 1, 1, ls)
        mask = kp if mask is None else mask + kp
    return mask


def _split_in_proj(state_dict, prefix, *args) -> None:
    """Load hook: an ``nn.MultiheadAttention`` state dict's fused or separate in-projection
    becomes ``q_proj``/``k_proj``/``v_proj`` weights and biases."""
    fused = state_dict.pop(prefix + "in_proj_weight", None)
    if fused is not None:
        for name, w in zip(_PROJ, fused.chunk(3)):
            state_dict[f"{prefix}{name}_proj.weight"] = w
    for name in _PROJ:
        w = state_dict.pop(f"{prefix}{name}_proj_weight", None)
        if w is not None:
            state_dict[f"{prefix}{name}_proj.weight"] = w
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for name, b in zip(_PROJ, bias.chunk(3)):
            state_dict[f"{prefix}{name}_proj.bias"] = b


def explicit_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` by an equivalent
    :class:`ExplicitAttention` (in place); returns ``model`` (or the replacement when ``model``
    itself is one). A model without one is returned unchanged."""
    if isinstance(model, nn.MultiheadAttention):
        return ExplicitAttention.from_mha(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mha in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExplicitAttention.from_mha(mha, name))
    return model
