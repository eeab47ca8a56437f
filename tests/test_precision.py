"""pretrain.precision: validation, how auto resolves on given hardware, and bf16 training on the CPU."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from sslvision import objectives
from sslvision.models import Encoder, to_input
from sslvision.params import ParamsError, load_section
from sslvision.pretrain import NonFiniteLossError, PretrainParams, resolve_precision, train
from sslvision.ssl import build_method, methods
from sslvision.stages.pretrain import read_inputs, run_stage
from tests.test_pretrain import params, write_ingested

pretrain = importlib.import_module("sslvision.pretrain")  # the module: ``sslvision.pretrain`` also names the API


@pytest.fixture
def ingested(workdir):
    return write_ingested(workdir / "data" / "ingested")


def test_precision_accepts_auto_fp32_bf16_and_refuses_anything_else(tmp_path):
    assert PretrainParams().precision == "auto"
    for value in ("auto", "fp32", "bf16"):
        assert PretrainParams(precision=value).precision == value
    with pytest.raises(ValidationError, match="precision"):
        PretrainParams(precision="fp16")
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  precision: half\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: pretrain\.precision"):
        load_section("pretrain", PretrainParams, path)


def test_precision_does_not_change_the_checkpoint_fingerprint():
    # how the arithmetic runs is not what is trained: a run killed in fp32 may resume in bf16 (as on another device)
    assert PretrainParams(precision="fp32").fingerprint() == PretrainParams(precision="bf16").fingerprint()


def test_auto_is_fp32_without_native_bf16_and_explicit_choices_are_kept():
    plain_x86 = {"sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}
    for vit in (False, True):
        assert resolve_precision("auto", device_type="cpu", vit=vit, flags=plain_x86) == "fp32"
        assert resolve_precision("auto", device_type="cpu", vit=vit) == "fp32"
        assert resolve_precision("auto", device_type="cuda", vit=vit, cuda_bf16=False) == "fp32"
        assert resolve_precision("auto", device_type="mps", vit=vit, flags={"avx512_bf16"}) == "fp32"
        assert resolve_precision("fp32", device_type="cpu", vit=vit, flags={"amx_bf16"}) == "fp32"
        assert resolve_precision("bf16", device_type="cpu", vit=vit, flags=plain_x86) == "bf16"


def test_auto_picks_bf16_only_for_measured_architectures_on_native_bf16(monkeypatch):
    monkeypatch.setattr(pretrain, "BF16_FASTER", {"cpu": frozenset({"vit"})})
    for flag in ("avx512_bf16", "amx_bf16"):
        assert resolve_precision("auto", device_type="cpu", vit=True, flags={"avx2", flag}) == "bf16"
        assert resolve_precision("auto", device_type="cpu", vit=False, flags={"avx2", flag}) == "fp32"
    assert resolve_precision("auto", device_type="cpu", vit=True, flags={"avx2"}) == "fp32"
    assert resolve_precision("auto", device_type="cuda", vit=True, cuda_bf16=True) == "fp32"  # cuda not measured


def test_the_committed_table_follows_the_measurements():
    # BF16_FASTER lists what benchmarks/results/precision.json found >= 1.3x at equal accuracy
    import json
    from pathlib import Path

    results = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/results/precision.json").read_text())
    adopted = {path for path, d in results["decisions"].items() if d["adopt_bf16"]}
    assert pretrain.BF16_FASTER.get("cpu", frozenset()) == adopted


def test_cuda_auto_follows_the_gpu_measurement():
    # benchmarks/results/gpu_profile.json: the ResNet SimCLR step in bf16 >= 1.3x fp32 on the GPU it ran on
    import json
    from pathlib import Path

    results = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/results/gpu_profile.json").read_text())
    ratio = next(r["value"] for r in results["rows"] if r["system"] == "simclr bf16 / fp32")
    assert ("resnet" in pretrain.BF16_FASTER.get("cuda", frozenset())) == (ratio >= 1.3)
    expected = "bf16" if ratio >= 1.3 else "fp32"
    assert resolve_precision("auto", device_type="cuda", vit=False, cuda_bf16=True) == expected
    assert resolve_precision("auto", device_type="cuda", vit=True, cuda_bf16=True) == "fp32"  # the ViT: not measured


@pytest.mark.parametrize("method,kw", [
    ("simclr", {}), ("simclr", {"loss": "rince"}), ("vicreg", {}), ("dino", {}), ("mae", {}), ("cl_mim", {}),
    ("cl_mim", {"cl_mim_cl": "dino"}),
])
def test_every_method_under_bf16_autocast_gives_a_finite_fp32_loss_and_fp32_gradients(method, kw):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = params(method, **kw)
    model = build_method(p, Encoder(p.encoder_config(28, 1)), total_steps=4, steps_per_epoch=4)
    x = to_input(torch.randint(0, 256, (8, 28, 28, 1), dtype=torch.uint8))
    views = [x, torch.flip(x, dims=[3])] + ([torch.nn.functional.interpolate(x, size=p.local_size)]
                                            if method == "dino" else [])
    computed: set[torch.dtype] = set()
    for m in model.encoder.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda _m, _i, out: computed.add(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(views, 0)
    assert computed == {torch.bfloat16}  # the backbone's convolutions / matmuls really ran in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_pretrain_runs_with_a_finite_loss_and_saves_an_fp32_encoder(ingested, workdir, monkeypatch):
    torch.set_num_threads(1)
    seen: list[torch.dtype] = []
    real = methods.in_fp32

    def recording(loss, *args):
        seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
        return real(loss, *args)

    monkeypatch.setattr(methods, "in_fp32", recording)
    p = params("simclr", precision="bf16", steps_per_epoch=2, checkpoint_dir=str(workdir / "ck"))
    metrics = run_stage(p, ingested, workdir / "encoder", reports=workdir / "reports")
    assert torch.bfloat16 in seen  # the heads' outputs reached the loss in bf16: autocast was on in train()
    assert metrics["precision"] == "bf16" and math.isfinite(metrics["final_loss"])
    with safe_open(str(workdir / "encoder" / "encoder.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - not a dict
    assert dtypes <= {"F32", "I64"}, dtypes  # float weights in fp32 (BatchNorm's step counter is int64)
    assert "F32" in dtypes


def test_fp32_pretrain_records_fp32(ingested, workdir):
    torch.set_num_threads(1)
    inputs = read_inputs(ingested)
    p = params("mae", precision="fp32", steps_per_epoch=1, checkpoint_dir=str(workdir / "ck"))
    assert train(p, inputs.images_path, inputs.train_rows, progress=False).precision == "fp32"


def test_non_finite_loss_under_bf16_still_stops_loudly(ingested, workdir, monkeypatch):
    inputs = read_inputs(ingested)
    monkeypatch.setattr(objectives, "nt_xent", lambda z1, z2, t: (z1.sum() + z2.sum()) * float("nan"))
    p = params(precision="bf16", checkpoint_dir=str(workdir / "ck"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 0 .*pretrain\.lr"):
        train(p, inputs.images_path, inputs.train_rows, progress=False)
