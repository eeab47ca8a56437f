"""``sslvision init DIR --data PATH``: a ready project for a folder (or manifest) of labelled images.

:func:`inspect_data` looks at the data and decides, each with its reason:

- **layout**: an ImageFolder (class directories, or ``train/`` and ``test/`` of class directories), a
  CSV/Parquet manifest (``path,label[,split]``) or MNIST-format IDX files, as ingest reads them;
- **classes**: as ingest lists them (recorded in ``ingest.class_names``);
- **channels**: 3 when any sampled image has colour, else 1 (up to ``sample_per_class`` images per
  class, within ``time_budget_s``; a JPEG is decoded at reduced scale for this);
- **size**: the median short side of the sampled images, rounded to a multiple of 8, capped at
  ``max_size`` (every later stage's cost grows with its square: 64 on a CPU);
- **test split**: when the data has none, a stratified, seeded share of each class is held out and
  every file's split recorded in ``data/split.csv``, a manifest of the user's files where they are
  (paths relative to ``ingest.manifest_root``; nothing is copied). The test images then never train
  nor join the SSL pool (ingest's ``test`` split).

:func:`create_project` writes the project: ``params.yaml`` (every stage's settings from the pydantic
defaults, plus these choices with their reasons as comments), ``dvc.yaml`` (stages run the installed
package's runners, ``python -m sslvision.stages.<name>``), ``prefect.yaml`` (the flows as modules of
the installed package), ``data/pool/``, the monitor inbox ``data/inbox/``, git and DVC initialised.

The stage code is not a file of the project, so ``dvc.yaml`` cannot list it as a dependency; each stage
depends on the params key ``sslvision.version`` instead, which the runners check against the installed
package (``sslvision.stages.check_code_version``): after an upgrade, raising it re-runs every stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sslvision.params import SECTIONS, render_params, section_defaults, yaml_flow

SPLIT_FILE = "data/split.csv"
POOL = "data/pool"
INBOX = "data/inbox"
# Below this many pixels on the short side an image is upsampled to 8; the networks downsample by 8 or more.
MIN_SIZE = 8
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# A pixel is coloured when two of its channels differ by more than this (JPEG noise on a grey image stays
# below it); an image has colour when more than COLOUR_SHARE of its pixels are.
COLOUR_DIFF = 16
COLOUR_SHARE = 0.01

# Settings sized for a CPU (the demo's too): a ~1.2M-parameter ResNet-10 at half width, 300 SSL steps.
CPU_PRETRAIN = {
    "backbone_args": {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "stem_width": 32},
    "stem_stride": 2,
    "epochs": 10,
    "steps_per_epoch": 30,
    "temperature": 0.2,
}
FINETUNE_STEPS = 400  # fine-tuning steps init gives a small folder (the demo's recipe makes ~770 on 12,000 images)
CPU_NOTE = ("sized for a CPU: a ~1.2M-parameter ResNet-10 at half width (~8x cheaper than ResNet-18) with stem_stride "
            "2, 300 SSL steps (epochs x steps_per_epoch) at temperature 0.2; on a GPU use {} (the standard ResNet-18), "
            "stem_stride 1, epochs 100-200 and steps_per_epoch 0 (profiles/gpu.yaml)")
# params.yaml's sections in a project made by init: every stage's (sslvision.params.SECTIONS), not the demo's.
PROJECT_SECTIONS = tuple(name for name in SECTIONS if name != "demo")

# The demo project (this repository's params.yaml) where it departs from the settings classes' defaults:
# section -> key -> (value, why). demo_params_text writes the value and, above the key, why and the default.
_SEE_CPU = "see backbone_args"
_RECIPE = "see mode"
DEMO_OVERRIDES: dict[str, dict[str, tuple[Any, str]]] = {
    "ingest": {
        "source": ("data/demo/images", "the scenario `make demo` builds (`sslvision demo-data --out data/demo`)"),
    },
    "pretrain": {
        "backbone_args": (CPU_PRETRAIN["backbone_args"], CPU_NOTE),
        "stem_stride": (CPU_PRETRAIN["stem_stride"],
                        f"{_SEE_CPU}; on a CPU budget more steps beat a higher resolution"),
        "temperature": (CPU_PRETRAIN["temperature"], f"{_SEE_CPU} (sslvision sweep-temperature on the demo encoder)"),
        "epochs": (CPU_PRETRAIN["epochs"], _SEE_CPU),
        "steps_per_epoch": (CPU_PRETRAIN["steps_per_epoch"], _SEE_CPU),
        "workers": (1, "on 2 CPU cores one DataLoader worker keeps a core for the model"),
        "checkpoint_every": (25, "a killed run of the demo's 300 steps loses at most 25"),
    },
    "synthesize": {
        "generator": ("augment", "finetune.synthetic_weight is 0 in the demo, so the stage only reports what a "
                      "generator would add, and augment takes seconds where mae_inpaint takes minutes"),
    },
    "finetune": {
        "synthetic_weight": (0.0, "with the full fine-tune below, synthetic images raised validation balanced accuracy "
                             "but lowered test balanced accuracy and worst-class recall "
                             "(benchmarks/results/default_recipe.json): the validation labels are audited with the "
                             "same SSL embedding that filters the synthetic images, so they favour them; and they "
                             "add synthesis and training time"),
        "mode": ("finetune", "the noise-aware full fine-tune (with lr, layer_decay, label_smoothing, select_epoch "
                 "and calibrate below, as profiles/cpu.yaml; the default random sampler and logit-adjusted loss, "
                 "which beat the class-balanced sampler on worst-class recall and ECE at the same balanced accuracy: "
                 "benchmarks/README.md, finetune): the linear probe on the demo's "
                 "short-trained encoder loses to the pixel baseline the promotion gate asks it to beat, the fine-tune "
                 "wins on validation and test (benchmarks/results/default_recipe.json); it takes minutes on 2 CPU "
                 "cores where the probe takes seconds"),
        "epochs": (16, _RECIPE),
        "lr": (0.002, _RECIPE),
        "layer_decay": (1.0, f"{_RECIPE}; the short-trained encoder's early layers still have much to learn"),
        "label_smoothing": (0.1, f"{_RECIPE}; against the label noise the audit leaves"),
        "select_epoch": ("last", f"{_RECIPE}; the end of the schedule, not a noisy validation maximum"),
        "calibrate": (True, f"{_RECIPE}; undoes label_smoothing's under-confidence"),
    },
}
DEMO_HEADER = [
    "# sslvision parameters of the demo project (`make demo`): one section per stage. DVC tracks each stage's section,",
    "# so changing a value re-runs that stage and what depends on it, and nothing upstream.",
    "#",
    "# Generated by `sslvision params --out params.yaml`: each key, its default and its comment come from the stage's",
    "# settings class (named above each section); a `demo:` comment above a key says why the demo sets another value",
    "# (sslvision.project.DEMO_OVERRIDES). Change those, not this file: tests/test_params_file.py checks it is the",
    "# generator's output.",
]


class InitError(ValueError):
    """The data cannot make a project, or the directory cannot hold one; the message says which and why."""


@dataclass
class Inspection:
    """What :func:`inspect_data` found in the data and chose, with the reasons (``why``)."""

    data: Path
    layout: str
    classes: list[str]
    counts: dict[str, int]  # images per class, all splits
    channels: int
    size: int
    split: pd.DataFrame | None  # path,label,split of every listed file, when init makes the test split
    manifest_root: Path | None  # the data root of ``split``'s paths
    why: dict[str, str] = field(default_factory=dict)


def default_max_size() -> int:
    """64 on a CPU, 128 with a CUDA GPU: the image size init may choose at most."""
    import torch

    return 128 if torch.cuda.is_available() else 64


def inspect_data(data: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0, max_size: int = 64,
                 sample_per_class: int = 50, time_budget_s: float = 30.0) -> Inspection:
    """Look at ``data`` (ImageFolder directory, CSV/Parquet manifest or IDX directory) and decide the
    layout, classes, channels, image size and (when the data has no test split) a stratified held-out
    split; see the module docstring. Raises :class:`InitError` naming the path for data that cannot
    make a project: not found, no images, fewer than two classes, IDX files without a test split."""
    from sslvision.ingest import list_source

    data = Path(data).expanduser()
    if not data.exists():
        raise InitError(f"--data {data}: not found (expected an ImageFolder directory of class directories, a "
                        "CSV/Parquet manifest with columns path,label[,split], or a directory of IDX files)")
    data = data.resolve()
    try:
        listing = list_source(data)
    except (ValueError, OSError) as err:
        raise InitError(f"--data {data}: {err}") from err
    if not listing.items:
        raise InitError(f"--data {data}: no image files found ({listing.layout} layout, "
                        f"{len(listing.quarantine)} other files)")
    if len(listing.classes) < 2:
        raise InitError(f"--data {data}: {len(listing.classes)} class ({', '.join(listing.classes) or 'none'}); "
                        "a classifier needs at least two: one directory (or label) per class")
    has_test = any(item.split == "test" for item in listing.items)
    counts = {c: 0 for c in listing.classes}
    for item in listing.items:
        counts[listing.classes[item.label]] += 1
    layout = {"imagefolder": "ImageFolder of class directories", "manifest": "CSV/Parquet manifest",
              "idx": "MNIST-format IDX files"}.get(listing.layout, listing.layout)
    layout += " with a test split" if has_test else ", no test split"
    why = {"layout": f"{layout}: {sum(counts.values())} images in {len(counts)} classes"}

    channels, size, why["channels"], why["size"] = _look_at_images(
        listing, sample_per_class=sample_per_class, time_budget_s=time_budget_s, max_size=max_size, seed=seed)

    split, root = None, None
    if not has_test:
        if listing.layout == "idx":
            raise InitError(f"--data {data}: IDX files without t10k-* test files; init can hold out a test split "
                            "only of image files (write the test images' IDX files, or export an ImageFolder)")
        root = data if data.is_dir() else data.parent
        split, why["split"] = _stratified_split(listing, test_fraction=test_fraction, seed=seed)
    return Inspection(data=data, layout=listing.layout, classes=list(listing.classes), counts=counts,
                      channels=channels, size=size, split=split, manifest_root=root, why=why)


def _look_at_images(listing: Any, *, sample_per_class: int, time_budget_s: float, max_size: int,
                    seed: int) -> tuple[int, int, str, str]:
    """Channels and size from a sample of up to ``sample_per_class`` images per class, taken round-robin
    over the classes (so every class is seen when the time budget ends the sampling)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Any]] = {}
    for item in listing.items:
        by_class.setdefault(item.label, []).append(item)
    queues = [list(rng.permutation(len(v))[:sample_per_class]) for v in by_class.values()]
    members = list(by_class.values())
    deadline = time.monotonic() + time_budget_s
    short_sides: list[int] = []
    coloured = unreadable = 0
    modes: set[str] = set()
    timed_out = False
    while any(queues):
        for members_of, queue in zip(members, queues, strict=True):
            if not queue:
                continue
            item = members_of[queue.pop(0)]
            found = _image_facts(item)
            if found is None:
                unreadable += 1
                continue
            short, colour, mode = found
            short_sides.append(short)
            coloured += colour
            modes.add(mode)
        if time.monotonic() > deadline:
            timed_out = any(queues)
            break
    if not short_sides:
        raise InitError(f"{listing.items[0].source_path} ...: none of the {unreadable} sampled files is a readable "
                        "image")
    n = len(short_sides)
    sampled = f"{n} sampled images" + (f" ({unreadable} unreadable, which ingest will quarantine)" if unreadable
                                       else "") + (f", sampling stopped at {time_budget_s:.0f} s" if timed_out else "")
    channels = 3 if coloured else 1
    why_channels = (f"RGB: {coloured} of {sampled} have colour" if coloured else
                    f"grayscale: none of {sampled} has colour (modes {', '.join(sorted(modes))}); "
                    "3 keeps colour if later images have it")
    median = float(np.median(short_sides))
    rounded = max(MIN_SIZE, int(round(median / 8)) * 8)
    size = min(rounded, max_size)
    why_size = (f"median short side {median:.0f} px of {n} sampled images (range {min(short_sides)}-"
                f"{max(short_sides)}), rounded to a multiple of 8: {rounded}")
    if size < rounded:
        why_size += (f", capped at {max_size} (every later stage's cost grows with size squared; on a GPU "
                     f"`sslvision init --max-size {rounded}` or raise ingest.size)")
    return channels, size, why_channels, why_size


def _image_facts(item: Any) -> tuple[int, bool, str] | None:
    """``(short side, has colour, mode)`` of one listed image, or None when Pillow cannot read it."""
    from PIL import Image

    if item.pixels is not None:  # an IDX row: grayscale
        return min(item.pixels.shape[:2]), False, "L"
    try:
        with Image.open(item.path) as im:
            short, mode = min(im.size), im.mode
            if mode in GRAY_MODES:
                return short, False, mode
            im.draft("RGB", (64, 64))  # a JPEG decodes at 1/2-1/8 scale: colour needs no full resolution
            rgb = im.convert("RGB")
            rgb.thumbnail((64, 64))
            px = np.asarray(rgb, dtype=np.int16)
    except Exception:  # noqa: BLE001 - Pillow raises many types for a bad file; ingest will quarantine it
        return None
    diff = np.max(np.abs(px - np.roll(px, 1, axis=2)), axis=2)
    return short, bool(np.mean(diff > COLOUR_DIFF) > COLOUR_SHARE), mode


def _stratified_split(listing: Any, *, test_fraction: float, seed: int) -> tuple[pd.DataFrame, str]:
    """Every listed file (and every file ingest would refuse, so that it still quarantines them with the
    reason) as ``path,label,split``: ``test_fraction`` of each class, at least one image of a class with
    two or more, drawn with ``seed``. Labels are class names, or indices when the class names are integers
    (ingest reads integer labels as indices into ``ingest.class_names``)."""
    rng = np.random.default_rng(seed)
    integer = all(c.lstrip("-").isdigit() for c in listing.classes)
    by_class: dict[int, list[Any]] = {}
    for item in sorted(listing.items, key=lambda i: i.source_path):
        by_class.setdefault(item.label, []).append(item)
    rows, alone = [], []
    for label, items in sorted(by_class.items()):
        n_test = min(len(items) - 1, max(1, round(test_fraction * len(items)))) if len(items) > 1 else 0
        if n_test == 0:
            alone.append(listing.classes[label])
        test = set(rng.permutation(len(items))[:n_test].tolist())
        name = str(label) if integer else listing.classes[label]
        rows += [(it.source_path, name, "test" if i in test else "train") for i, it in enumerate(items)]
    names = set(listing.classes)
    for refused in listing.quarantine:
        first = refused["source_path"].split("/", 1)[0]
        label = first if first in names and "/" in refused["source_path"] else ""
        if integer and label:
            label = str(listing.classes.index(label))
        rows.append((refused["source_path"], label, "train"))
    split = pd.DataFrame(rows, columns=["path", "label", "split"])
    n_test = int((split["split"] == "test").sum())
    why = (f"the data has no test split: {test_fraction:.0%} of each class held out (stratified, seed {seed}), "
           f"{n_test} test images; every file's split is in {SPLIT_FILE}")
    if alone:
        why += f"; classes with one image keep it for training: {', '.join(alone)}"
    return split, why


# --- the project's files ---------------------------------------------------------------------------


def sslvision_version() -> str:
    from importlib.metadata import version

    return version("sslvision")


def demo_params_text() -> str:
    """The demo project's ``params.yaml`` (this repository's): every section's defaults, with
    :data:`DEMO_OVERRIDES` applied and explained in a comment above each (with the default it replaces)."""
    values = {name: {key: value for key, (value, _) in keys.items()} for name, keys in DEMO_OVERRIDES.items()}
    notes = {name: {key: [f"demo: {why} (default: {yaml_flow(section_defaults(name)[key])})"]
                    for key, (_, why) in keys.items()} for name, keys in DEMO_OVERRIDES.items()}
    return render_params(SECTIONS, values=values, notes=notes, header=DEMO_HEADER)


def params_text(found: Inspection, *, source: str, version: str) -> str:
    """``params.yaml`` of a project made by init: every stage's section (:data:`PROJECT_SECTIONS`) with its
    defaults, the choices of ``found`` with their reasons as comments above their keys, the CPU-sized
    pretraining (:data:`CPU_PRETRAIN`), and ``sslvision.version``."""
    ingest = {"source": source, "channels": found.channels, "size": found.size, "class_names": found.classes,
              "manifest_root": str(found.manifest_root) if found.manifest_root else ""}
    pretrain = dict(CPU_PRETRAIN)
    n_train = sum(found.counts.values()) - (int((found.split["split"] == "test").sum()) if found.split is not None
                                            else 0)
    default_batch = section_defaults("pretrain")["batch_size"]
    if n_train < default_batch:  # SimCLR's batch cannot exceed the images it trains on
        pretrain["batch_size"] = max(2, 2 ** int(np.log2(max(n_train, 2))))
    # the CPU recipe's SSL steps whatever the data's size: an epoch of a small folder is fewer steps
    steps = CPU_PRETRAIN["epochs"] * CPU_PRETRAIN["steps_per_epoch"]
    per_epoch = max(1, min(CPU_PRETRAIN["steps_per_epoch"], n_train // pretrain.get("batch_size", default_batch)))
    pretrain["epochs"] = int(np.ceil(steps / per_epoch))
    # the measured default recipe of the demo project for the later stages (DEMO_OVERRIDES, with its reasons)
    recipe = {name: DEMO_OVERRIDES[name] for name in ("synthesize", "finetune")}
    values = {"ingest": ingest, "pretrain": pretrain, "drift_eval": {"batch": ""}, "monitor": {"inbox": INBOX},
              **{name: {key: value for key, (value, _) in keys.items()} for name, keys in recipe.items()}}
    # a small folder gets at least 8 fine-tuning steps per epoch and FINETUNE_STEPS in all (an epoch of 150 images
    # at the default batch is one step: 16 epochs would be 16 steps)
    ft_batch = max(16, min(values["finetune"].get("batch_size", section_defaults("finetune")["batch_size"]),
                           2 ** int(np.log2(max(n_train // 8, 1)))))
    ft_epochs = max(values["finetune"]["epochs"], min(200, int(np.ceil(FINETUNE_STEPS / max(1, n_train // ft_batch)))))
    small = ft_epochs != values["finetune"]["epochs"]
    if small:
        values["finetune"].update(batch_size=ft_batch, epochs=ft_epochs)
    split = (f"the test split is recorded in {SPLIT_FILE}, a manifest of your files where they are (paths "
             "relative to manifest_root); delete it and run `sslvision init` again for another split")
    notes = {
        "ingest": {
            "source": [found.why["layout"], *([found.why["split"], split] if found.split is not None
                                              else [f"your data, read where it is: {found.data}"])],
            "channels": [found.why["channels"]],
            "size": [found.why["size"]],
            "class_names": [f"the classes found, in label order: {len(found.classes)}"],
        },
        "pretrain": {"batch_size": [f"{n_train} training images: the largest power of two up to that (the default "
                                    f"{default_batch} needs more images)"] if n_train < default_batch else [],
                     "backbone_args": [CPU_NOTE],
                     "epochs": [f"{steps} SSL steps: {per_epoch} per epoch of {n_train} training images"]},
        **{name: {key: [f"the demo's measured recipe: {why} (default: "
                        f"{yaml_flow(section_defaults(name)[key])})"] for key, (_, why) in keys.items()}
           for name, keys in recipe.items()},
        "drift_eval": {"batch": ["no production batch yet: drift_eval evaluates nothing and says so in "
                                 "reports/drift/trigger.json. `sslvision monitor` evaluates each batch put in "
                                 f"{INBOX}/; set this to a batch directory to evaluate one in `dvc repro`"]},
        "monitor": {"inbox": ["production batches: one directory per batch, flat images (unlabeled) or class "
                              "subdirectories (labeled)"]},
    }
    if small:
        notes["finetune"]["batch_size"] = [f"{n_train} training images: at least 8 steps per epoch"]
        notes["finetune"]["epochs"] = [f"about {FINETUNE_STEPS} fine-tuning steps on {n_train} training images "
                                       f"(the demo's 16 epochs are ~770 steps)"]
    header = [
        f"# sslvision project for {found.data}, made by `sslvision init` (sslvision {version}).",
        "# One section per stage; DVC tracks each, so changing a value re-runs that stage and what depends on it.",
        "# Every key, its default and its comment are those of the stage's settings class (named above each section);",
        "# what init chose from your data says why in a comment above it.",
        "",
        "# The sslvision release that runs the stages (python -m sslvision.stages.<name>): every stage depends on it,",
        "# so after upgrading sslvision set this to the new version to re-run the pipeline on the new code.",
        yaml.safe_dump({"sslvision": {"version": version}}, sort_keys=False).rstrip(),
    ]
    return render_params(PROJECT_SECTIONS, values=values, notes=notes, header=header)


def dvc_text(found: Inspection) -> str:
    """``dvc.yaml``: the stages of this repository's demo project, run from the installed package."""
    root_dep = ("\n      - ${ingest.manifest_root}  # your files (the manifest lists them)" if found.manifest_root
                else "")
    return DVC_TEMPLATE.replace("{ROOT_DEP}", root_dep)


DVC_TEMPLATE = """\
# The sslvision pipeline (made by `sslvision init`). Each stage runs the installed package's runner
# (python -m sslvision.stages.<name>), so its code is no file here: every stage depends on the params key
# sslvision.version instead (see params.yaml). `dvc repro` or `sslvision run` runs it.
stages:
  ingest:
    cmd: python -m sslvision.stages.ingest
    deps:
      - ${ingest.source}
      - ${ingest.pool}{ROOT_DEP}
    params:
      - ingest
      - sslvision.version
    outs:
      - data/ingested/images.npy
      - data/ingested/images.parquet
      - data/ingested/ssl_pool.parquet
      - data/ingested/eval_labels.parquet
      - data/ingested/manifest.parquet
      - data/ingested/classes.json
      - data/ingested/quarantine.parquet
      - data/ingested/duplicates.parquet
      - reports/ingest/dataset_card.md:
          cache: false
    metrics:
      - reports/ingest/metrics.json:
          cache: false
    plots:
      - reports/ingest/class_counts.csv:
          cache: false
          x: count
          y: class
          template: bar_horizontal
      - reports/ingest/class_counts.png:
          cache: false

  pretrain:
    # images only, never labels: a label change does not re-run it
    cmd: python -m sslvision.stages.pretrain
    deps:
      - data/ingested/ssl_pool.parquet
      - data/ingested/eval_labels.parquet
    params:
      - pretrain
      - sslvision.version
    outs:
      - models/encoder
    metrics:
      - reports/pretrain/metrics.json:
          cache: false
    plots:
      - reports/pretrain/live/plots/metrics:
          cache: false
          x: step
      - reports/pretrain/history.csv:
          cache: false
          x: epoch
          y: loss

  embed:
    cmd: python -m sslvision.stages.embed
    deps:
      - models/encoder
      - data/ingested/images.npy
      - data/ingested/images.parquet
    params:
      - pretrain.embed_batch_size
      - pretrain.device
      - sslvision.version
    outs:
      - data/embeddings

  audit:
    cmd: python -m sslvision.stages.audit
    deps:
      - data/ingested/manifest.parquet
      - data/ingested/images.npy
      - data/ingested/classes.json
      - data/embeddings
    params:
      - audit
      - sslvision.version
    outs:
      - data/audit/label_issues.parquet
      - data/audit/manifest_clean.parquet
    metrics:
      - reports/audit/metrics.json:
          cache: false
    plots:
      - reports/audit/issues_by_class.csv:
          cache: false
          x: issues
          y: class
          template: bar_horizontal
      - reports/audit/gallery.png:
          cache: false

  synthesize:
    cmd: python -m sslvision.stages.synthesize
    deps:
      - data/audit/manifest_clean.parquet
      - data/ingested/images.npy
      - data/ingested/classes.json
      - models/encoder
      - data/embeddings
    params:
      - synthesize
      - sslvision.version
    outs:
      - data/synthetic
    metrics:
      - reports/synthesize/metrics.json:
          cache: false
    plots:
      - reports/synthesize/per_class.csv:
          cache: false
          x: kept
          y: class
          template: bar_horizontal
      - reports/synthesize/filter_scores.csv:
          cache: false
          x: source_similarity
          y: target_prob
          template: scatter
      - reports/synthesize/grid.png:
          cache: false

  finetune:
    cmd: python -m sslvision.stages.finetune
    deps:
      - models/encoder
      - data/audit/manifest_clean.parquet
      - data/ingested/images.npy
      - data/ingested/manifest.parquet
      - data/ingested/classes.json
      - data/synthetic
      - data/embeddings
    params:
      - finetune
      - ingest.max_file_bytes  # the classifier's input conversion (what ingest applied to its images)
      - ingest.max_pixels
      - sslvision.version
    outs:
      - models/classifier
    metrics:
      - reports/finetune/metrics.json:
          cache: false
      # persisted: never restored from DVC's run cache, which would skip registration and the gate
      - reports/finetune/promotion.json:
          cache: false
          persist: true
    plots:
      - reports/finetune/predictions.csv:
          cache: false
          x: predicted
          y: actual
          template: confusion
      - reports/finetune/per_class_recall.csv:
          cache: false
          x: recall
          y: class
          template: bar_horizontal
      - reports/finetune/history.csv:
          cache: false
          x: epoch
          y: val_balanced_accuracy
      - reports/finetune/reliability.csv:
          cache: false
          x: confidence
          y: accuracy
      - reports/finetune/confusion_matrix.png:
          cache: false
      - reports/finetune/reliability.png:
          cache: false
      - reports/finetune/slices.csv:
          cache: false
          x: gap
          y: label
          template: bar_horizontal
      - reports/finetune/slices.png:
          cache: false
      # label efficiency (finetune.label_efficiency): SSL linear probe vs pixel baseline with few labels per class
      - reports/finetune/label_efficiency.csv:
          cache: false
          x: labels_per_class
          y: balanced_accuracy
          template: scatter

  drift_eval:
    # Evaluates drift_eval.batch (none in a new project: trigger.json says so, and there are no plots to list).
    # The batch is not a dependency here (there is none to name); changing drift_eval.batch re-runs the stage.
    # `sslvision monitor` evaluates the inbox's batches outside DVC.
    cmd: python -m sslvision.stages.drift_eval
    deps:
      - data/ingested/images.npy
      - data/ingested/manifest.parquet
      - data/ingested/classes.json
      - data/embeddings
      - data/audit/manifest_clean.parquet
      - models/encoder
      - models/classifier
    params:
      - drift_eval
      - sslvision.version
    metrics:
      - reports/drift/trigger.json:
          cache: false
"""


def prefect_text(root: Path) -> str:
    """``prefect.yaml``: the ``monitor`` and ``train`` deployments, their flows as modules of the
    installed package (``sslvision.flows.monitor:monitor``: no flow file in the project)."""
    return f"""\
# Prefect deployments of this project's flows, for a Prefect server with a process work pool:
#
#   prefect server start                                   # terminal 1 (UI at http://127.0.0.1:4200)
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   prefect work-pool create sslvision --type process
#   prefect deploy --all                                   # registers the deployments below
#   prefect worker start --pool sslvision                  # terminal 2: runs them
#
# Without a work pool, `sslvision serve` serves the same two deployments from one process. The flows
# are modules of the installed sslvision package. Keep the cron equal to params.yaml monitor.cron.
name: sslvision-project

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: {root}   # this project (edit it when the project moves)

deployments:
  - name: monitor
    description: Evaluate new production batches in the inbox; on degradation emit sslvision.degradation.
    entrypoint: sslvision.flows.monitor:monitor
    parameters:
      retrain: false
    schedules:
      - cron: "0 * * * *"
    concurrency_limit: 1
    work_pool:
      name: sslvision

  - name: train
    description: Re-run the DVC pipeline from a stage (forced downstream), then gated promotion.
    entrypoint: sslvision.flows.train:train
    concurrency_limit: 1
    triggers:
      - type: event
        enabled: true
        expect: ["sslvision.degradation"]
        match:
          prefect.resource.id: sslvision.pipeline
        parameters:
          from_stage: "{{{{ event.payload.stage }}}}"
          promote: true
    work_pool:
      name: sslvision
"""


GITIGNORE = """\
# embedded tracking stores (sslvision's local defaults; a server replaces them)
mlflow.db
mlflow.db-journal
mlartifacts/
mlruns/
# production images, decode cache and checkpoints (DVC adds its outputs here itself)
/data/inbox/*
!/data/inbox/.gitkeep
/data/pool/*
!/data/pool/.gitkeep
/data/.ingest_cache/
/checkpoints/
/dvclive/
/.sslvision-pipeline.lock
"""


def create_project(directory: str | os.PathLike, found: Inspection) -> Path:
    """Write the project for ``found`` into ``directory`` (absent or empty; refused otherwise), with git
    and DVC initialised and, when git knows who you are, a first commit. Everything is made in a
    temporary directory beside it and moved into place at the end: a failure leaves no half project."""
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InitError(f"{directory}: exists and is not an empty directory; init makes a new project "
                        "(choose another directory)")
    if directory.resolve().is_relative_to(found.manifest_root or found.data):
        raise InitError(f"{directory}: inside the data ({found.data}); make the project elsewhere")
    directory.parent.mkdir(parents=True, exist_ok=True)
    version = sslvision_version()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for sub in (POOL, INBOX):
            (tmp / sub).mkdir(parents=True)
            (tmp / sub / ".gitkeep").write_text("")  # an empty directory is still a DVC dependency that exists
        source = str(found.data)
        if found.split is not None:
            found.split.to_csv(tmp / SPLIT_FILE, index=False)
            source = SPLIT_FILE
        (tmp / "params.yaml").write_text(params_text(found, source=source, version=version))
        (tmp / "dvc.yaml").write_text(dvc_text(found))
        (tmp / "prefect.yaml").write_text(prefect_text(directory))
        (tmp / ".gitignore").write_text(GITIGNORE)
        _run(["git", "init", "-q"], tmp)
        _run([sys.executable, "-m", "dvc", "init", "-q"], tmp)
        _run(["git", "add", "-A"], tmp)
        # A first commit (DVC experiments and dvclive compare against one) as the user; without a git
        # identity there is none and the user commits later.
        subprocess.run(["git", "commit", "-qm", "sslvision init"], cwd=tmp, capture_output=True)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the project is an ordinary directory
        if directory.exists():
            directory.rmdir()
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise InitError(f"`{' '.join(cmd)}` failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
