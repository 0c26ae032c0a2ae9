"""Contrastive representation distillation (CRD) with its memory bank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compresslab.distill.losses import FeatureLoss
from compresslab.errors import ConfigError

__all__ = ["CRDLoss"]


class _Embed(nn.Module):
    """Linear projection + L2 normalisation (CRD's embedding head)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(FeatureLoss):
    """Contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
    Representation Distillation", ICLR).

    Student and teacher embeddings are projected (learned linear heads) to ``feat_dim``
    and L2-normalised. Each student embedding is contrasted against the teacher memory
    entry of the same sample (positive) and ``nce_k`` other samples' entries (negatives),
    and symmetrically for the teacher embedding against the student memory, with the
    NCE loss of the paper (noise distribution uniform over the N training samples,
    normalising constant Z fixed from the first batch). Memories are updated with
    momentum ``momentum`` and renormalised. Defaults are RepDistiller's (feat_dim 128,
    K=16384, T=0.07, momentum 0.5; weight 0.8); K is capped at N−1.

    Negatives are drawn uniformly from the other training samples (RepDistiller draws
    them from the other classes on CIFAR). The memory bank holds 2·N·feat_dim floats,
    as buffers, so it is saved in checkpoints and resumes; when N exceeds
    ``max_bank_samples`` (large datasets) a bounded FIFO queue of ``queue_size`` recent
    embeddings replaces it (positives then come from the current batch, as in MoCo).
    """

    max_taps = 1

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5,
                 max_bank_samples: int = 200_000, queue_size: int | None = None, eps: float = 1e-7) -> None:
        super().__init__()
        self.feat_dim, self.nce_k, self.nce_t = int(feat_dim), int(nce_k), float(nce_t)
        self.momentum, self.max_bank_samples = float(momentum), int(max_bank_samples)
        self.queue_size = int(queue_size or nce_k)
        self.eps = float(eps)
        self.num_samples: int | None = None
        self.mode: str | None = None
        self.embed_s: _Embed | None = None
        self.embed_t: _Embed | None = None

    @property
    def needs_index(self) -> bool:
        return self.mode != "queue"

    def build(self, student_shapes, teacher_shapes, num_samples):
        if self.embed_s is not None:
            return
        if not num_samples:
            raise ConfigError("crd needs the number of training samples to size its memory bank")
        self.num_samples = int(num_samples)
        self.embed_s = _Embed(math.prod(student_shapes[0]), self.feat_dim)
        self.embed_t = _Embed(math.prod(teacher_shapes[0]), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        if self.num_samples <= self.max_bank_samples:
            self.mode = "bank"
            rows = self.num_samples
        else:
            self.mode = "queue"
            rows = self.queue_size
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_s", torch.rand(rows, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(rows, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        # NCE normalising constants of the student / teacher scores (-1: set from the first batch)
        self.register_buffer("z", torch.full((2,), -1.0))

    @property
    def num_negatives(self) -> int:
        """Negatives per anchor: ``nce_k`` capped at N−1 (bank) or the queue size (queue)."""
        if self.mode == "queue":
            return self.queue_size
        return max(1, min(self.nce_k, self.num_samples - 1))

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) uniform random sample indices, never the anchor's own index."""
        k, n = self.num_negatives, self.num_samples
        neg = torch.randint(0, n - 1, (index.shape[0], k), device=index.device)
        return neg + (neg >= index.unsqueeze(1)).long()

    def nce_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE loss of CRD for (B, 1+K) normalised scores whose column 0 is the positive."""
        m = scores.shape[1] - 1
        noise = m / float(self.num_samples)
        pos, neg = scores[:, 0], scores[:, 1:]
        log_d1 = torch.log(pos / (pos + noise + self.eps))
        log_d0 = torch.log(noise / (neg + noise + self.eps))
        return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]

    def forward(self, student, teacher, *, target=None, index=None, epoch=0, contrast_index=None):
        if self.embed_s is None:
            raise RuntimeError("CRDLoss.build() must run before forward (the distillation module does it)")
        v_s = self.embed_s(student[0])
        v_t = self.embed_t(teacher[0].detach())
        if self.mode == "bank":
            if index is None:
                raise ValueError("crd needs each sample's training-set index (index=...)")
            index = index.to(self.memory_s.device).long()
            neg = contrast_index if contrast_index is not None else self.sample_negatives(index)
            idx = torch.cat([index.unsqueeze(1), neg.to(index.device).long()], dim=1)  # (B, 1+K)
            # student anchors against the teacher memory, teacher anchors against the student memory
            out_s = torch.exp(self._similarities(v_s, self.memory_t, idx) / self.nce_t)
            out_t = torch.exp(self._similarities(v_t, self.memory_s, idx) / self.nce_t)
        else:
            # positives: the other network's embedding of the same sample; negatives: the queue
            # (copied: the queue is updated in place after the forward)
            pos = (v_s * v_t.detach()).sum(1, keepdim=True)
            out_s = torch.exp(torch.cat([pos, v_s @ self.memory_t.clone().t()], 1) / self.nce_t)
            pos_t = (v_t * v_s.detach()).sum(1, keepdim=True)
            out_t = torch.exp(torch.cat([pos_t, v_t @ self.memory_s.clone().t()], 1) / self.nce_t)
        with torch.no_grad():  # Z: fixed from the first batch's mean score (as the paper)
            if self.z[0] < 0:
                self.z[0] = out_s.mean() * self.num_samples
            if self.z[1] < 0:
                self.z[1] = out_t.mean() * self.num_samples
        loss = self.nce_loss(out_s / self.z[0]) + self.nce_loss(out_t / self.z[1])
        if self.training:
            self._update_memory(v_s.detach(), v_t.detach(), index)
        return loss

    @staticmethod
    def _similarities(v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``<memory[idx[i, k]], v[i]>`` as (B, 1+K). When the draws cover a good part of the bank,
        one matrix product with the whole bank is much cheaper than gathering B·(1+K) rows."""
        memory = memory.detach()
        if memory.shape[0] <= 4 * idx.shape[1]:  # (a copy: the memory is updated in place after the forward)
            return (v @ memory.clone().t()).gather(1, idx)
        return torch.bmm(memory[idx], v.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def _update_memory(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor | None) -> None:
        if self.mode == "bank":
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                mixed = memory[index] * self.momentum + v * (1.0 - self.momentum)
                memory.index_copy_(0, index, F.normalize(mixed, dim=1))
        else:
            q = self.queue_size
            v_s, v_t = v_s[-q:], v_t[-q:]
            rows = (self.queue_ptr + torch.arange(v_s.shape[0], device=v_s.device)) % q
            self.memory_s[rows] = v_s
            self.memory_t[rows] = v_t
            self.queue_ptr.copy_((self.queue_ptr + v_s.shape[0]) % q)
