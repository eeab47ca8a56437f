"""The built-in SSL methods: SimCLR (InfoNCE/RINCE), VICReg, DINO, MAE and CL+MIM, each registered under
its ``pretrain.method`` name. Losses are in :mod:`sslvision.objectives`, heads in :mod:`sslvision.models`."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from sslvision import objectives
from sslvision.models import DecoderConfig, DINOHead, Encoder, MAEDecoder, mlp, patchify
from sslvision.ssl.base import SSLMethod, cosine_cycle, cosine_schedule, in_fp32, register_method

if TYPE_CHECKING:  # annotations only: sslvision.pretrain imports this package at run time
    from sslvision.pretrain import PretrainParams


def temperatures(p: PretrainParams, total_steps: int) -> np.ndarray:
    """SimCLR's temperature at each step of a ``total_steps`` run: ``p.temperature`` throughout
    (``temperature_schedule: constant``), or :func:`cosine_cycle` from ``temperature_max`` down to
    ``temperature_min`` and back every ``temperature_period`` steps (0: one period over the whole run)."""
    if p.temperature_schedule == "constant":
        return np.full(max(total_steps, 1), p.temperature)
    return cosine_cycle(p.temperature_max, p.temperature_min, total_steps, p.temperature_period or total_steps)


@register_method("simclr")
class SimCLR(SSLMethod):
    def __init__(self, encoder: Encoder, p: PretrainParams, total_steps: int = 1):
        super().__init__(encoder)
        self.p = p
        self.head = mlp(encoder.dim, p.proj_hidden_dim, p.proj_dim, layers=2)
        self.temperatures = temperatures(p, total_steps)

    @classmethod
    def build(cls, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int) -> SimCLR:
        return cls(encoder, p, total_steps)

    def temperature(self, step: int) -> float:
        """The InfoNCE / RINCE temperature at ``step`` (the last value past the run's end)."""
        return float(self.temperatures[min(step, len(self.temperatures) - 1)])

    def scheduled(self, step: int) -> dict[str, float]:
        return {"temperature": self.temperature(step)}

    def contrastive(self, f1: torch.Tensor, f2: torch.Tensor, step: int) -> torch.Tensor:
        z1, z2 = self.head(f1), self.head(f2)
        t = self.temperature(step)
        if self.p.loss == "rince":
            return in_fp32(objectives.rince, z1, z2, t, self.p.rince_q, self.p.rince_lam)
        return in_fp32(objectives.nt_xent, z1, z2, t)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.contrastive(self.encoder(views[0]), self.encoder(views[1]), step)


@register_method("vicreg")
class VICReg(SSLMethod):
    def __init__(self, encoder: Encoder, p: PretrainParams):
        super().__init__(encoder)
        self.p = p
        self.head = mlp(encoder.dim, p.proj_hidden_dim, p.proj_hidden_dim, layers=3)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z1, z2 = self.head(self.encoder(views[0])), self.head(self.encoder(views[1]))
        return in_fp32(objectives.vicreg, z1, z2, self.p.vicreg_sim_weight, self.p.vicreg_var_weight,
                       self.p.vicreg_cov_weight)


@register_method("dino")
class DINO(SSLMethod):
    """Student = encoder + DINO head; teacher = its EMA, fed the global crops only."""

    def __init__(self, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int):
        super().__init__(encoder)
        self.head = DINOHead(encoder.dim, p.dino_out_dim, p.proj_hidden_dim, p.proj_dim)
        self.teacher_encoder = copy.deepcopy(encoder)
        self.teacher_head = copy.deepcopy(self.head)
        for t in (self.teacher_encoder, self.teacher_head):
            t.requires_grad_(False)
        self.criterion = objectives.DINOLoss(
            p.dino_out_dim, total_steps, p.student_temp, p.teacher_temp, p.warmup_teacher_temp,
            int(p.warmup_teacher_temp_epochs * steps_per_epoch), p.center_momentum)
        # teacher momentum: cosine from teacher_momentum to 1 (DINO's schedule)
        self.momentum = cosine_schedule(p.teacher_momentum, 1.0, total_steps)

    @classmethod
    def build(cls, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int) -> DINO:
        return cls(encoder, p, total_steps, steps_per_epoch)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        student = [self.head(self.encoder(v)) for v in views]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_encoder(v)) for v in views[:2]]
        return in_fp32(self.criterion, student, teacher, step)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        for student, teacher in ((self.encoder, self.teacher_encoder), (self.head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            for bs, bt in zip(student.buffers(), teacher.buffers(), strict=True):
                bt.copy_(bs)


@register_method("mae")
class MAE(SSLMethod):
    def __init__(self, encoder: Encoder, p: PretrainParams):
        super().__init__(encoder)
        if not encoder.is_vit:
            raise ValueError(f"pretrain.method={p.method} needs a ViT backbone (vit_*), got {p.backbone}")
        self.p = p
        cfg = encoder.config
        self.decoder = MAEDecoder(encoder.dim, encoder.num_patches, cfg.patch_size, cfg.in_chans,
                                  DecoderConfig(p.decoder_dim, p.decoder_depth, p.decoder_heads))

    def reconstruction(self, imgs: torch.Tensor) -> torch.Tensor:
        latent, mask, ids_restore = self.encoder.forward_masked(imgs, self.p.mask_ratio)
        pred = self.decoder(latent, ids_restore)
        return in_fp32(objectives.mae_loss, pred, patchify(imgs, self.encoder.config.patch_size), mask,
                       self.p.norm_pix_loss)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.reconstruction(views[0])


@register_method("cl_mim")
class CLMIM(MAE):
    """One ViT: ``lambda`` x (SimCLR or DINO on the class token of two views) + (1 - ``lambda``) x MAE."""

    def __init__(self, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int):
        super().__init__(encoder, p)
        self.cl = (SimCLR(encoder, p, total_steps) if p.cl_mim_cl == "simclr"
                   else DINO(encoder, p, total_steps, steps_per_epoch))

    @classmethod
    def build(cls, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int) -> CLMIM:
        return cls(encoder, p, total_steps, steps_per_epoch)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return objectives.cl_mim(self.cl(views[:2], step), self.reconstruction(views[0]), self.p.cl_weight)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.cl.after_step(step)

    def scheduled(self, step: int) -> dict[str, float]:
        return self.cl.scheduled(step)
