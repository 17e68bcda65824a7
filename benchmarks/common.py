"""Shared pieces of the benchmarks: Fashion-MNIST folders on disk, timing, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
import fashion_mnist  # noqa: E402

BUILD = ROOT / "build" / "bench"
RESULTS = ROOT / "benchmarks" / "results"


def fmnist_folder(split: str = "train", n: int | None = None, labelled: bool = False) -> Path:
    """A folder of Fashion-MNIST PNGs (the first ``n`` of ``split``), written once and reused."""
    images, labels = fashion_mnist.load(split)
    n = len(images) if n is None else n
    folder = BUILD / f"fmnist_{split}_{n}{'_labelled' if labelled else ''}"
    marker = folder / ".complete"
    if not marker.exists():
        for i in range(n):
            sub = folder / f"{int(labels[i])}_{fashion_mnist.CLASSES[int(labels[i])]}" if labelled else folder
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(sub / f"{split}_{i:05d}.png")
        marker.write_text("ok")
    return folder


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"


def median_ms(run, inputs, warmup: int = 50) -> float:
    """Median milliseconds of ``run(x)`` over ``inputs``, the first ``warmup`` of them untimed."""
    for x in inputs[:warmup]:
        run(x)
    times = []
    for x in inputs[warmup:]:
        start = time.perf_counter()
        run(x)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], spec: str = ".2f") -> str:
    m, s = mean_std(values)
    return f"{format(m, spec)} ± {format(s, spec)}"


def save(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **doc}, indent=2) + "\n")
    return path


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
