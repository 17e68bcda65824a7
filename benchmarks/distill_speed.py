"""Distillation throughput: ddtool against its floor and against a plain loop; K samples; memory.

    .venv/bin/python benchmarks/distill_speed.py                 # all of it (about 40 minutes on 2 cores)
    .venv/bin/python benchmarks/distill_speed.py --only memory   # one part: floor, plain, k, memory

* floor: the student's own forward and backward pass (KL loss) on the same prepared batches,
  timed in the same process right after ddtool's epoch, the nets side by side (each seed runs
  every net); wall and CPU-time ratios and page faults a step. Target: ddtool <= 1.3x floor at K=1.
* bound: the CPU time a step of the student's forward + backward, the teacher's masked forward
  and the SGD update take, each alone: the best ratio to the floor a K = 1 step can reach.
* plain: a straightforward PyTorch loop of Algorithm 2 (below) reading the same PNG folder
  through a standard DataLoader, same model, batch, threads and epochs; the target is ddtool
  >= 1.5x faster. ddtool's time includes decoding the folder into its cache.
* k: a distillation epoch at K=8 against K=1 (target <= 1.3x on LeNet, where dropout sits only
  before the last layer and the shared prefix is almost the whole network).
* denormal: Quick's floor ratio with and without ``torch.set_flush_denormal(True)``, alternated
  within each seed (is denormal arithmetic what makes some Quick runs slow?).
* memory: peak resident memory of `ddtool distill` on the 60,000-image folder (target < 2 GB): the
  largest process, and the sum over the process tree (DataLoader workers included).

Teachers are freshly initialised networks: speed does not depend on what the weights are.
Results go to benchmarks/results/distill_speed*.json; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, BUILD, fmnist_folder, fmt, save, seed_all  # noqa: E402
from nets import NETS  # noqa: E402

from ddtool.data import Preprocess, default_workers, index_folder, open_unlabelled, perturbation  # noqa: E402
from ddtool import distillation  # noqa: E402
from ddtool.distillation import DistillConfig, distill, kl_loss  # noqa: E402
from ddtool.dropout import SampledDropout, set_mc  # noqa: E402
from ddtool.model import uses_channels_last  # noqa: E402

BATCH = 64


# --------------------------------------------------------------------------- the plain loop
class PngFolder(torch.utils.data.Dataset):
    """What a straightforward implementation reads with: one PIL decode per item per epoch."""

    def __init__(self, root: Path):
        self.files = sorted(root.glob("*.png"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = np.asarray(Image.open(self.files[i]).convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(image)[None]


def plain_distill(model, folder: Path, epochs: int, seed: int, lr: float = 0.01) -> list[float]:
    """Algorithm 2 as anyone would first write it. Returns the seconds of each epoch."""
    torch.manual_seed(seed)
    teacher = copy.deepcopy(model).train()  # dropout on (these nets have no BatchNorm)
    student = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(PngFolder(folder), batch_size=BATCH, shuffle=True, num_workers=default_workers())
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x in loader:
            x = x * (torch.rand(x.shape[0], 1, *x.shape[2:]) >= 0.2)  # pixels zeroed with p = 0.2
            with torch.no_grad():
                target = F.softmax(teacher(x), dim=1)
            loss = F.kl_div(F.log_softmax(student(x), dim=1), target, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- ddtool and its floor
def _usage() -> tuple[float, int]:
    """This process's CPU seconds (all its threads) and minor page faults so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def ddtool_run(model, folder: Path, epochs: int, seed: int, k: int = 1, marks: list | None = None):
    """ddtool's API on the folder: (seconds to open/cache it, seconds per epoch, the data set).
    ``marks`` receives (CPU seconds, page faults) at the end of each epoch."""
    pre = Preprocess(channels=1)
    start = time.perf_counter()
    index = index_folder(folder, labelled=False)
    data = open_unlabelled(index, pre, list(range(len(index))))
    opened = time.perf_counter() - start
    progress = (lambda e: marks.append(_usage()) if e["event"] == "epoch" else None) if marks is not None else None
    result = distill(model, data, pre, DistillConfig(epochs=epochs, batch_size=BATCH, teacher_samples=k, seed=seed,
                                                     perturb=0.2),  # the protocol of BENCHMARKS.md (the default before issue 17)
                     progress)
    return opened, [r["seconds"] for r in result.history], data, result.shared_prefix


def floor_epoch(model, data, seed: int, usage: list | None = None) -> float:
    """The student's forward + backward on the same batches (prepared beforehand, not timed), in
    the memory layout ddtool uses for it. ``usage`` receives its (CPU seconds, page faults)."""
    pre, gen = Preprocess(channels=1), torch.Generator().manual_seed(seed)
    perturb = perturbation(0.2, "", gen)
    order = torch.randperm(len(data), generator=gen)
    batches = [pre.prepare(raw, perturb) for raw in data.batches(order, BATCH)]
    targets = [F.softmax(torch.randn(b.shape[0], 10, generator=gen), dim=1) for b in batches]
    student = copy.deepcopy(model).eval()
    if uses_channels_last(student, batches[0]):  # the same layout ddtool trains in: the fastest floor
        student = student.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    start, (cpu, faults) = time.perf_counter(), _usage()
    for x, target in zip(batches, targets):
        student.zero_grad(set_to_none=True)
        kl_loss(student(x), target).backward()
    seconds = time.perf_counter() - start
    if usage is not None:
        usage.append((_usage()[0] - cpu, _usage()[1] - faults))
    return seconds


# --------------------------------------------------------------------------- the parts
def part_floor(args) -> dict:
    """ddtool's second epoch over the floor, for the nets side by side, seed by seed: in wall
    time, in CPU time (this process's, all threads: less sensitive to other jobs on a shared
    machine), and the minor page faults a step takes in each."""
    rows = {name: {"inputs": args.inputs, "epoch_s": [], "floor_s": [], "ratio": [], "cpu_ratio": [],
                   "faults_per_step_ddtool": [], "faults_per_step_floor": []} for name in args.nets}
    folder = fmnist_folder("train", args.inputs)
    steps = -(-args.inputs // BATCH)
    for seed in range(args.seeds):
        for name in args.nets:  # side by side: each seed runs every net before the next seed
            seed_all(seed)
            model, marks, usage = NETS[name](), [], []
            _, times, data, _ = ddtool_run(model, folder, 2, seed, marks=marks)
            floor = floor_epoch(model, data, seed, usage)
            (cpu1, f1), (cpu2, f2), (floor_cpu, floor_faults) = marks[0], marks[1], usage[0]
            r = rows[name]
            r["epoch_s"].append(times[-1])  # the second, warm epoch
            r["floor_s"].append(floor)
            r["ratio"].append(times[-1] / floor)
            r["cpu_ratio"].append((cpu2 - cpu1) / floor_cpu)
            r["faults_per_step_ddtool"].append((f2 - f1) / steps)
            r["faults_per_step_floor"].append(floor_faults / steps)
            print(f"floor {name} seed {seed}: epoch {times[-1]:.2f}s floor {floor:.2f}s ratio {r['ratio'][-1]:.2f}, "
                  f"CPU-time ratio {r['cpu_ratio'][-1]:.2f}, page faults a step {r['faults_per_step_ddtool'][-1]:.0f} "
                  f"(floor {r['faults_per_step_floor'][-1]:.0f})", flush=True)
    return rows


def part_plain(args) -> dict:
    rows = {}
    for name in args.nets:
        folder = fmnist_folder("train", args.inputs)
        ours, plain, speedup = [], [], []
        for seed in range(args.seeds):
            seed_all(seed)
            model = NETS[name]()
            opened, times, _, _ = ddtool_run(model, folder, args.epochs, seed)
            total_ours = opened + sum(times)
            total_plain = sum(plain_distill(model, folder, args.epochs, seed))
            ours.append(total_ours)
            plain.append(total_plain)
            speedup.append(total_plain / total_ours)
            print(f"plain {name} seed {seed}: ddtool {total_ours:.1f}s plain {total_plain:.1f}s -> {speedup[-1]:.2f}x", flush=True)
        rows[name] = {"inputs": args.inputs, "epochs": args.epochs, "ddtool_s": ours, "plain_s": plain, "speedup": speedup}
    return rows


def part_k(args) -> dict:
    rows = {}
    for name in ("lenet", "lenet_all"):
        folder = fmnist_folder("train", args.inputs)
        ratios = []
        for seed in range(args.seeds):
            seed_all(seed)
            model = NETS[name]()
            _, t1, _, _ = ddtool_run(model, folder, 2, seed, k=1)
            _, t8, _, shared = ddtool_run(model, folder, 2, seed, k=8)
            ratios.append(t8[-1] / t1[-1])
            print(f"k {name} seed {seed}: K=1 {t1[-1]:.2f}s K=8 {t8[-1]:.2f}s ratio {ratios[-1]:.2f} shared prefix {shared}", flush=True)
        rows[name] = {"inputs": args.inputs, "ratio_k8_k1": ratios, "shared_prefix": shared}
    return rows


def part_denormal(args) -> dict:
    """Quick's floor ratio with and without flushing denormal floats to zero, alternated within
    each seed: is denormal arithmetic what makes some runs slow?"""
    folder = fmnist_folder("train", args.inputs)
    rows = {}
    for flush in (False, True):
        rows[f"quick flush_denormal={flush}"] = {"inputs": args.inputs, "epoch_s": [], "floor_s": [], "ratio": []}
    try:
        for seed in range(args.seeds):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                seed_all(seed)
                model = NETS["quick"]()
                _, times, data, _ = ddtool_run(model, folder, 2, seed)
                floor = floor_epoch(model, data, seed)
                r = rows[f"quick flush_denormal={flush}"]
                r["epoch_s"].append(times[-1])
                r["floor_s"].append(floor)
                r["ratio"].append(times[-1] / floor)
                print(f"denormal flush={flush} seed {seed}: epochs {[round(t, 2) for t in times]} "
                      f"floor {floor:.2f}s ratio {r['ratio'][-1]:.2f}", flush=True)
    finally:
        torch.set_flush_denormal(False)
    return rows


def _tree_rss_mib(root: int) -> float:
    """The summed VmRSS of ``root`` and all its descendants (DataLoader workers included). Pages
    that forked workers share with their parent count twice, so this is an upper bound."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def part_memory(args) -> dict:
    """Peak memory of `ddtool distill` on the 60k folder: the largest single process (ru_maxrss)
    and the whole process tree (main + DataLoader workers), sampled every 50 ms."""
    folder = fmnist_folder("train", 60000)
    ckpt = BUILD / "lenet_teacher.pt"
    torch.save(NETS["lenet"]().state_dict(), ckpt)
    rows = {}
    for label, extra in (("cached", []), ("streamed", ["--cache-mb", "0"])):
        peaks, trees = [], []
        for seed in range(args.seeds):
            script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                      "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            cmd = [sys.executable, "-c", script, sys.executable, "-m", "ddtool", "distill", str(ckpt),
                   "--arch", f"{ROOT / 'benchmarks' / 'nets.py'}:lenet", "--data", str(folder),
                   "--out", str(BUILD / f"mem_{label}"), "--epochs", "1", "--seed", str(seed), "--force", *extra]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            tree = 0.0
            while proc.poll() is None:
                tree = max(tree, _tree_rss_mib(proc.pid))
                time.sleep(0.05)
            out = proc.stdout.read().strip().splitlines()[-1]
            peaks.append(int(out) / 1024)  # ru_maxrss is in KiB on Linux
            trees.append(tree)
            print(f"memory {label} seed {seed}: peak RSS {peaks[-1]:.0f} MiB (largest process), "
                  f"{tree:.0f} MiB (process tree, summed)", flush=True)
        rows[label] = {"inputs": 60000, "peak_rss_mib": peaks, "peak_tree_rss_mib": trees}
    return rows


def part_bound(args) -> dict:
    """What a K = 1 step cannot avoid beyond the floor, in CPU time a step (1 thread is cleanest):
    the teacher's masked forward (ddtool's sampling mode and masks) and the SGD update. The ratio
    ddtool can reach at best is (floor + teacher + update) / floor. The same forward without
    dropout (the student's, in eval mode, no gradients) shows what the masks add."""
    rows = {}
    for name in args.nets:
        parts = {"floor_ms": [], "teacher_ms": [], "unmasked_ms": [], "sgd_ms": [], "bound": []}
        for seed in range(args.seeds):
            seed_all(seed)
            student = NETS[name]().to(memory_format=torch.channels_last)
            teacher = set_mc(copy.deepcopy(student))
            x = torch.rand(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            target = F.softmax(torch.randn(BATCH, 10), 1)
            opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

            def floor():
                student.zero_grad(set_to_none=True)
                kl_loss(student(x), target).backward()

            def masked():
                with torch.no_grad(), SampledDropout():
                    teacher(x)

            def unmasked():  # the same forward without dropout: what the masks cost
                with torch.no_grad():
                    student(x)

            floor()
            opt.step()
            ms = {key: _cpu_ms(fn) for key, fn in (("floor_ms", floor), ("teacher_ms", masked), ("unmasked_ms", unmasked),
                                            ("sgd_ms", opt.step))}
            for key, value in ms.items():
                parts[key].append(value)
            parts["bound"].append((ms["floor_ms"] + ms["teacher_ms"] + ms["sgd_ms"]) / ms["floor_ms"])
            print(f"bound {name} seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in parts.items()), flush=True)
        rows[name] = {"batch": BATCH, **parts}
    return rows


def _cpu_ms(fn, runs: int = 40) -> float:
    """CPU milliseconds of ``fn()`` (this process, all threads), the mean of ``runs`` after 5 untimed."""
    for _ in range(5):
        fn()
    start = time.process_time()
    for _ in range(runs):
        fn()
    return 1000 * (time.process_time() - start) / runs


PARTS = {"floor": part_floor, "bound": part_bound, "plain": part_plain, "k": part_k, "denormal": part_denormal, "memory": part_memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(PARTS), action="append", help="run only these parts")
    ap.add_argument("--nets", nargs="+", default=["lenet", "quick"], choices=sorted(NETS))
    ap.add_argument("--inputs", type=int, default=20000, help="images in the folder (floor, plain, k)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the plain comparison")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--default-heap", action="store_true",
                    help="leave glibc's malloc thresholds as they are (ddtool fixes them: ddtool.distillation.steady_heap)")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    args = ap.parse_args()
    if args.default_heap:
        distillation.steady_heap = lambda: False
    for part in args.only or list(PARTS):
        doc = {"command": " ".join(["benchmarks/distill_speed.py", *sys.argv[1:]]), "args": vars(args),
               "results": PARTS[part](args)}
        print(save(f"distill_speed_{part}{'_' + args.tag if args.tag else ''}", doc))
        for name, row in doc["results"].items():
            print(part, name, {k: fmt(v) if isinstance(v, list) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
