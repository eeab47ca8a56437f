"""Bad input, part of the fault suite (tests/test_faults.py has the process-level faults):

- malformed ``params.yaml`` values stop every stage script and CLI command with one message naming the
  dotted key (the basic cases of ``Section``/``load_section`` are in tests/test_core.py);
- a hypothesis fuzz test feeds random bytes and malformed or unusual images to ingest: nothing crashes
  and every file ends up in the manifest or in quarantine with a reason
  (tests/test_ingest.py covers each broken kind one by one);
- no loader unpickles a planted file: encoder, decoder, classifier, checkpoint, ``.npy`` arrays, the
  ingest decode cache and the MLflow registry; plus a static check of every ``torch.load``/``np.load``.
"""

from __future__ import annotations

import ast
import io
import pickle
import runpy
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from sslvision import ingest
from sslvision.cli import app
from sslvision.params import ParamsError, load_section
from tests.test_faults import migrated_mlflow_db  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]

# --- params.yaml ---------------------------------------------------------------------------------

# stage script -> (its section, a value of the wrong type, an out-of-range value); nested keys included
STAGES = {
    "ingest": ("ingest", {"size": "big"}, {"channels": 2}),
    "pretrain": ("pretrain", {"epochs": "three"}, {"lr": -0.1}),
    "embed": ("pretrain", {"embed_batch_size": [64]}, {"embed_batch_size": 0}),
    "audit": ("audit", {"folds": "five"}, {"knn_weight": 1.5}),
    "synthesize": ("synthesize", {"max_per_class": "lots"}, {"filter": {"min_confidence": 2}}),
    "finetune": ("finetune", {"registry": {"enabled": "perhaps"}}, {"promotion": {"max_ece": 0}}),
    "drift_eval": ("drift_eval", {"permutations": "many"}, {"alpha": 1.5}),
}


def _dotted(section: str, value: dict) -> str:
    key, inner = next(iter(value.items()))
    return f"{section}.{key}" + (_dotted("", inner) if isinstance(inner, dict) else "")


CASES = []
for _stage, (_section, _wrong, _range) in STAGES.items():
    CASES += [
        (_stage, "wrong type", {_section: _wrong}, f"params.yaml: {_dotted(_section, _wrong)}: "),
        (_stage, "out of range", {_section: _range}, f"params.yaml: {_dotted(_section, _range)}: "),
        (_stage, "unknown key", {_section: {"bogus_key": 1}}, f"{_section}.bogus_key: Extra inputs are not permitted"),
        (_stage, "not a mapping", {_section: [1, 2]}, f"{_section}: must be a mapping"),
        (_stage, "misspelt section", {_section[:-1] + "x": {}},
         f"{_section}: section missing; is '{_section[:-1]}x' a misspelling"),
        (_stage, "not YAML", "pretrain: [unclosed\n", "not valid YAML"),
        (_stage, "no file", None, "file not found"),
    ]


def _write_params(text_or_dict) -> None:
    if text_or_dict is not None:
        text = text_or_dict if isinstance(text_or_dict, str) else yaml.safe_dump(text_or_dict)
        Path("params.yaml").write_text(text)


@pytest.mark.parametrize("stage,case,params,message", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_stage_script_rejects_bad_params_naming_the_key(workdir, stage, case, params, message):
    """The real stage script (as `dvc repro` runs it) exits with one message before doing any work."""
    _write_params(params)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="__main__")
    said = str(exit_.value.code)
    assert said.startswith(f"{stage}: error: params.yaml") and message in said, said
    assert "Traceback" not in said
    assert not Path("mlflow.db").exists(), "nothing may run, not even an MLflow run, on bad params"


CLI = [  # command, section, bad value
    ("ingest", "ingest", {"max_pixels": 0}),
    ("pretrain", "pretrain", {"method": "byol"}),
    ("audit", "audit", {"policy": "burn"}),
    ("synthesize", "synthesize", {"generator": "gan"}),
    ("finetune", "finetune", {"loss": "focal"}),
    ("drift-eval", "drift_eval", {"bandwidths": []}),
    ("serve", "monitor", {"retrain": "perhaps"}),
]


@pytest.mark.parametrize("command,section,bad", CLI, ids=[c[0] for c in CLI])
def test_every_cli_command_reports_bad_params_in_one_line(workdir, command, section, bad):
    _write_params({section: bad})
    result = CliRunner().invoke(app, [command])
    key = _dotted(section, bad)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: params.yaml: {key}: "), result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output


def test_monitor_section_is_validated():
    from sslvision.flows.monitor import MonitorParams

    with pytest.raises(ParamsError, match=r"monitor\.inbox: Input should be a valid string"):
        load_section("monitor", MonitorParams, overrides={"inbox": ["a", "b"]}, path=REPO / "params.yaml")
    with pytest.raises(ParamsError, match=r"monitor\.cronn: Extra inputs"):
        load_section("monitor", MonitorParams, overrides={"cronn": "* * * * *"}, path=REPO / "params.yaml")


def test_the_shipped_params_file_is_valid_for_every_section():
    """The positive control of the cases above: every section of params.yaml validates."""
    from sslvision.audit import AuditParams
    from sslvision.demo import DemoParams
    from sslvision.drift import DriftParams
    from sslvision.finetune import FinetuneParams
    from sslvision.flows.monitor import MonitorParams
    from sslvision.ingest import IngestParams
    from sslvision.pretrain import PretrainParams
    from sslvision.synthesize import SynthesizeParams

    models = {"demo": DemoParams, "ingest": IngestParams, "pretrain": PretrainParams, "audit": AuditParams,
              "synthesize": SynthesizeParams, "finetune": FinetuneParams, "drift_eval": DriftParams,
              "monitor": MonitorParams}
    assert set(yaml.safe_load((REPO / "params.yaml").read_text())) <= set(models)
    for name, model in models.items():
        load_section(name, model, REPO / "params.yaml")


# --- fuzzing ingest ----------------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG declaring ``width`` x ``height`` grayscale pixels with a few bytes of data: it
    opens, and decoding it would allocate width * height bytes (a decompression bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


_GRADIENT = np.add.outer(np.arange(40), np.arange(40)).astype(np.uint8) * 3
SAMPLE_PNG = _encode(Image.fromarray(_GRADIENT), "PNG")
SAMPLE_JPEG = _encode(Image.fromarray(_GRADIENT), "JPEG")

# (mode, format) pairs Pillow writes; every one is a usable image and must be kept
VALID_MODES = [("L", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
               ("RGB", "JPEG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("F", "TIFF"), ("I", "TIFF"), ("P", "GIF"),
               ("RGB", "BMP")]
SIZES = [(1, 1), (1, 5000), (5000, 1), (3, 7), (28, 28), (64, 33)]


@st.composite
def valid_image(draw) -> tuple[str, bytes]:
    mode, fmt = draw(st.sampled_from(VALID_MODES))
    width, height = draw(st.sampled_from(SIZES))
    rgba = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (height, width, 4), dtype=np.uint8)
    gray = rgba[..., 0]
    im = {"I;16": lambda: Image.fromarray(gray.astype(np.uint16) * 257),  # 16-bit
          "I": lambda: Image.fromarray(gray.astype(np.int32) * 1000),
          "F": lambda: Image.fromarray(gray.astype(np.float32) / 255)}.get(
        mode, lambda: Image.fromarray(rgba, "RGBA").convert(mode))()
    assert im.mode == mode
    return "valid", _encode(im, fmt)


damaged_image = st.one_of(
    st.binary(min_size=1, max_size=400).map(lambda b: ("random", b)),
    st.just(("empty", b"")),
    st.integers(1, len(SAMPLE_PNG) - 13).map(lambda k: ("damaged", SAMPLE_PNG[:k])),  # cut before IEND
    st.integers(1, len(SAMPLE_JPEG) - 3).map(lambda k: ("damaged", SAMPLE_JPEG[:k])),
    st.binary(min_size=4, max_size=4).filter(lambda b: b != SAMPLE_PNG[:4])
      .map(lambda b: ("damaged", b + SAMPLE_PNG[4:])),  # wrong magic
    st.integers(1, 2**31 - 1).flatmap(lambda h: st.integers(40_000_000 // h + 1, 2**31 - 1).map(
        lambda w: ("bomb", _png_bomb(w, h)))),  # declares more than max_pixels: the decompression-bomb guard
    st.tuples(st.integers(0, len(SAMPLE_PNG) - 1), st.integers(0, 255))  # one byte flipped somewhere
      .map(lambda t: ("damaged", SAMPLE_PNG[:t[0]] + bytes([SAMPLE_PNG[t[0]] ^ (t[1] | 1)]) + SAMPLE_PNG[t[0] + 1:])),
)

PLACES = ["train/a", "train/b", "test/a", "pool/batch1"]  # pool/batch1: a flat, unlabeled production batch


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.one_of(valid_image(), damaged_image), st.sampled_from(PLACES)),
                      min_size=1, max_size=6))
def test_fuzzed_files_are_each_kept_or_quarantined_with_a_reason(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("fuzz")
    source, pool = root / "data", root / "pool"
    expected = {"train/a/anchor.png": "valid"}  # one good image, so a fully broken example is not "empty dataset"
    (source / "train/a").mkdir(parents=True)
    (source / "train/a/anchor.png").write_bytes(SAMPLE_PNG)
    for i, ((kind, data), place) in enumerate(files):
        split, cls = place.split("/")
        directory = (pool / cls) if split == "pool" else (source / split / cls)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i}.img").write_bytes(data)
        expected[f"{place}/f{i}.img"] = kind
    params = ingest.IngestParams(workers=0, chunk_size=4, cache_dir="", pool=str(pool))
    metrics = ingest.run_ingest(params, source, root / "out", pool)

    m = pd.read_parquet(root / "out/manifest.parquet")
    q = pd.read_parquet(root / "out/quarantine.parquet")
    kept, refused = list(m["source_path"]), list(q["source_path"])
    assert sorted(kept + refused) == sorted(expected), "a file was lost or counted twice"
    assert metrics["images"] + metrics["quarantined"] == metrics["listed"] == len(expected)
    assert q["reason"].isin(ingest.REASONS).all() and (q["detail"].str.len() > 0).all()
    for path, kind in expected.items():
        if kind == "valid":
            assert path in kept, (path, q.set_index("source_path")["detail"].get(path))
        elif kind in ("empty", "bomb", "random"):
            assert path in refused, path
    reasons = dict(zip(q["source_path"], q["reason"], strict=True))
    assert all(reasons[p] == ingest.EMPTY for p, k in expected.items() if k == "empty")
    assert all(reasons[p] == ingest.TOO_LARGE for p, k in expected.items() if k == "bomb")
    images = np.load(root / "out/images.npy")
    assert images.shape == (len(kept), 28, 28, 1) and images.dtype == np.uint8


# --- no unpickling of planted files ------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran pickle on it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "UNPICKLED"
    yield path
    assert not path.exists(), "a loader unpickled a planted file"


def _pickled_pt(path: Path, marker: Path) -> None:
    torch.save({"weight": Payload(marker)}, path)  # a .pt file: a zip holding data.pkl


def _object_npy(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def test_models_refuse_pickled_weights(tmp_path, marker):
    from sslvision.finetune import Classifier, load_classifier, save_classifier
    from sslvision.models import (
        DecoderConfig,
        Encoder,
        EncoderConfig,
        MAEDecoder,
        load_decoder,
        load_encoder,
        save_encoder,
    )

    cfg = EncoderConfig(stem_stride=2, backbone_args={"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8],
                                                       "stem_width": 8})
    save_classifier(tmp_path / "classifier", Classifier(Encoder(cfg), ["a", "b"]))
    vit = EncoderConfig(backbone="vit_tiny_patch16_224", patch_size=7,
                        backbone_args={"embed_dim": 16, "depth": 1, "num_heads": 2})
    encoder = Encoder(vit)
    save_encoder(tmp_path / "encoder", encoder,
                 MAEDecoder(encoder.dim, 16, 7, 1, DecoderConfig(embed_dim=8, depth=1, num_heads=2)))
    for name, load in (("encoder", load_encoder), ("encoder", load_decoder), ("classifier", load_classifier)):
        load(tmp_path / name)  # the genuine files load
    for weights, load in (("encoder/encoder.safetensors", load_encoder), ("encoder/decoder.safetensors", load_decoder),
                          ("classifier/classifier.safetensors", load_classifier)):
        _pickled_pt(tmp_path / weights, marker)
        with pytest.raises(ValueError, match=rf"{weights}: not a safetensors weights file"):
            load((tmp_path / weights).parent)
        (tmp_path / weights).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(ValueError, match="not a safetensors weights file"):
            load((tmp_path / weights).parent)


def test_pretrain_never_unpickles_a_planted_checkpoint(workdir, marker, caplog):
    from sslvision.pretrain import PretrainParams, train
    from sslvision.stages.pretrain import read_inputs
    from tests.test_pretrain import FAST, TINY_RESNET, write_ingested

    inputs = read_inputs(write_ingested(workdir / "data/ingested", n_train=16, n_test=8, n_pool=0))
    p = PretrainParams.model_validate({**TINY_RESNET, **FAST, "batch_size": 8, "epochs": 1, "steps_per_epoch": 1,
                                       "checkpoint_dir": str(workdir / "ck")})
    (workdir / "ck").mkdir()
    torch.save({"fingerprint": p.fingerprint(), "world": 1, "model": Payload(marker)}, workdir / "ck/last.pt")
    result = train(p, inputs.images_path, inputs.train_rows, progress=False)
    assert result.resumed_from == 0 and result.steps == 1
    assert "unreadable checkpoint" in caplog.text and "starting from scratch" in caplog.text
    assert torch.load(workdir / "ck/last.pt", weights_only=True)["step"] == 1  # replaced by a real one


def test_arrays_with_python_objects_are_refused(workdir, marker):
    from sslvision.data import Ingested, load_embeddings
    from sslvision.stages.pretrain import read_inputs
    from tests.test_pretrain import write_ingested

    ingested = write_ingested(workdir / "data/ingested", n_train=8, n_test=4, n_pool=0)
    pd.read_parquet(ingested / "images.parquet").assign(source_path="x", label=0, label_name="T-shirt/top") \
        .to_parquet(ingested / "manifest.parquet")
    _object_npy(ingested / "images.npy", marker)
    _object_npy(workdir / "data/embeddings/embeddings.npy", marker)
    for load in (lambda: Ingested.load(ingested), lambda: read_inputs(ingested),
                 lambda: load_embeddings(workdir / "data/embeddings")):
        with pytest.raises(ValueError, match="Python objects|allow_pickle"):
            load()


def test_ingest_ignores_a_planted_cache_shard(tmp_path, marker):
    source = tmp_path / "data/train/a"
    source.mkdir(parents=True)
    (source / "x.png").write_bytes(SAMPLE_PNG)
    params = ingest.IngestParams(workers=0, cache_dir=str(tmp_path / "cache"))
    ingest.run_ingest(params, tmp_path / "data", tmp_path / "out")
    shards = list((tmp_path / "cache").rglob("shard-*.npy"))
    assert len(shards) == 1
    _object_npy(shards[0], marker)
    metrics = ingest.run_ingest(params, tmp_path / "data", tmp_path / "out2")
    assert metrics["images"] == 1 and metrics["decode"]["decoded"] == 1  # decoded again, not read from the shard
    np.testing.assert_array_equal(np.load(tmp_path / "out/images.npy"), np.load(tmp_path / "out2/images.npy"))


def test_registry_refuses_a_pickled_model(workdir, marker, migrated_mlflow_db):  # noqa: F811 - the fixture
    """A registered version whose loading would unpickle (a pyfunc ``python_model`` object) is refused
    before MLflow loads it; the project's own models are logged from code (tests/test_registry.py)."""
    import shutil

    import mlflow

    from sslvision import registry, tracking
    from sslvision.finetune import PromotionParams

    shutil.copy(migrated_mlflow_db, workdir / "mlflow.db")

    class Evil(mlflow.pyfunc.PythonModel):
        def __reduce__(self):
            return (open, (str(marker), "w"))

    tracking.setup()
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Evil(), pip_requirements=[])
    version = mlflow.register_model(info.model_uri, "planted").version
    mlflow.MlflowClient().set_registered_model_alias("planted", registry.CHALLENGER, version)
    golden = np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int64)
    with mlflow.start_run(), pytest.raises(registry.RegistryError, match="refusing to load it"):
        registry.promote("planted", *golden, promotion=PromotionParams())


def _calls(tree: ast.AST, module: str, func: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == func
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_static_no_loader_can_unpickle():
    """Every ``torch.load`` passes ``weights_only=True``; no ``np.load`` turns ``allow_pickle`` on (its
    default is False since NumPy 1.16.3, and pyproject requires numpy >= 1.26); nothing imports
    pickle, joblib or cloudpickle or calls ``pd.read_pickle``."""
    offenders = []
    sources = [*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py"), *(REPO / "pipelines").glob("*.py")]
    for path in sorted(sources):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        offenders += [f"{where}:{c.lineno}: torch.load without weights_only=True" for c in _calls(tree, "torch", "load")
                      if _keyword(c, "weights_only") is not True]
        offenders += [f"{where}:{c.lineno}: np.load with allow_pickle" for np_name in ("np", "numpy")
                      for c in _calls(tree, np_name, "load") if _keyword(c, "allow_pickle") not in (None, False)]
        offenders += [f"{where}:{c.lineno}: pd.read_pickle" for c in _calls(tree, "pd", "read_pickle")]
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{where}:{node.lineno}: imports {n}" for n in names
                          if n.split(".")[0] in ("pickle", "joblib", "cloudpickle", "dill")]
    assert not offenders, "\n".join(offenders)


def test_static_check_finds_offenders():
    """The check above can fail: it flags each forbidden form."""
    bad = ast.parse("import pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n")
    assert len(list(_calls(bad, "torch", "load"))) == 2
    assert all(_keyword(c, "weights_only") is not True for c in _calls(bad, "torch", "load"))
    assert [_keyword(c, "allow_pickle") for c in _calls(bad, "np", "load")] == [True]
