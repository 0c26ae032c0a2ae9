"""Causal language models from Hugging Face ``transformers``, in the zoo's ``(input_shape, num_classes)``
form: the input is a block of token ids (``input_shape = (block_size,)``), the classes are the
vocabulary (``num_classes = vocab_size``) and the forward returns next-token logits ``(B, T, V)``.

- :func:`llama_lm`: a Llama-style decoder (Touvron et al. 2023: RMSNorm, rotary positions, SwiGLU MLP)
  built from a ``LlamaConfig`` with random init, no download (``student=llama_tiny``, ``teacher=llama_small``);
- :func:`gpt2_lm`: a GPT-2-style decoder (Radford et al. 2019) from a ``GPT2Config``; its ``Conv1D``
  projections become equivalent ``nn.Linear`` layers, so every method that acts on Linears reaches them;
- :func:`hf_causal_lm`: a user's trained checkpoint from a local directory, read from safetensors only.

Every model is wrapped in :class:`CausalLM`, which holds the ``transformers`` model as ``.lm`` and
marks itself ``is_causal_lm`` (the pipeline then reports perplexity and LM speed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from compresslab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


#: the arch targets whose models arrive trained (so ``<role>.epochs=0`` is a result)
PRETRAINED_FACTORIES = ("compresslab.models.hf_causal_lm", "compresslab.models.lm.hf_causal_lm")


class CausalLM(nn.Module):
    """A ``transformers`` causal LM whose forward maps token ids ``(B, T)`` to logits ``(B, T, V)``."""

    is_causal_lm = True
    #: the dtype of the inputs (token ids): exporters trace with it
    input_dtype = torch.long

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def vocab_size(self) -> int:
        """The number of logits per position."""
        return int(self.lm.config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)``; floating-point ids (the zeros that shape probes pass) are cast to long."""
        if input_ids.is_floating_point():
            input_ids = input_ids.long()
        return self.lm(input_ids=input_ids, use_cache=False).logits

    def prefill(self, input_ids: torch.Tensor):
        """Logits and the KV cache of a prompt (for decoding)."""
        out = self.lm(input_ids=input_ids, use_cache=True)
        return out.logits, out["cache"] if "cache" in out else out.past_key_values

    def decode_step(self, token: torch.Tensor, cache) -> torch.Tensor:
        """Logits of one new token per sequence ``(B, 1)`` given the cache (which grows by one)."""
        return self.lm(input_ids=token, cache=cache, use_cache=True).logits


def _check_block(input_shape: Sequence[int], name: str) -> int:
    if len(input_shape) != 1:
        raise ConfigError(f"Model '{name}' is a causal language model: it needs a text dataset whose input is a "
                          f"block of token ids (dataset=shakespeare, textfile, wikitext2), but the dataset gives "
                          f"inputs of shape {tuple(input_shape)}.")
    return int(input_shape[0])


def _check_heads(width: int, heads: int, name: str) -> None:
    if width % heads:
        raise ConfigError(f"{name}: arch.width={width} must be divisible by arch.heads={heads}")


def llama_lm(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: int = 2, heads: int = 4,
             kv_heads: int | None = None, mlp_width: int | None = None, max_positions: int | None = None,
             rope_theta: float = 10000.0, dropout: float = 0.0) -> CausalLM:
    """A Llama-style decoder (Touvron et al. 2023) from ``transformers.LlamaConfig``, random init.
    ``mlp_width`` defaults to the Llama ratio 8/3·width rounded up to a multiple of 8;
    ``max_positions`` to the dataset's block size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    block = _check_block(input_shape, "llama")
    _check_heads(width, heads, "llama")
    config = LlamaConfig(
        vocab_size=int(num_classes), hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=mlp_width or -(-8 * width // 3 // 8) * 8,
        max_position_embeddings=max_positions or block, rope_theta=rope_theta, attention_dropout=dropout,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa")
    return CausalLM(LlamaForCausalLM(config))


def _conv1d_to_linear(model: nn.Module) -> None:
    """Replace every ``transformers`` ``Conv1D`` (y = x·W + b, W of shape in×out) by the equivalent
    ``nn.Linear`` (weight Wᵀ), in place."""
    from transformers.pytorch_utils import Conv1D

    for path, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)


#: the GPT-2 projections that transformers defines as Conv1D
GPT2_CONV1D = ("c_attn", "c_proj", "c_fc")


def gpt2_lm(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: int = 2, heads: int = 4,
            max_positions: int | None = None, dropout: float = 0.0) -> CausalLM:
    """A GPT-2-style decoder (Radford et al. 2019) from ``transformers.GPT2Config``, random init, untied
    head; its ``Conv1D`` layers are turned into ``nn.Linear`` (:func:`_conv1d_to_linear`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    block = _check_block(input_shape, "gpt2")
    _check_heads(width, heads, "gpt2")
    config = GPT2Config(vocab_size=int(num_classes), n_embd=width, n_layer=depth, n_head=heads,
                        n_positions=max_positions or block, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    _conv1d_to_linear(model)
    return CausalLM(model)


def check_safetensors_dir(path: Path) -> None:
    """A local checkpoint directory with ``config.json`` and safetensors weights; a clear error
    otherwise (a pickle-only directory — ``pytorch_model.bin`` — is refused: loading it would run its code)."""
    if not path.is_dir():
        raise ConfigError(f"student.arch.path / teacher.arch.path={str(path)!r}: no such directory "
                          f"({path.resolve()}). Point it at a directory saved with save_pretrained(safe_serialization=True), "
                          "e.g. <run dir>/artifacts/student_hf of an earlier LM run.")
    if not (path / "config.json").exists():
        raise ConfigError(f"arch.path={str(path)!r}: no config.json in {path.resolve()}; not a Hugging Face checkpoint directory.")
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        raise CheckpointError(
            f"arch.path={str(path)!r}: no *.safetensors weights in {path.resolve()}"
            + (f" (found pickle files {pickles}, which compresslab never loads: unpickling runs code from the file)" if pickles else "")
            + ". Convert the checkpoint once where you trust it: model.save_pretrained(dir, safe_serialization=True).")


def hf_causal_lm(input_shape: Sequence[int], num_classes: int, path: str | None = None,
                 download: bool = False, revision: str | None = None) -> CausalLM:
    """A trained causal LM from ``path``: a local directory (or, with ``download=true``, a Hub id), loaded
    with ``AutoModelForCausalLM.from_pretrained(use_safetensors=True, trust_remote_code=False)``: safetensors
    weights only, only the architectures ``transformers`` itself defines, local files only unless
    ``download``. Its vocabulary must match the dataset's tokenizer (``num_classes``)."""
    from transformers import AutoModelForCausalLM

    _check_block(input_shape, "hf_causal_lm")
    if not path:
        raise ConfigError("student=hf_causal_lm needs student.arch.path=<checkpoint dir> (teacher.arch.path for a teacher)")
    if not download:
        check_safetensors_dir(Path(path))
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False,
                                                  local_files_only=not download, revision=revision,
                                                  attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"arch.path={path!r}: could not load a causal LM from it with safetensors: {exc}") from exc
    lm.float()
    _conv1d_to_linear(lm)  # a GPT-2 checkpoint: its projections as nn.Linear, like gpt2_lm's
    if lm.config.vocab_size != int(num_classes):
        raise ConfigError(
            f"arch.path={path!r} has a vocabulary of {lm.config.vocab_size} tokens but the dataset's tokenizer has "
            f"{num_classes}: the checkpoint was trained with another tokenizer. Use the dataset and "
            "dataset.tokenizer settings it was trained with.")
    return CausalLM(lm)


def save_hf_dir(model: nn.Module, path: Path) -> Path | None:
    """Write a :class:`CausalLM`'s ``transformers`` model as a safetensors checkpoint directory that
    ``student=hf_causal_lm student.arch.path=<path>`` loads (None for other models)."""
    if not getattr(model, "is_causal_lm", False):
        return None
    lm = model.lm
    state = None
    if lm.config.model_type == "gpt2":  # back to transformers' Conv1D layout (weight in x out)
        convs = {f"{p}.weight" for p, m in lm.named_modules() if isinstance(m, nn.Linear) and p.split(".")[-1] in GPT2_CONV1D}
        state = {k: (v.t().contiguous() if k in convs else v) for k, v in lm.state_dict().items()}
    lm.save_pretrained(str(path), state_dict=state, safe_serialization=True)
    return path
