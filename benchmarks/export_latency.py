"""Batch-1 latency of an exported model in onnxruntime beside PyTorch eager, for the same model.

    .venv/bin/python benchmarks/export_latency.py [--model build/demo/distilled] [--seeds 3]

Without --model, the sample's architecture (samples/quick.py) with the sample checkpoint's
weights is used. Each seed times 500 single-input predictions after 50 warm-up runs, on inputs
drawn from that seed; the table reports the median per seed, then mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fmt, median_ms, save  # noqa: E402

from ddtool.checkpoint import load_model  # noqa: E402
from ddtool.exporting import export  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a bundle or distill --out folder (default: the sample checkpoint)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    if args.model:
        loaded = load_model(args.model)
    else:
        loaded = load_model(ROOT / "samples" / "fmnist_quick.pt", arch=f"{ROOT / 'samples' / 'quick.py'}:quick")
    model, shape = loaded.model.eval(), (1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export(model, path, "onnx", shape)
        options = ort.SessionOptions()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        eager, onnx = [], []
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            inputs = [torch.randn(1, *shape, generator=gen) for _ in range(550)]
            with torch.inference_mode():
                eager.append(median_ms(model, inputs))
            arrays = [x.numpy() for x in inputs]
            onnx.append(median_ms(lambda a: session.run(None, {name: a}), arrays))
            print(f"seed {seed}: PyTorch eager {eager[-1]:.3f} ms, onnxruntime {onnx[-1]:.3f} ms", flush=True)
    doc = {"command": " ".join(["benchmarks/export_latency.py", *sys.argv[1:]]),
           "model": str(args.model or "samples/fmnist_quick.pt"), "input_shape": list(shape),
           "pytorch_eager_ms": eager, "onnxruntime_ms": onnx}
    print(save("export_latency", doc))
    print(f"PyTorch eager {fmt(eager, '.3f')} ms, onnxruntime {fmt(onnx, '.3f')} ms (batch 1, median per seed)")


if __name__ == "__main__":
    main()
