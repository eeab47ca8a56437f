"""Experiment (issue 5, a negative result kept so it can be re-run): a small class-conditional DDPM in pixels as
the synthesis generator, measured by ``benchmarks/synthesize.py`` on the same plan, filter and classifier as
the built-in generators.

Not a pipeline generator: on the demo it lowered tail recall (see the README's section on what synthetic images
can add), so it is not in ``sslvision.synthesize``. It runs in the benchmark in place of ``feature_interp``
(that name selects it; the system is reported as ``ddpm``).

The model: a UNet (channels 32/64/128, ~0.94 M parameters) conditioned on the time step and the class (plus a
null class for classifier-free guidance, dropped 15% of the time), trained with the epsilon loss and a cosine
schedule on the audited train images (batch 128, AdamW, one-cycle lr 1e-3, EMA of the weights with a warm-up);
with ``--balanced`` every class is drawn equally often. Sampling: DDIM (eta 0), ``--sample-steps`` steps, guidance
``--guide``. A sample has no source image, so the filter's copy check compares it with its nearest real image
of the class in SSL space. The trained UNet is cached at ``--cache`` (delete it to retrain).

    .venv/bin/python benchmarks/experiments/ddpm_generator.py --ddpm-steps 2500 --balanced \\
        -- --root . --threads 2 --generators feature_interp --probe-seeds 3 --set oversample=3 --name ddpm_stage

On 2 CPU cores: ~0.5 s per training step (2,500 steps: ~22 min), ~2.5 min to sample 1,000 candidates.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import synthesize as bench  # noqa: E402  benchmarks/synthesize.py

import sslvision.synthesize as S  # noqa: E402
from sslvision.models import embed, to_input  # noqa: E402

log = logging.getLogger("ddpm")
T = 1000


class Block(nn.Module):
    """Pre-norm residual block; the time/class embedding is added after the first convolution."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.e(e)[:, :, None, None]
        return self.c2(F.silu(self.n2(h))) + self.skip(x)


class UNet(nn.Module):
    def __init__(self, num_classes: int, channels: tuple[int, int, int] = (32, 64, 128), emb: int = 128,
                 cin: int = 1):
        super().__init__()
        a, b, c = channels
        half = emb // 2  # sinusoidal time-embedding frequencies: fixed, so computed once (not in the state dict)
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)
        self.t = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.y = nn.Embedding(num_classes + 1, emb)  # the last one is the null class
        self.inp = nn.Conv2d(cin, a, 3, padding=1)
        self.d1, self.down1 = Block(a, a, emb), nn.Conv2d(a, a, 3, 2, 1)
        self.d2, self.down2 = Block(a, b, emb), nn.Conv2d(b, b, 3, 2, 1)
        self.m1, self.m2 = Block(b, c, emb), Block(c, c, emb)
        self.u2, self.u1 = Block(c + b, b, emb), Block(b + a, a, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, a), nn.SiLU(), nn.Conv2d(a, cin, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.freqs
        e = self.t(torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], 1)) + self.y(y)
        h0 = self.d1(self.inp(x), e)
        h1 = self.d2(self.down1(h0), e)
        h = self.m2(self.m1(self.down2(h1), e), e)
        h = self.u2(torch.cat([F.interpolate(h, size=h1.shape[-2:]), h1], 1), e)
        h = self.u1(torch.cat([F.interpolate(h, size=h0.shape[-2:]), h0], 1), e)
        return self.out(h)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule, ``t`` in [0, T]; floored so the first sampling step stays finite."""
    return (torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2).clamp(min=1e-4)


class DDPMGenerator:
    name = "ddpm"

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def fit(self, real: S.RealSet, encoder) -> dict[str, float]:
        a = self.args
        self.encoder = encoder
        self.k = k = len(real.classes)
        torch.manual_seed(1234)
        self.net = UNet(k)
        if a.cache.exists():
            self.net.load_state_dict(torch.load(a.cache))
            self.net.eval()
            log.info("ddpm: cached UNet %s", a.cache)
            return {"decoder_steps": 0.0}
        x_all = to_input(torch.from_numpy(real.images))
        y_all = torch.from_numpy(real.labels)
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=a.ddpm_steps, pct_start=0.05)
        g = torch.Generator().manual_seed(0)
        counts = torch.bincount(y_all, minlength=k).double()
        w = 1.0 / counts[y_all] if a.balanced else torch.ones(len(y_all))
        ema = {n: p.detach().clone() for n, p in self.net.state_dict().items()}
        t0, losses = time.time(), []
        for step in range(a.ddpm_steps):
            idx = torch.multinomial(w, 128, replacement=True, generator=g)
            x0, y = x_all[idx], y_all[idx].clone()
            y[torch.rand(len(y), generator=g) < 0.15] = k
            t = torch.rand(len(y), generator=g) * T
            ab = alpha_bar(t)[:, None, None, None]
            eps = torch.randn(x0.shape, generator=g)
            loss = F.mse_loss(self.net(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, y), eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                d = min(0.999, (1 + step) / (10 + step))  # EMA warm-up: no share of the random init left
                for n, p in self.net.state_dict().items():
                    if p.dtype.is_floating_point:
                        ema[n].mul_(d).add_(p, alpha=1 - d)
            losses.append(loss.item())
            if (step + 1) % 100 == 0:
                log.info("ddpm: step %d/%d loss %.4f (%.0f s)", step + 1, a.ddpm_steps, np.mean(losses[-100:]),
                         time.time() - t0)
        self.net.load_state_dict(ema)
        self.net.eval()
        a.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), a.cache)
        return {"decoder_steps": float(a.ddpm_steps), "decoder_final_loss": float(np.mean(losses[-100:]))}

    @torch.no_grad()
    def generate(self, real: S.RealSet, label: int, count: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        a = self.args
        torch.manual_seed(int(rng.integers(2**31)))
        ts = torch.linspace(T - 1, 0, a.sample_steps + 1)
        out = []
        for start in range(0, count, 512):
            n = min(512, count - start)
            x = torch.randn(n, real.images.shape[3], *real.images.shape[1:3])
            yc, yu = torch.full((n,), label), torch.full((n,), self.k)
            for i in range(a.sample_steps):
                t, tn = ts[i], ts[i + 1]
                e = self.net(torch.cat([x, x]), torch.full((2 * n,), float(t)), torch.cat([yc, yu]))
                eps = e[n:] + a.guide * (e[:n] - e[n:])
                ab, abn = alpha_bar(t), alpha_bar(tn) if i + 1 < a.sample_steps else torch.tensor(1.0)
                x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
                x = abn.sqrt() * x0 + (1 - abn).sqrt() * eps
            out.append(S.to_uint8(x0))
            log.info("ddpm: %s %d/%d sampled", real.classes[label], start + n, count)
        imgs = np.concatenate(out)
        idx = real.of_class(label)
        z, zr = S.l2_normalise(embed(self.encoder, imgs)), S.l2_normalise(real.embeddings[idx])
        nearest = idx[np.argmax(z @ zr.T, axis=1)]
        return imgs, np.stack([nearest, np.full(len(nearest), -1)], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ddpm-steps", type=int, default=2500)
    ap.add_argument("--balanced", action="store_true", help="draw every class equally often in training")
    ap.add_argument("--guide", type=float, default=2.0, help="classifier-free guidance scale")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--cache", type=Path, default=Path("checkpoints/ddpm_experiment/unet.pt"))
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then benchmarks/synthesize.py's arguments")
    args = ap.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args

    make, system_name, save_grid = S.make_generator, bench._system_name, bench._save_grid
    S.make_generator = lambda params, *a, **kw: (DDPMGenerator(args) if params.generator == "feature_interp"
                                                 else make(params, *a, **kw))
    bench._system_name = lambda g: "ddpm" if g == "feature_interp" else system_name(g)
    bench._save_grid = lambda result, real, p, path: save_grid(
        result, real, p, path.with_name(path.name.replace("feature_interp", "ddpm")))
    bench.main(bench_args)


if __name__ == "__main__":
    main()
