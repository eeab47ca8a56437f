"""SimCLR pretraining: this stage against lightly's SimCLR recipe, same machine, backbone, batch, budget.

Both sides train a ResNet-18 adapted to 28x28 (3x3 stride-1 stem, no max-pool, 1 input channel) with
SimCLR on the 60,000 Fashion-MNIST training images, for the same wall-clock budget, at the same batch
size and with the same number of DataLoader workers, each in its own process:

- sslvision: ``sslvision.pretrain.train`` (timm ResNet-18 initialised as torchvision's, i.e. without
  timm's zero-init of each residual block's last BN; uint8 memory-mapped array, albumentations
  views made in workers, cosine schedule without warm-up, as lightly's recipe has none; ``--optimizer``:
  ``sgd`` (default) with lightly's learning rate, momentum and weight decay, so that both sides keep the
  same optimiser state, or ``adamw``, the stage's default, with its lr and weight decay), params
  otherwise the stage's defaults;
- lightly: its recipe: torchvision ResNet-18 (same stem change), ``SimCLRProjectionHead``,
  ``NTXentLoss``, ``SimCLRTransform`` (single-channel normalisation) on torchvision's ``FashionMNIST``
  dataset (PIL images), SGD (lr 0.06 x batch/256, momentum 0.9, weight decay 5e-4), as in lightly's
  examples.

Measured alike for both: training throughput (images/s, an image counted once for its two views,
steady state between the first and the last step), the set-up time to the first step and the
throughput over the whole budget, peak memory (process + DataLoader workers, sampled every 0.2 s: summed
RSS, and summed PSS every 2 s, which counts a page a forked worker shares with its parent once; sampling
PSS every 0.2 s slowed both systems' training by ~15%; and PSS without file-backed pages, because the
stage's workers memory-map ``images.npy`` and the image pages they touch are page cache the kernel can
drop, where lightly's dataset holds the same images in anonymous memory), and the accuracy of
the frozen features on a stratified subset of the Fashion-MNIST test set (``--eval-images``; all 10,000
when a GPU makes embedding cheap): weighted kNN (k=200, T=0.1) and a
linear probe, by 2-fold cross-validation over the test set (the stage's protocol: one half is the
kNN bank / probe training set, the other half is scored, then swapped). Raw-pixel kNN is reported
with the same protocol and with the classic protocol (bank = the 60,000 training images).

    .venv/bin/python benchmarks/pretrain.py --budget-s 150 --batch-size 128

Needs the ``bench`` extra (``pip install -e .[bench]``) for lightly.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _anon_pss(pid: int) -> int:
    """Pss_Anon + Pss_Shmem of a process in bytes: its PSS without file-backed pages (a memory-mapped file's
    pages are page cache the kernel can drop and read again; anonymous memory it cannot)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                total += int(line.split()[1]) * 1024
    return total


class PeakRSS:
    """Peak resident memory of this process plus its children (DataLoader workers): ``peak`` sums their
    RSS (pages shared by a forked worker and its parent counted in both), ``peak_pss`` their PSS (each
    shared page split between the processes sharing it: what the run really holds)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.peak_pss = 0
        self.peak_anon = 0
        self.interval = interval
        self.pss_every = 10
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
                if tick % self.pss_every == 0:  # PSS walks the page tables: sampled 10x less often
                    self.peak_pss = max(self.peak_pss, sum(p.memory_full_info().pss for p in procs))
                    self.peak_anon = max(self.peak_anon, sum(_anon_pss(p.pid) for p in procs))
            except Exception:  # a worker exiting between the listing and the read
                pass
            tick += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def eval_subset(test_y: np.ndarray, n: int) -> np.ndarray:
    """The first ``n / 10`` test images of each class (all 10,000 when ``n >= 10000``)."""
    per_class = n // 10
    return np.sort(np.concatenate([np.flatnonzero(test_y == c)[:per_class] for c in range(10)]))


def fmnist_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sslvision.idx import read_idx

    return (read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(FMNIST / "train-labels-idx1-ubyte.gz"),
            read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz"))


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from sslvision.models import embed
    from sslvision.pretrain import PretrainParams, train

    train_x, _, test_x, test_y = fmnist_arrays()
    test_x = test_x[eval_subset(test_y, args.eval_images)]
    path = work / "train_images.npy"
    np.save(path, train_x[..., None])
    n_train = len(train_x)
    del train_x  # the stage reads the memory-mapped file; the harness's copy is not part of what is measured
    p = PretrainParams.model_validate({
        "method": "simclr", "backbone": "resnet18", "backbone_args": json.loads(args.backbone_args), "stem_stride": 1,
        "batch_size": args.batch_size, "temperature": args.temperature, "epochs": 100, "steps_per_epoch": 0,
        # no warm-up, as lightly's recipe: with the stage's default 0.5-epoch warm-up a 150 s budget on a CPU
        # would end inside the warm-up at a tiny learning rate
        "warmup_epochs": 0,
        **({"optimizer": "sgd", "lr": 0.06 * args.batch_size / 256, "momentum": 0.9, "weight_decay": 5e-4}
           if args.optimizer == "sgd" else {"optimizer": "adamw"}),
        "workers": args.workers, "checkpoint_every": 10**9, "checkpoint_dir": str(work / "ckpt"), "seed": 0})
    torch.set_num_threads(args.threads)
    with PeakRSS() as rss:
        start = time.perf_counter()
        marks: list[tuple[float, int]] = []

        def budget(step: int, loss: float) -> bool:
            marks.append((time.perf_counter(), step * args.batch_size))
            return time.perf_counter() - start > args.budget_s

        result = train(p, path, np.arange(n_train), on_step=budget, progress=True)
        wall = time.perf_counter() - start
    feats = embed(result.encoder, test_x[..., None], 512)
    np.save(work / "ours_test.npy", feats)
    return {**_throughput(start, marks, wall), "steps": result.steps, "peak_rss_mib": rss.peak / 2**20,
            "peak_pss_mib": rss.peak_pss / 2**20,
            "peak_anon_mib": rss.peak_anon / 2**20}


def _throughput(start: float, marks: list[tuple[float, int]], wall: float) -> dict:
    """Both systems measured alike: steady-state images/s between the first and the last step (set-up,
    worker start and the first step excluded), the set-up time to the first step, and images/s over the
    whole wall time."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return {"images": n1, "train_s": wall, "img_s": (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan"),
            "first_step_s": t0 - start, "wall_img_s": n1 / wall}


def run_lightly(args: argparse.Namespace, work: Path) -> dict:
    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = work / "tv"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in FMNIST.glob("*-ubyte.gz"):  # torchvision's dataset reads the decompressed IDX files
        target = raw / f.name.removesuffix(".gz")
        if not target.exists():
            target.write_bytes(gzip.decompress(f.read_bytes()))
    # lightly's defaults, at 28 px and with single-channel normalisation
    transform = SimCLRTransform(input_size=28, normalize={"mean": [0.5], "std": [0.5]})
    dataset = torchvision.datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    head = SimCLRProjectionHead(512, 512, 128)
    model = nn.Sequential(backbone, head)
    criterion = NTXentLoss(temperature=args.temperature)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * args.batch_size / 256, momentum=0.9,
                                weight_decay=5e-4)
    images, steps = 0, 0
    marks: list[tuple[float, int]] = []
    with PeakRSS() as rss:
        start = time.perf_counter()
        done = False
        while not done:
            for (x0, x1), _ in loader:
                loss = criterion(model(x0), model(x1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                images += len(x0)
                steps += 1
                marks.append((time.perf_counter(), images))
                if steps % 10 == 0:
                    print(f"lightly step {steps} loss {loss.item():.4f}", flush=True)
                if time.perf_counter() - start > args.budget_s:
                    done = True
                    break
        wall = time.perf_counter() - start
    backbone.eval()
    _, _, test_x, test_y = fmnist_arrays()
    test_x = test_x[eval_subset(test_y, args.eval_images)]
    with torch.no_grad():
        x = torch.from_numpy(test_x).float().div(255).sub(0.5).div(0.5)[:, None]
        feats = torch.cat([backbone(x[i:i + 512]) for i in range(0, len(x), 512)]).numpy()
    np.save(work / "lightly_test.npy", feats)
    return {**_throughput(start, marks, wall), "steps": steps, "peak_rss_mib": rss.peak / 2**20,
            "peak_pss_mib": rss.peak_pss / 2**20,
            "peak_anon_mib": rss.peak_anon / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=150.0, help="training wall-clock budget per system")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--eval-images", type=int, default=2000,
                    help="stratified test subset embedded for kNN / linear probe (10000 = all)")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                    help="our side's optimiser: sgd = lightly's (lr 0.06 x batch/256, momentum 0.9, wd 5e-4); "
                         "adamw = the stage's default (params.yaml pretrain.lr / weight_decay)")
    ap.add_argument("--backbone-args", default='{"zero_init_last": false}',
                    help="extra timm kwargs of our ResNet-18 as JSON. Default: no zero-init of each block's last "
                         "BN, as torchvision's ResNet-18 on lightly's side (zero_init_residual=False); '{}' "
                         "gives timm's own init")
    ap.add_argument("--only", choices=["ours", "lightly"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # a child process: one system, results as JSON on the last stdout line
        out = (run_ours if args.only == "ours" else run_lightly)(args, args.work)
        print("RESULT " + json.dumps(out), flush=True)
        return

    from sslvision.pretrain import evaluate

    _, train_y, test_x, test_y = fmnist_arrays()
    subset = eval_subset(test_y, args.eval_images)
    test_y = test_y.astype(np.int64)
    rows: list[dict] = []
    setting = (f"ResNet-18 28x28, batch {args.batch_size}, {args.budget_s:.0f} s budget, {args.workers} worker, "
               f"eval on {len(subset)} test images, our optimiser {args.optimizer}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {}
        for system in ("ours", "lightly"):
            cmd = [sys.executable, __file__, "--only", system, "--work", str(work), "--budget-s", str(args.budget_s),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--threads", str(args.threads), "--temperature", str(args.temperature),
                   "--eval-images", str(args.eval_images), "--backbone-args", args.backbone_args,
                   "--optimizer", args.optimizer]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{system} failed:\n{proc.stderr[-3000:]}")
            results[system] = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
            print(system, results[system], flush=True)
        for system, name in (("ours", "sslvision"), ("lightly", "lightly")):
            r = results[system]
            scores = evaluate(np.load(work / f"{system}_test.npy"), test_y[subset], 10)
            rows += [
                {"system": name, "metric": "train throughput", "value": r["img_s"], "unit": "img/s",
                 "setting": setting},
                {"system": name, "metric": "set-up to first step", "value": r["first_step_s"], "unit": "s",
                 "setting": setting},
                {"system": name, "metric": "throughput over the whole budget", "value": r["wall_img_s"],
                 "unit": "img/s", "setting": setting},
                {"system": name, "metric": "images seen", "value": r["images"], "unit": "images", "setting": setting},
                {"system": name, "metric": "peak RSS", "value": r["peak_rss_mib"], "unit": "MiB", "setting": setting},
                {"system": name, "metric": "peak PSS", "value": r["peak_pss_mib"], "unit": "MiB", "setting": setting},
                {"system": name, "metric": "peak anonymous PSS (no file pages)", "value": r["peak_anon_mib"],
                 "unit": "MiB", "setting": setting},
                {"system": name, "metric": "kNN accuracy (test, 2-fold)", "value": scores["knn_accuracy"],
                 "unit": "fraction", "setting": setting},
                {"system": name, "metric": "linear probe accuracy (test, 2-fold)",
                 "value": scores["linear_probe_accuracy"], "unit": "fraction", "setting": setting},
            ]
    raw = test_x.reshape(len(test_x), -1).astype(np.float32)
    raw_scores = evaluate(raw[subset], test_y[subset], 10)
    from sslvision.metrics import knn_predict

    train_raw = fmnist_arrays()[0].reshape(60000, -1).astype(np.float32)
    classic = float((knn_predict(train_raw, train_y, raw, 10, 200, 0.1) == test_y).mean())
    from sklearn.neighbors import KNeighborsClassifier  # the usual raw-pixel reference (~85.5%)

    plain = float(KNeighborsClassifier(n_neighbors=5).fit(train_raw, train_y).score(raw, test_y))
    rows += [
        {"system": "raw pixels", "metric": "kNN accuracy (test, 2-fold)", "value": raw_scores["knn_accuracy"],
         "unit": "fraction", "setting": "784-d pixels"},
        {"system": "raw pixels", "metric": "linear probe accuracy (test, 2-fold)",
         "value": raw_scores["linear_probe_accuracy"], "unit": "fraction", "setting": "784-d pixels"},
        {"system": "raw pixels", "metric": "kNN accuracy (bank = 60k train)", "value": classic, "unit": "fraction",
         "setting": "784-d pixels"},
        {"system": "raw pixels", "metric": "kNN accuracy (bank = 60k train, k=5 euclidean)", "value": plain,
         "unit": "fraction", "setting": "784-d pixels"},
        {"system": "sslvision / lightly", "metric": "throughput ratio",
         "value": results["ours"]["img_s"] / results["lightly"]["img_s"], "unit": "x", "setting": setting},
    ]
    report("pretrain", rows)


if __name__ == "__main__":
    main()
