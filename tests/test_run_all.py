"""benchmarks/run_all.py: every committed benchmark is registered and summarised, and a GPU-only benchmark
is skipped (not failed) on a machine without CUDA. Reads the committed results; runs no benchmark."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# results/*.json that are not a benchmark's own headline results
NOT_SUMMARISED = {"summary"}


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_file_is_registered_and_summarised(run_all):
    for path in sorted((BENCH / "results").glob("*.json")):
        name = path.stem
        if name in NOT_SUMMARISED:
            continue
        assert name in run_all.HEADLINES, f"results/{path.name} has no HEADLINES entry in run_all.py"
        assert name in run_all.BENCHMARKS, f"results/{path.name} is not in run_all.py's BENCHMARKS"
    for name in run_all.BENCHMARKS:
        assert (BENCH / f"{name}.py").is_file(), name
    assert run_all.NEEDS_CUDA.issubset(run_all.BENCHMARKS)


def test_headlines_pick_a_few_well_formed_rows(run_all):
    rows, _ = run_all.summarize({})
    for name in run_all.HEADLINES:
        picked = [r for r in rows if r["benchmark"] == name]
        assert picked and all(r["value"] is not None for r in picked), f"{name}: no headline rows"
        assert len(picked) <= 25, f"{name}: {len(picked)} rows is not a headline"
        assert all({"metric", "system", "value", "unit", "setting", "ours"} <= r.keys() for r in picked), name
        assert any(r["ours"] for r in picked), f"{name}: none of sslvision's systems is marked ours"
    table = run_all.results_table(rows)
    assert len(table.splitlines()) < 80


def test_a_cuda_benchmark_is_skipped_without_a_gpu(run_all, monkeypatch):
    ran, written = [], {}
    monkeypatch.setattr(run_all, "cuda_available", lambda: False)
    monkeypatch.setattr(run_all, "run_one", lambda name, extra: ran.append(name) or (True, 1.0))
    monkeypatch.setattr(run_all, "report", lambda name, rows, **kw: written.setdefault("rows", rows))
    monkeypatch.setattr(run_all, "update_results_section", lambda rows, machines: None)
    cpu_only = next(n for n in run_all.BENCHMARKS if n not in run_all.NEEDS_CUDA | run_all.NEEDS_DEMO)
    assert run_all.main(["--only", "gpu_profile", cpu_only]) == 0
    assert ran == [cpu_only]
    status = {r["benchmark"]: r["metric"] for r in written["rows"] if r["system"] == "run_all"}
    assert status == {cpu_only: "benchmark wall time", "gpu_profile": "skipped: needs a CUDA GPU"}
    # the committed GPU results still make the table
    assert any(r["benchmark"] == "gpu_profile" and r["value"] is not None for r in written["rows"])
    json.dumps(written["rows"])  # summary.json stays writable
