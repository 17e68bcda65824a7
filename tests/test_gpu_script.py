"""benchmarks/gpu.py's CPU-checkable parts: its smoke run, and its answer on a machine without CUDA."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real thing")
def test_without_cuda_it_says_so_and_measures_nothing(gpu_script, capsys, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_script.main(["--out", str(out)]) == gpu_script.EXIT_NO_CUDA
    assert "no CUDA device on this machine; nothing was measured" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # (about 15 s alone: two small nets distilled four times)
def test_the_dry_run_on_the_cpu_fills_every_part(gpu_script, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_script.main(["--dry-run", "--device", "cpu", "--skip-tests", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {(r["net"], r["k"]) for r in doc["distill"]} == {(n, k) for n in ("quick", "vit_b16") for k in (1, 2)}
    assert all(r["samples_per_s"] > 0 for r in doc["distill"] + doc["floor"])
    assert all(v["mc100_ms"] > 0 and v["distilled_ms"] > 0 for v in doc["latency"].values())
    text = capsys.readouterr().out
    assert "| vit_b16 | 8 |" in text and "MC-100 / distilled" in text and doc["card"] in text
