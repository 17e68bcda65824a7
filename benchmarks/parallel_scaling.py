"""Data-parallel distillation throughput at 1 and 2 processes (torchrun, gloo, CPU).

    .venv/bin/python benchmarks/parallel_scaling.py [--inputs 10000] [--seeds 3]

This machine has 2 cores: 2 processes share them (one thread each, against two threads for the
single process), so the figure shows that scaling is correct and what the all-reduce costs more
than what more hardware would give. Samples/s are those of the second epoch, from history.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILD, ROOT, fmnist_folder, fmt, save  # noqa: E402
from nets import NETS  # noqa: E402


def run(procs: int, folder: Path, ckpt: Path, net: str, seed: int, threads: int) -> float:
    out = BUILD / f"ddp_{procs}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] \
        if procs > 1 else [sys.executable]
    cmd = [*launcher, "-m", "ddtool", "distill", str(ckpt), "--arch", f"{ROOT / 'benchmarks' / 'nets.py'}:{net}",
           "--data", str(folder), "--out", str(out), "--epochs", "2", "--batch-size", "64", "--seed", str(seed),
           "--teacher-samples", "1", "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return json.loads((out / "history.json").read_text())[-1]["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10000)
    ap.add_argument("--net", default="lenet", choices=sorted(NETS))
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    folder = fmnist_folder("train", args.inputs)
    ckpt = BUILD / f"{args.net}_teacher.pt"
    torch.manual_seed(0)
    torch.save(NETS[args.net]().state_dict(), ckpt)
    cores = os.cpu_count() or 1
    results = {}
    for procs in (1, 2):
        rates = [run(procs, folder, ckpt, args.net, seed, max(1, cores // procs)) for seed in range(args.seeds)]
        results[procs] = rates
        print(f"{procs} process(es): {fmt(rates, '.0f')} samples/s (global)", flush=True)
    doc = {"command": " ".join(["benchmarks/parallel_scaling.py", *sys.argv[1:]]), "net": args.net,
           "inputs": args.inputs, "samples_per_s": results}
    print(save("parallel_scaling", doc))


if __name__ == "__main__":
    main()
