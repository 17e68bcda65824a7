"""What the code-free program in a bundle costs: torch.export time and bytes, beside the weights.

    .venv/bin/python benchmarks/bundle_program.py [--seeds 3]

For the sample's architecture (samples/quick.py), each seed runs in a fresh process: the first
``ddtool.checkpoint.program_bytes`` call of the process (torch.export's own start-up included),
then five more, whose median is the steady cost. Reported with the program's size and the size
of the weights alone, and the time to load the program back through ddtool's guarded .pt2 path.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fmt, save  # noqa: E402

ONE_SEED = """
import io, json, statistics, sys, time
import torch
sys.path.insert(0, {samples!r})
from quick import quick
from ddtool.checkpoint import _load_exported, program_bytes
torch.manual_seed({seed})
model = quick().eval()
spec = {{"shape": [1, 28, 28], "dtype": "float32"}}
start = time.perf_counter()
data, why = program_bytes(model, spec)
first = time.perf_counter() - start
steady = []
for _ in range(5):
    start = time.perf_counter()
    program_bytes(model, spec)
    steady.append(time.perf_counter() - start)
start = time.perf_counter()
_load_exported(io.BytesIO(data), "program", False, require_dropout_ops=False)
load = time.perf_counter() - start
weights = io.BytesIO()
torch.save(model.state_dict(), weights)
print(json.dumps({{"first_s": first, "steady_s": statistics.median(steady), "load_s": load,
                  "program_bytes": len(data), "weights_bytes": len(weights.getvalue())}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for seed in range(args.seeds):
        code = ONE_SEED.format(samples=str(ROOT / "samples"), seed=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"seed {seed}: {runs[-1]}", flush=True)
    keys = ("first_s", "steady_s", "load_s", "program_bytes", "weights_bytes")
    doc = {"command": " ".join(["benchmarks/bundle_program.py", *sys.argv[1:]]), "model": "samples/quick.py:quick",
           **{k: [r[k] for r in runs] for k in keys}}
    print(save("bundle_program", doc))
    print(f"torch.export into a bundle: first in a process {fmt(doc['first_s'])} s, then {fmt(doc['steady_s'], '.3f')} s; "
          f"loading it {fmt(doc['load_s'], '.3f')} s; program {statistics.fmean(doc['program_bytes']) / 1024:.0f} KB "
          f"beside {statistics.fmean(doc['weights_bytes']) / 1024:.0f} KB of weights")


if __name__ == "__main__":
    main()
