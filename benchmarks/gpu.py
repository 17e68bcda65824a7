"""ddtool on one GPU: the CUDA tests, distillation speed against its floor, memory, MC vs distilled.

    .venv/bin/python benchmarks/gpu.py                          # on a CUDA machine: under 8 minutes
    .venv/bin/python benchmarks/gpu.py --dry-run --device cpu   # the script's own smoke run, anywhere

1. ``pytest -m cuda``: bf16 autocast, channels_last, no host synchronisation in a step
   (``torch.cuda.set_sync_debug_mode("error")`` around each step), streamed batches through
   pinned memory, an exact ``--resume`` with the CUDA generator's state (tests/test_cuda.py).
2. Distillation samples/s through ddtool's API (the second of two epochs, bf16 autocast,
   channels_last, the cache on the GPU), for Quick (1 x 28 x 28) and a ViT-sized net (ViT-B/16,
   3 x 224 x 224, 86 M parameters), at batch 64 / 256 / 1024 with K = 1 / 4 / 16 teacher samples,
   and the peak GPU memory of each run. A run that does not fit is recorded as "oom".
3. The floor: the student's forward + backward alone (KL loss to a fixed target, the same
   autocast and memory layout), samples/s; ddtool at K = 1 over it is the overhead.
4. Latency at batch 1 (median ms): MC dropout with 100 samples (ddtool's stacked sampler) against
   the distilled network (the same architecture, deterministic), fp32.

Results go to ``benchmarks/results/gpu.json`` (``--out``) with the card's name; a Markdown table
for BENCHMARKS.md is printed at the end. Without a CUDA device (and without ``--device cpu``)
the script prints one line saying so and exits with status 2, having measured nothing.
``--dry-run`` shrinks everything (tiny ViT, batch 8, K = 1 / 2, two steps) to check the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nets import ViT, quick  # noqa: E402

from ddtool.data import Preprocess  # noqa: E402
from ddtool.distillation import DistillConfig, distill, kl_loss  # noqa: E402
from ddtool.mc import MC_ROWS, MCSampler, probabilities  # noqa: E402
from ddtool.model import uses_channels_last  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXIT_NO_CUDA = 2


def nets(dry: bool) -> dict:
    """name -> (factory, input shape (C, H, W)); a small ViT in a dry run."""
    vit = (lambda: ViT(image=32, patch=8, dim=64, depth=2, heads=4, classes=10), (3, 32, 32)) if dry \
        else (lambda: ViT(), (3, 224, 224))
    return {"quick": (quick, (1, 28, 28)), "vit_b16": vit}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_tests(device: torch.device) -> dict:
    """The suite's CUDA-marked tests (they skip themselves without CUDA)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "tests/test_cuda.py"],
                          cwd=ROOT, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(lines[-12:]), flush=True)
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - start, 1)}


def distill_rate(factory, shape, batch: int, k: int, steps: int, device: torch.device) -> dict:
    """ddtool's samples/s over the second of two epochs of ``steps`` steps, and the peak memory."""
    torch.manual_seed(0)
    teacher = factory()
    images = torch.randint(0, 256, (batch * steps, *shape), dtype=torch.uint8)
    pre = Preprocess(channels=shape[0], mean=(0.5,), std=(0.25,))
    reset_peak(device)
    try:
        result = distill(teacher, images, pre, DistillConfig(epochs=2, batch_size=batch, teacher_samples=k, device=str(device)))
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    except Exception as err:  # noqa: BLE001 - one failing cell must not lose the others' numbers on a one-off run
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
    return {"samples_per_s": result.history[-1]["samples_per_s"], "peak_mib": peak_mib(device)}


def floor_rate(factory, shape, batch: int, steps: int, device: torch.device) -> dict:
    """The student's forward + backward alone, in ddtool's autocast and layout: samples/s."""
    torch.manual_seed(0)
    student = factory().eval().to(device)
    x = torch.randn(batch, *shape, device=device)
    if uses_channels_last(student, x):
        student, x = student.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    reset_peak(device)
    try:
        with autocast:
            target = F.softmax(student(x).float(), dim=1).detach()
        for i in range(steps + 2):  # two untimed
            if i == 2:
                sync(device)
                start = time.perf_counter()
            student.zero_grad(set_to_none=True)
            with autocast:
                out = student(x)
            kl_loss(out, target).backward()
        sync(device)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    return {"samples_per_s": round(batch * steps / (time.perf_counter() - start), 1), "peak_mib": peak_mib(device)}


def latency(factory, shape, device: torch.device, runs: int) -> dict:
    """Median ms at batch 1: MC-100 (ddtool's stacked sampler) and the deterministic network."""
    torch.manual_seed(0)
    model = factory().eval().to(device)
    x = torch.randn(1, *shape, device=device)

    def median_ms(fn) -> float:
        times = []
        for i in range(runs + 5):  # five untimed
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            sync(device)
            if i >= 5:
                times.append(1000 * (time.perf_counter() - start))
        return round(statistics.median(times), 3)

    sampler = MCSampler(model, x)  # made once, as evaluation and predict make it (not per prediction)
    mc = median_ms(lambda: sampler.mean(x, 100, probabilities, rows=MC_ROWS))
    plain = median_ms(lambda: F.softmax(model(x), dim=1))
    return {"mc100_ms": mc, "distilled_ms": plain, "ratio": round(mc / plain, 1)}


def measure(args, device: torch.device) -> dict:
    dry, budget_end = args.dry_run, time.perf_counter() + args.budget_s
    batches, ks = ([8], [1, 2]) if dry else (args.batches, args.ks)
    doc = {"distill": [], "floor": [], "latency": {}}
    for name, (factory, shape) in nets(dry).items():
        for batch in batches:
            steps = 2 if dry else max(4, min(50, 4096 // batch)) if name == "quick" else 4
            doc["floor"].append({"net": name, "batch": batch, **floor_rate(factory, shape, batch, steps, device)})
            for k in ks:
                if time.perf_counter() > budget_end:
                    doc["distill"].append({"net": name, "batch": batch, "k": k, "skipped": "time budget"})
                    continue
                row = {"net": name, "batch": batch, "k": k, "steps": steps,
                       **distill_rate(factory, shape, batch, k, steps, device)}
                doc["distill"].append(row)
                print(json.dumps(row), flush=True)
        doc["latency"][name] = latency(factory, shape, device, 5 if dry else 50)
        print(name, "latency", doc["latency"][name], flush=True)
    return doc


def table(doc: dict) -> str:
    """The Markdown table for BENCHMARKS.md: samples/s (peak MiB) per net, batch and K, the floor."""
    floors = {(r["net"], r["batch"]): r for r in doc["floor"]}
    ks = sorted({r["k"] for r in doc["distill"]})
    lines = [f"GPU: {doc['card']}, torch {doc['torch']}", "",
             "| net | batch | " + " | ".join(f"K = {k} samples/s (peak MiB)" for k in ks) + " | floor samples/s | K = 1 / floor |",
             "|---|---|" + "---|" * (len(ks) + 2)]
    for (net, batch), floor in floors.items():
        rows = {r["k"]: r for r in doc["distill"] if r["net"] == net and r["batch"] == batch}
        cells = [_cell(rows.get(k, {})) for k in ks]
        base = rows.get(ks[0], {}).get("samples_per_s")
        ratio = f"{floor['samples_per_s'] / base:.2f}" if base and "samples_per_s" in floor else "—"
        lines.append(f"| {net} | {batch} | " + " | ".join(cells) + f" | {_cell(floor)} | {ratio} |")
    lines += ["", "| net | MC-100 ms (batch 1) | distilled ms | MC-100 / distilled |", "|---|---|---|---|"]
    for net, lat in doc["latency"].items():
        lines.append(f"| {net} | {lat['mc100_ms']} | {lat['distilled_ms']} | {lat['ratio']}x |")
    return "\n".join(lines)


def _cell(row: dict) -> str:
    if row.get("oom"):
        return "oom"
    if "samples_per_s" not in row:
        return row.get("skipped", "error" if "error" in row else "—")
    peak = f" ({row['peak_mib']:.0f})" if row.get("peak_mib") is not None else ""
    return f"{row['samples_per_s']:,.0f}{peak}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes: check the script, measure nothing of note")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda first")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--budget-s", type=float, default=360, help="distill runs left after this are skipped (recorded)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/gpu.json; "
                                                             "a dry run writes build/gpu_dry_run.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine; nothing was measured "
              "(--dry-run --device cpu checks the script itself)", file=sys.stderr)
        return EXIT_NO_CUDA
    out = args.out or (ROOT / "build" / "gpu_dry_run.json" if args.dry_run else ROOT / "benchmarks" / "results" / "gpu.json")
    start = time.perf_counter()
    doc = {"command": " ".join(["benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
           "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU smoke run)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run}
    if not args.skip_tests:
        doc["tests"] = run_tests(device)
    doc.update(measure(args, device))
    doc["seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(out)
    print(table(doc))
    return 1 if doc.get("tests", {}).get("returncode", 0) not in (0, 5) else 0  # (5: no test collected)


if __name__ == "__main__":
    sys.exit(main())
