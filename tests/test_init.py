"""``sslvision init DIR --data PATH``: the data is inspected (layout, channels, size, held-out split),
the project written with git and DVC, and ``dvc repro`` in it runs every stage from the installed
package with no copy of this repository."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from sslvision.cli import app
from sslvision.params import _merge
from sslvision.project import InitError, create_project, inspect_data

BIN = Path(sys.executable).parent
CLASSES = ["red fox", "blue jay", "green frog"]  # names with spaces
SIZES = [(40, 30), (52, 60), (36, 36), (44, 48)]  # mixed sizes: short sides 30, 52, 36, 44


def photo_folder(root: Path, per_class: int = 12, colour: bool = True, classes=CLASSES) -> Path:
    """An ImageFolder of PNG and JPEG images of mixed sizes, each class its own hue, the same file
    names in every class folder (as cameras make them)."""
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            base = np.zeros((h, w, 3), np.int16)
            base[..., ci % 3] = 150
            noise = rng.integers(0, 60, (h, w, 1 if not colour else 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8) if colour else \
                np.repeat(np.clip(40 * ci + noise, 0, 255).astype(np.uint8), 3, axis=2)
            Image.fromarray(arr).save(root / cls / f"IMG_{i:04d}.{'png' if i % 2 else 'jpg'}")
    return root


# --- inspection decisions --------------------------------------------------------------------------


def test_colour_images_give_rgb_and_size_from_the_median_short_side(tmp_path):
    found = inspect_data(photo_folder(tmp_path / "photos"), max_size=64)
    assert found.channels == 3 and "have colour" in found.why["channels"]
    assert found.size == 40  # median short side 40 (30, 52, 36, 44 in equal numbers) -> multiple of 8
    assert sorted(found.classes) == sorted(CLASSES)


def test_size_is_capped_and_the_reason_says_how_to_raise_it(tmp_path):
    found = inspect_data(photo_folder(tmp_path / "photos"), max_size=16)
    assert found.size == 16 and "--max-size 40" in found.why["size"]


def test_grayscale_folder_gives_one_channel_even_when_saved_as_rgb(tmp_path):
    found = inspect_data(photo_folder(tmp_path / "gray", colour=False))
    assert found.channels == 1, found.why["channels"]


def test_no_test_split_gives_a_stratified_seeded_split_of_every_file(tmp_path):
    data = photo_folder(tmp_path / "photos", per_class=10)
    found = inspect_data(data, test_fraction=0.2, seed=3)
    split = found.split
    assert len(split) == 30 and found.manifest_root == data.resolve()
    assert (split[split["split"] == "test"].groupby("label").size() == 2).all()  # 20% of each class
    assert all((data / p).is_file() for p in split["path"])
    again = inspect_data(data, test_fraction=0.2, seed=3).split
    assert again.equals(split)
    assert not inspect_data(data, test_fraction=0.2, seed=4).split.equals(split)


def test_existing_train_test_folders_get_no_generated_split(tmp_path):
    data = tmp_path / "photos"
    photo_folder(data / "train", per_class=4)
    photo_folder(data / "test", per_class=2)
    found = inspect_data(data)
    assert found.split is None and found.manifest_root is None and "with a test split" in found.why["layout"]


def test_a_manifest_without_split_is_split_and_keeps_its_paths(tmp_path):
    data = photo_folder(tmp_path / "photos", per_class=6)
    rows = [(f"{c}/IMG_{i:04d}.{'png' if i % 2 else 'jpg'}", c) for c in CLASSES for i in range(6)]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(data / "labels.csv", index=False)
    found = inspect_data(data / "labels.csv")
    assert found.layout == "manifest" and found.manifest_root == data.resolve()
    assert sorted(found.split["path"]) == sorted(p for p, _ in rows)


def test_a_manifest_with_a_test_split_is_used_as_it_is(tmp_path):
    data = photo_folder(tmp_path / "photos", per_class=4)
    rows = [(f"{c}/IMG_{i:04d}.{'png' if i % 2 else 'jpg'}", c, "test" if i == 0 else "train")
            for c in CLASSES for i in range(4)]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_parquet(data / "labels.parquet")
    found = inspect_data(data / "labels.parquet")
    assert found.layout == "manifest" and found.split is None


def test_the_generated_params_are_valid_for_every_stage(tmp_path):
    """Each section is the settings class's defaults (by their params.yaml names) plus init's choices."""
    from sslvision.params import section_class
    from sslvision.project import PROJECT_SECTIONS, params_text

    found = inspect_data(photo_folder(tmp_path / "photos", per_class=3))
    params = yaml.safe_load(params_text(found, source="data/split.csv", version="0.1.0"))
    assert params["sslvision"] == {"version": "0.1.0"}
    assert params["pretrain"]["batch_size"] == 4  # 6 training images: SimCLR's batch fits in them
    assert list(params) == ["sslvision", *PROJECT_SECTIONS]
    for name in PROJECT_SECTIONS:
        section_class(name).model_validate(params[name])


def test_a_small_folder_keeps_the_recipes_number_of_training_steps(tmp_path):
    """An epoch of a small folder is one or two batches: init sizes pretraining and fine-tuning by steps, so 160
    images get the CPU recipe's 300 SSL steps and ~400 fine-tuning steps, not 10 and 16 (and the recipe's
    later stages: augment generator, full fine-tune with the logit-adjusted loss on random batches)."""
    from sslvision.project import CPU_PRETRAIN, FINETUNE_STEPS, params_text

    found = inspect_data(photo_folder(tmp_path / "photos", per_class=67))  # 201 images, 160 for training
    params = yaml.safe_load(params_text(found, source="data/split.csv", version="0.1.0"))
    n_train = sum(found.counts.values()) - int((found.split["split"] == "test").sum())
    pre, ft = params["pretrain"], params["finetune"]
    per_epoch = min(pre["steps_per_epoch"], n_train // pre["batch_size"])
    assert pre["epochs"] * per_epoch >= CPU_PRETRAIN["epochs"] * CPU_PRETRAIN["steps_per_epoch"]
    assert n_train // ft["batch_size"] >= 8
    assert ft["epochs"] * (n_train // ft["batch_size"]) >= FINETUNE_STEPS
    assert (params["synthesize"]["generator"], ft["mode"]) == ("augment", "finetune")
    assert (ft["sampler"], ft["loss"], ft["label_smoothing"]) == ("random", "logit_adjusted", 0.1)


def test_a_missing_data_path_is_named(tmp_path):
    with pytest.raises(InitError, match=r"--data .*nowhere: not found"):
        inspect_data(tmp_path / "nowhere")


def test_one_class_or_no_images_is_refused_with_the_reason(tmp_path):
    photo_folder(tmp_path / "one", per_class=3, classes=["cat"])
    with pytest.raises(InitError, match="at least two"):
        inspect_data(tmp_path / "one")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(InitError, match="no image files"):
        inspect_data(tmp_path / "empty")


def test_a_non_empty_directory_is_refused_and_left_alone(tmp_path):
    found = inspect_data(photo_folder(tmp_path / "photos", per_class=3))
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    with pytest.raises(InitError, match="not an empty directory"):
        create_project(tmp_path / "proj", found)
    assert [p.name for p in (tmp_path / "proj").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".proj")] == []


def test_the_cli_refuses_a_missing_data_path_naming_it(tmp_path):
    out = CliRunner().invoke(app, ["init", str(tmp_path / "proj"), "--data", str(tmp_path / "nowhere")])
    assert out.exit_code == 2 and "nowhere: not found" in out.output
    assert not (tmp_path / "proj").exists()


def test_the_flows_load_as_modules_of_the_installed_package(tmp_path):
    """prefect.yaml's entrypoints name no file of the project: they resolve from any directory."""
    from prefect.flows import load_flow_from_entrypoint

    found = inspect_data(photo_folder(tmp_path / "photos", per_class=3))
    root = create_project(tmp_path / "proj", found)
    entrypoints = [d["entrypoint"] for d in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]]
    assert entrypoints == ["sslvision.flows.monitor:monitor", "sslvision.flows.train:train"]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert {load_flow_from_entrypoint(e).name for e in entrypoints} == {"monitor", "train"}
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_prefect_deploy_registers_the_projects_deployments(tmp_path, prefect_harness):
    """`prefect deploy --all` in a project made by init (no flow file in it, no copy of this repository)
    registers both deployments from the installed package's modules, with the monitor's schedule."""
    import asyncio
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    root = create_project(tmp_path / "proj", inspect_data(photo_folder(tmp_path / "photos", per_class=3)))

    async def read(create_pool: bool) -> dict:
        async with get_client() as client:
            if create_pool:
                with contextlib.suppress(ObjectAlreadyExists):
                    await client.create_work_pool(WorkPoolCreate(name="sslvision", type="process"))
            return {d.name: d for d in await client.read_deployments() if str(root) in str(d.pull_steps)}

    asyncio.run(read(create_pool=True))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deployed = asyncio.run(read(create_pool=False))
    assert {n: d.entrypoint for n, d in deployed.items()} == {"monitor": "sslvision.flows.monitor:monitor",
                                                              "train": "sslvision.flows.train:train"}
    assert deployed["monitor"].schedules[0].schedule.cron == "0 * * * *"


# --- end to end ------------------------------------------------------------------------------------

TINY = {
    "ingest": {"workers": 1, "chunk_size": 64},
    "pretrain": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "workers": 0, "threads": 1,
                 "embed_batch_size": 64, "knn_k": 3, "proj_hidden_dim": 32, "proj_dim": 16,
                 "backbone_args": {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_width": 8}},
    "audit": {"folds": 2, "knn_k": 3, "consensus_k": 3, "min_examples_per_class": 2, "gallery_size": 4},
    "synthesize": {"max_per_class": 4, "batch_size": 16, "grid_columns": 4,
                   "mae_inpaint": {"steps": 2, "width": 8, "batch_size": 8}},
    "finetune": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "threads": 1, "patience": 1,
                 "promotion": {"min_balanced_accuracy": 0.0, "max_ece": 1.0}},
}


@pytest.mark.slow
def test_init_then_dvc_repro_runs_every_stage_from_the_installed_package(tmp_path):
    data = photo_folder(tmp_path / "my photos", per_class=14)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "sslvision"), "init", str(tmp_path / "proj"), "--data", str(data),
                           "--max-size", "32"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "proj"
    params = yaml.safe_load((root / "params.yaml").read_text())
    ingest = params["ingest"]
    assert ingest["channels"] == 3 and ingest["size"] == 32 and ingest["source"] == "data/split.csv"
    assert sorted(ingest["class_names"]) == sorted(CLASSES)
    text = (root / "params.yaml").read_text()
    assert "have colour" in text and "capped at 32" in text and "held out" in text  # the reasons
    split = pd.read_csv(root / "data/split.csv")
    test, train = split[split["split"] == "test"], split[split["split"] == "train"]
    assert set(test["path"]).isdisjoint(train["path"])
    assert (test.groupby("label").size() == 3).all()  # 20% of 14, in every class
    assert params["monitor"]["inbox"] == "data/inbox" and (root / "data/inbox").is_dir()
    assert not (root / "stages").exists() and not (root / "src").exists()  # no copy of this repository
    assert "demo" not in params and "data/demo" not in text + (root / "dvc.yaml").read_text()

    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for out in ("data/ingested/images.npy", "models/encoder", "data/embeddings", "data/audit/manifest_clean.parquet",
                "data/synthetic", "models/classifier/config.json", "reports/drift/trigger.json"):
        assert (root / out).exists(), out
    manifest = pd.read_parquet(root / "data/ingested/manifest.parquet")
    assert (manifest["split"] == "test").sum() == len(test) and len(manifest) == len(split)
    assert np.load(root / "data/ingested/images.npy", mmap_mode="r").shape[1:] == (32, 32, 3)
    trigger = yaml.safe_load((root / "reports/drift/trigger.json").read_text())
    assert trigger["metrics"] == {} and "drift_eval.batch is empty" in trigger["skipped"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout

    from sslvision.summary import next_step

    assert next_step(root).startswith("put a production batch in data/inbox/")
    (root / "data/inbox/batch_01").mkdir()
    assert next_step(root).startswith("sslvision monitor data/inbox/batch_01")


@pytest.mark.slow
def test_a_missing_production_batch_is_named_before_any_stage_runs(tmp_path, prefect_harness):
    from sslvision.flows.train import train
    from sslvision.stages.preflight import MissingInputs

    root = create_project(tmp_path / "proj", inspect_data(photo_folder(tmp_path / "photos", per_class=3)))
    dag = yaml.safe_load((root / "dvc.yaml").read_text())
    dag["stages"]["drift_eval"]["deps"].append("${drift_eval.batch}")
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["drift_eval"]["batch"] = "data/inbox/b1"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(MissingInputs, match=r"params.yaml: drift_eval.batch: data/inbox/b1 does not exist"):
        train(root=str(root))
    assert not (root / "data/ingested").exists()
