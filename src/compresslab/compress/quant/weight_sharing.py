"""Weight sharing + Huffman coding: stages 2 and 3 of Deep Compression (Han, Mao & Dally,
"Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and
Huffman Coding", ICLR 2016).

1. **Sharing** — each conv/linear layer's nonzero weights are clustered with 1-D k-means
   into ``2^bits`` centroids (linear initialisation over [min, max], the paper's best
   choice; ``bits_conv`` / ``bits_fc`` default to the paper's 8 / 5). Exact zeros — the
   weights a pruning method removed — are not clustered and stay zero.
2. **Centroid fine-tuning** — from ``start_epoch`` on, every member of a cluster receives
   the cluster's summed gradient (the paper's Eq. 3, dL/dC_k = sum of dL/dW over the
   cluster) and, after each optimizer step, the members are set back to their common
   value (the cluster mean), so the weights stay shared whatever the optimizer.
3. **Encoding** — per layer, the cheaper of two layouts:
   ``sparse``: relative index (the gap of zeros before each stored weight, capped at
   ``2^gap_bits - 1`` with filler zero entries, as in the paper's Fig. 2) + centroid index;
   ``dense``: a centroid index (or the zero symbol) for every weight. The gap and index
   streams are Huffman coded (:mod:`compresslab.compress.codecs.weight_sharing`).
   Codebooks are fp32. The tensors that are not shared (biases, BN parameters and statistics)
   are stored in ``unshared_dtype`` (fp16 by default; the model is rounded to it in
   ``finalize``, so the accuracy measured on the artifact includes that rounding).
   Everything is concatenated into one byte blob, so ``size_bytes`` is the encoded size;
   decoding gives back exactly the model that was evaluated.

The loaded artifact computes with the decoded fp32 weights (``compute: simulated``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.codecs.bitpack import dtype_from_name
from compresslab.compress.codecs.weight_sharing import encode_shared
from compresslab.compress.common import hide_epoch_from_selection, leaf_weight, resolve_epoch, select_layers
from compresslab.compress.quant.options import WeightSharingOptions
from compresslab.errors import ConfigError


# ---- k-means -----------------------------------------------------------------------------
@torch.no_grad()
def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars with linear initialisation over [min, max].

    Returns (centroids sorted ascending, float32 (k',), assignment int64 of values' shape),
    with k' <= k (a cluster that ends up empty is dropped).
    """
    v = values.detach().reshape(-1).float()
    if v.numel() == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    lo, hi = float(v.min()), float(v.max())
    k = max(1, min(int(k), v.numel()))
    cent = torch.linspace(lo, hi, k) if k > 1 else v.mean().reshape(1)
    for _ in range(int(iters)):
        assign = _nearest(v, cent)
        sums = torch.zeros(k).index_add_(0, assign, v)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
        new, _ = torch.sort(new)
        if torch.equal(new, cent):
            break
        cent = new
    assign = _nearest(v, cent)
    used = torch.unique(assign)
    cent = cent[used]
    assign = _nearest(v, cent)
    return cent, assign.reshape(values.shape)


def _nearest(v: torch.Tensor, sorted_cent: torch.Tensor) -> torch.Tensor:
    if sorted_cent.numel() == 1:
        return torch.zeros_like(v, dtype=torch.int64)
    mids = (sorted_cent[1:] + sorted_cent[:-1]) / 2
    return torch.bucketize(v, mids)


# ---- the method --------------------------------------------------------------------------
class _Cluster:
    """Fixed assignment of one layer's nonzero weights to shared values."""

    def __init__(self, assign: torch.Tensor, k: int) -> None:
        self.assign = assign  # int64, weight's shape; -1 = pruned (zero)
        self.k = k


class WeightSharing(CompressionMethod):
    """Deep Compression weight sharing (k-means, centroid fine-tuning) + Huffman-coded artifact."""

    options = WeightSharingOptions

    def __init__(self, name: str, bits_conv: int = 8, bits_fc: int = 5, gap_bits_conv: int = 8,
                 gap_bits_fc: int = 5, start_epoch: int = -2, kmeans_iters: int = 30,
                 exclude: Sequence[str] = (), layout: str = "auto", unshared_dtype: str = "float16") -> None:
        super().__init__(name)
        self.bits_conv, self.bits_fc = int(bits_conv), int(bits_fc)
        self.gap_bits_conv, self.gap_bits_fc = int(gap_bits_conv), int(gap_bits_fc)
        self.start_epoch = int(start_epoch)
        self.kmeans_iters = int(kmeans_iters)
        self.exclude = list(exclude)
        self.layout = layout
        self.unshared_dtype = dtype_from_name(unshared_dtype)
        self.clusters: dict[str, _Cluster] = {}
        self.shared_during_training = False
        self._report: dict[str, Any] = {}

    def bits_for(self, module: nn.Module) -> tuple[int, int]:
        """(index bits, gap bits) of a layer: conv or fully connected settings."""
        if isinstance(module, nn.Linear):
            return self.bits_fc, self.gap_bits_fc
        return self.bits_conv, self.gap_bits_conv

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights are shared."""
        layers = select_layers(model, self.exclude)
        if not layers:
            raise ConfigError(f"quant={self.name}: the student has no conv/linear layer to share")
        return layers

    def resolve_start(self, max_epochs: int) -> int:
        """``start_epoch`` counted from the end when negative."""
        return resolve_epoch(self.start_epoch, max_epochs)

    @torch.no_grad()
    def cluster(self, model: nn.Module) -> None:
        """k-means every layer's nonzero weights and snap them to their centroids."""
        self.clusters = {}
        for name, module in self.layers(model).items():
            w = module.weight.detach()
            bits, _ = self.bits_for(module)
            nz = w != 0
            assign = torch.full(w.shape, -1, dtype=torch.int64, device=w.device)
            if bool(nz.any()):
                cent, a = kmeans_1d(w[nz].cpu(), 1 << bits, self.kmeans_iters)
                assign[nz] = a.to(w.device)
                self.clusters[name] = _Cluster(assign, int(cent.numel()))
            else:
                self.clusters[name] = _Cluster(assign, 0)
        self.project(model)

    @torch.no_grad()
    def adopt(self, model: nn.Module) -> bool:
        """Take the assignment from weights that are already shared (<= 2^bits distinct nonzero
        values per layer, e.g. after a resume); False when some layer is not shared."""
        clusters = {}
        for name, module in self.layers(model).items():
            w = module.weight.detach()
            bits, _ = self.bits_for(module)
            nz = w != 0
            values, inverse = torch.unique(w[nz], return_inverse=True)
            if values.numel() > (1 << bits):
                return False
            assign = torch.full(w.shape, -1, dtype=torch.int64, device=w.device)
            assign[nz] = inverse
            clusters[name] = _Cluster(assign, int(values.numel()))
        self.clusters = clusters
        return True

    @torch.no_grad()
    def share_gradients(self, model: nn.Module) -> None:
        """Give every cluster member the cluster's summed gradient (Han et al. Eq. 3)."""
        for name, module in self.layers(model).items():
            c = self.clusters.get(name)
            leaf = leaf_weight(module)
            if c is None or leaf.grad is None or c.k == 0:
                continue
            g = leaf.grad
            members = c.assign >= 0
            idx = c.assign[members]
            sums = torch.zeros(c.k, dtype=g.dtype, device=g.device).index_add_(0, idx, g[members])
            g[members] = sums[idx]
            g[~members] = 0.0

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """Set each cluster's members to the cluster mean; zeros (pruned) stay zero."""
        for name, module in self.layers(model).items():
            c = self.clusters.get(name)
            if c is None:
                continue
            leaf = leaf_weight(module)
            w = module.weight.detach()
            members = (c.assign >= 0) & (w != 0)
            if c.k == 0 or not bool(members.any()):
                leaf.masked_fill_(~members, 0.0)
                continue
            idx = c.assign[members]
            vals = w[members].to(leaf.dtype)
            sums = torch.zeros(c.k, dtype=leaf.dtype, device=leaf.device).index_add_(0, idx, vals)
            counts = torch.zeros(c.k, dtype=leaf.dtype, device=leaf.device).index_add_(0, idx, torch.ones_like(vals))
            cent = sums / counts.clamp_min(1)
            leaf[members] = cent[idx]
            leaf.masked_fill_(~members, 0.0)

    def callbacks(self) -> list[Callback]:
        return [WeightSharingCallback(self)]

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        if not self.adopt(student):
            self.cluster(student)  # no fine-tuning happened (or the selection predates it)
        self.round_unshared(student)
        return student

    def shared_keys(self, model: nn.Module) -> set[str]:
        """State-dict keys of the shared (k-means coded) weights."""
        return {f"{name}.weight" for name in self.layers(model)}

    @torch.no_grad()
    def round_unshared(self, model: nn.Module) -> None:
        """Round the floating tensors that are not shared to ``unshared_dtype`` (in place), so the
        model computes with exactly the values the artifact stores."""
        shared = self.shared_keys(model)
        for key, t in model.state_dict().items():
            if key not in shared and t.is_floating_point():
                t.copy_(t.to(self.unshared_dtype))

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict:
        payload, stats = encode_shared(student, self, context)
        stats["shared_during_training"] = self.shared_during_training
        self._report = stats
        return payload

    def report(self) -> dict[str, Any]:
        return dict(self._report)


class WeightSharingCallback(Callback):
    """Clusters at ``start_epoch``, then shares gradients and re-projects after every step."""

    def __init__(self, method: WeightSharing) -> None:
        self.method = method

    def _started(self, trainer) -> bool:
        return trainer.current_epoch >= self.method.resolve_start(trainer.max_epochs)

    def on_train_start(self, trainer, pl_module) -> None:
        # resumed after sharing began: recover the assignment from the (shared) weights
        if self._started(trainer) and not self.method.clusters and not self.method.adopt(pl_module.model):
            self.method.cluster(pl_module.model)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._started(trainer) and not self.method.clusters:
            self.method.cluster(pl_module.model)
            self.method.shared_during_training = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.method.clusters:
            self.method.share_gradients(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.method.clusters:
            self.method.project(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._started(trainer):
            hide_epoch_from_selection(trainer)
