"""Benchmark of the ingest stage on a 60,000-image ImageFolder (the Fashion-MNIST train set as PNGs).

Measures, same machine, same run, every measurement in a fresh subprocess:
- images/s of ``sslvision.ingest.run_ingest`` (decode, verify, convert, hash, write the array) against
  iterating torchvision's ``ImageFolder`` through a ``DataLoader`` with the same decode + convert
  (``sslvision.ingest.convert_image``) and the same number of workers;
- re-ingest with the content-hash cache warm (nothing new to decode);
- reading the ingested array back (memory-mapped) against decoding the PNGs again, one process each;
- peak memory of ingest at 6,000 and 60,000 images: the whole process tree (main + workers, sampled
  every 50 ms with psutil) and the main process alone (``ru_maxrss``). It must not grow tenfold.

Usage: ``python benchmarks/ingest.py [--workdir DIR] [--workers 2]`` (writes ``benchmarks/results/ingest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_pngs(args: tuple) -> None:
    from PIL import Image

    images, labels, start, root = args
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(x).save(Path(root) / f"{y}" / f"{start + i:05d}.png")


def build_image_folder(root: Path, workers: int) -> tuple[Path, Path]:
    """``root/full/train/<label>/<i>.png`` for the 60,000 train images, and ``root/small`` with the
    first 6,000 of them (hard links, same bytes)."""
    from sslvision.idx import read_idx

    full, small = root / "full", root / "small"
    if (root / "done").exists():
        return full, small
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    for y in range(10):
        (full / "train" / str(y)).mkdir(parents=True, exist_ok=True)
        (small / "train" / str(y)).mkdir(parents=True, exist_ok=True)
    step = 2000
    jobs = [(images[s:s + step], labels[s:s + step], s, str(full / "train")) for s in range(0, len(images), step)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write_pngs, jobs))
    for i in range(6000):
        name = f"{labels[i]}/{i:05d}.png"
        os.link(full / "train" / name, small / "train" / name)
    (root / "done").touch()
    return full, small


# --- children: each runs in its own process ---------------------------------------------------------


def child_ingest(source: str, out: str, cache: str, workers: int) -> dict:
    from sslvision.ingest import IngestParams, run_ingest

    p = IngestParams(source=source, workers=workers, chunk_size=1024, cache_dir=cache)
    t0 = time.perf_counter()
    metrics = run_ingest(p, source, out)
    seconds = time.perf_counter() - t0
    return {"images": metrics["images"], "seconds": seconds, "decoded": metrics["decode"]["decoded"]}


def child_dataloader(source: str, workers: int) -> dict:
    import torch
    from torchvision.datasets import ImageFolder

    from sslvision.ingest import convert_image

    torch.set_num_threads(1)
    t0 = time.perf_counter()  # listing the files counts, as it does for ingest
    ds = ImageFolder(str(Path(source) / "train"),
                     transform=lambda im: torch.from_numpy(convert_image(im, 1, 28).copy()))
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers)
    n = 0
    for x, _ in loader:
        n += len(x)
    return {"images": n, "seconds": time.perf_counter() - t0}


def child_read_back(npy: str, source: str, n: int) -> dict:
    from PIL import Image

    from sslvision.ingest import convert_image

    t0 = time.perf_counter()
    images = np.load(npy, mmap_mode="r")
    total = 0
    for start in range(0, len(images), 256):
        total += int(np.asarray(images[start:start + 256], dtype=np.float32).sum() > 0)
    array_s = time.perf_counter() - t0
    files = sorted(Path(source).rglob("*.png"))[:n]
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            convert_image(im, 1, 28).astype(np.float32)
    png_s = time.perf_counter() - t0
    return {"array_images": len(images), "array_seconds": array_s, "png_images": len(files), "png_seconds": png_s}


def run_child(args: list[str]) -> dict:
    """Run this script as a child; return its JSON result plus peak memory (tree sampled, main exact)."""
    import psutil

    proc = psutil.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["tree_peak_mib"] = peak / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the PNGs and outputs go (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"ingest": lambda: child_ingest(rest[0], rest[1], rest[2], int(rest[3])),
                  "dataloader": lambda: child_dataloader(rest[0], int(rest[1])),
                  "read_back": lambda: child_read_back(rest[0], rest[1], int(rest[2]))}[kind]()
        result["main_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from _common import report

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        full, small = build_image_folder(work / "pngs", args.workers)
        print(f"built the PNG ImageFolder in {time.perf_counter() - t0:.1f} s", flush=True)
        w = str(args.workers)
        runs = {
            "small": run_child(["ingest", str(small), str(work / "out_small"), str(work / "cache_small"), w]),
            "full": run_child(["ingest", str(full), str(work / "out_full"), str(work / "cache_full"), w]),
        }
        runs["cached"] = run_child(["ingest", str(full), str(work / "out_cached"), str(work / "cache_full"), w])
        runs["dataloader"] = run_child(["dataloader", str(full), w])
        back = run_child(["read_back", str(work / "out_full" / "images.npy"), str(full), "6000"])

    rate = {k: r["images"] / r["seconds"] for k, r in runs.items()}
    tv = "torchvision ImageFolder + DataLoader"
    setting = f"{args.workers} workers, 28x28 grayscale"
    rows = [
        {"system": "sslvision ingest", "metric": "throughput, 60,000 PNGs", "value": rate["full"], "unit": "images/s",
         "setting": setting},
        {"system": tv, "metric": "throughput, 60,000 PNGs (one epoch)", "value": rate["dataloader"],
         "unit": "images/s", "setting": setting},
        {"system": "sslvision ingest", "metric": "re-ingest, cache warm (0 decoded)", "value": rate["cached"],
         "unit": "images/s", "setting": setting},
        {"system": "sslvision ingest", "metric": "throughput, 6,000 PNGs", "value": rate["small"], "unit": "images/s",
         "setting": setting},
        {"system": "read ingested images.npy (mmap)", "metric": "read back as float32", "unit": "images/s",
         "value": back["array_images"] / back["array_seconds"], "setting": "1 process"},
        {"system": "decode the PNGs again (Pillow)", "metric": "read back as float32", "unit": "images/s",
         "value": back["png_images"] / back["png_seconds"], "setting": "1 process"},
    ]
    for n, key in (("6,000", "small"), ("60,000", "full")):
        rows.append({"system": "sslvision ingest", "metric": f"peak RSS, {n} images, main + workers",
                     "value": runs[key]["tree_peak_mib"], "unit": "MiB", "setting": setting})
        rows.append({"system": "sslvision ingest", "metric": f"peak RSS, {n} images, main process",
                     "value": runs[key]["main_peak_mib"], "unit": "MiB", "setting": setting})
    rows.append({"system": tv, "metric": "peak RSS, 60,000 images, main + workers",
                 "value": runs["dataloader"]["tree_peak_mib"], "unit": "MiB", "setting": setting})
    growth = runs["full"]["tree_peak_mib"] / runs["small"]["tree_peak_mib"]
    rows.append({"system": "sslvision ingest", "metric": "peak RSS growth 6,000 -> 60,000 images (10x data)",
                 "value": growth, "unit": "x", "setting": setting})
    assert runs["cached"]["decoded"] == 0, "the warm re-ingest decoded images again"
    assert growth < 10, f"ingest memory grew {growth:.1f}x for 10x the images"
    report("ingest", rows)


if __name__ == "__main__":
    main()
