"""Self-supervised objectives: NT-Xent/InfoNCE (+ RINCE), VICReg, DINO, MAE, and the CL+MIM sum.

Every loss takes the embeddings of the local batch; under DistributedDataParallel the ones that
compare samples with each other (NT-Xent, RINCE, VICReg) first gather the embeddings of every process
with :func:`gather` (an all-gather that carries gradients back to their owner), so the negatives, the
variance and the covariance are those of the global batch, as on one machine.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each sample's gradient over processes and returns it to its owner.

    (torch's own ``torch.distributed.nn.all_gather`` is deprecated and its all-to-all backward can
    stall gloo when DDP's gradient all-reduces run at the same time; an all-reduce does not.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all processes, with gradients (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _pair_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-similarity logits of the local queries (both views) against every global sample.

    Returns ``logits`` (2n, 2N) with each query's own entry set to -inf, and ``targets``, the
    column of each query's positive (its other view).
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    k1, k2 = gather(z1), gather(z2)
    big_n = k1.shape[0]
    offset = _rank() * n
    queries = torch.cat([z1, z2])
    keys = torch.cat([k1, k2])
    logits = queries @ keys.T / temperature
    local = torch.arange(n, device=z1.device) + offset
    own = torch.cat([local, local + big_n])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, own), torch.tensor(float("-inf"), device=z1.device))
    targets = torch.cat([local + big_n, local])
    return logits, targets


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent (InfoNCE over 2N-2 negatives per positive pair).

    ``temperature`` scales the cosine similarities: low values (0.05-0.1) focus on hard negatives
    and give the best features when the batch is large; too low is unstable; high (>0.5) blurs classes.
    """
    logits, targets = _pair_logits(z1, z2, temperature)
    return F.cross_entropy(logits, targets)


def rince(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, q: float = 0.5,
          lam: float = 0.01) -> torch.Tensor:
    """Robust InfoNCE (Chuang et al., 2022): down-weights pairs the model finds implausible.

    ``L = -exp(q * s+) / q + (lam * (exp(s+) + sum exp(s-)))**q / q`` with ``s = sim / temperature``.
    ``q -> 0`` recovers InfoNCE; ``q = 1`` is fully symmetric and most robust to false positives and
    noisy negatives (at some cost in clean accuracy). ``lam`` weighs the negatives' term (0.01-0.1).
    """
    logits, targets = _pair_logits(z1, z2, temperature)
    pos = logits.gather(1, targets[:, None]).squeeze(1)
    # (lam * sum_j exp(s_j))**q computed in log space: exp(q * (log lam + logsumexp(s)))
    neg_term = torch.exp(q * (np.log(lam) + torch.logsumexp(logits, dim=1))) / q
    return (-torch.exp(q * pos) / q + neg_term).mean()


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
           cov_weight: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al., 2022): invariance + variance + covariance, no negatives."""
    invariance = F.mse_loss(z1, z2)
    z1, z2 = gather(z1), gather(z2)
    n, d = z1.shape

    def variance(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def covariance(z: torch.Tensor) -> torch.Tensor:
        z = z - z.mean(dim=0)
        cov = (z.T @ z) / max(n - 1, 1)
        off = cov - torch.diag(torch.diag(cov))
        return off.pow(2).sum() / d

    return (sim_weight * invariance + var_weight * (variance(z1) + variance(z2))
            + cov_weight * (covariance(z1) + covariance(z2)))


class DINOLoss(nn.Module):
    """DINO's cross-entropy between a centred, sharpened teacher and the student, over crop pairs.

    The teacher temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_steps`` (a schedule precomputed as an array); the centre is an EMA (``center_momentum``)
    of the teacher outputs, averaged over processes, which with sharpening prevents collapse.
    """

    def __init__(self, out_dim: int, total_steps: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_steps: int = 0, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        warm = np.linspace(warmup_teacher_temp, teacher_temp, max(warmup_steps, 0))
        self.teacher_temps = np.concatenate([warm, np.full(max(total_steps - len(warm), 1), teacher_temp)])
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], step: int) -> torch.Tensor:
        temp = float(self.teacher_temps[min(step, len(self.teacher_temps) - 1)])
        teacher = [F.softmax((t - self.center) / temp, dim=-1).detach() for t in teacher_out]
        student = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_out]
        total, terms = 0.0, 0
        for ti, t in enumerate(teacher):
            for si, s in enumerate(student):
                if si == ti:  # a crop is never its own target
                    continue
                total = total + torch.sum(-t * s, dim=-1).mean()
                terms += 1
        self.update_center(torch.cat(teacher_out))
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_out)))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error on the hidden patches only (``mask == 1``).

    ``norm_pix`` normalises each target patch by its own mean and variance (MAE's default: sharper
    features, but the decoder then predicts normalised patches).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def cl_mim(cl_loss: torch.Tensor, mim_loss: torch.Tensor, lam: float) -> torch.Tensor:
    """Linear combination of a contrastive/distillation loss and MIM (Park et al., ICLR 2023).

    ``lam`` is the weight of the contrastive (CLS-level, global shape) term and ``1 - lam`` that of
    the reconstruction (token-level, texture) term; small ``lam`` (0.1-0.3) keeps MIM's local
    features while CL makes the representation linearly separable.
    """
    return lam * cl_loss + (1.0 - lam) * mim_loss
