"""Make the embedded sample from the Debian package ``dataset-fashion-mnist``.

    apt-get install dataset-fashion-mnist
    .venv/bin/python samples/make_samples.py          # ~25 min on 2 CPU cores

Writes, next to this file:
  fmnist_quick.pt       state dict of ``quick.py:quick`` trained with dropout on the 60k training images
  unlabelled/           1,000 training images as PNG (no labels), the distillation set S
  eval/<k>_<class>/     100 test images per class as PNG, the labelled evaluation folder
  teacher_metrics.json  standard vs MC-100 test error of the checkpoint on all 10,000 test images

Training: SGD, momentum 0.9, no weight decay, batch 128, 15 epochs; the rate drops tenfold for the
last third of the epochs, as in the paper's Quick schedule (200 + 100 epochs, shortened here).

Why these settings: the sample exists to show a network where MC dropout clearly beats standard
dropout. With dropout before max-pooling after every conv that margin is ~2 points mid-training,
but fine-tuning at the low rate shrinks it, and weight decay shrinks it further: in our runs
(15 epochs, MC-20 on the 10k test images) p=0.5 without weight decay ended at 10.69% standard vs
9.21% MC (1.5 points), with weight decay 5e-4 at 10.07% vs 9.50% (0.6), and Caffe's pooling
(max, avg, avg) with weight decay after 30 epochs at 9.79% vs 9.76% (none).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion_mnist  # noqa: E402
from quick import quick  # noqa: E402

from ddtool.evaluation import predict_probs  # noqa: E402


def train(model, x, y, epochs: int, lr: float, seed: int, weight_decay: float = 0.0, drop_rate: bool = True) -> None:
    """SGD with momentum 0.9 and dropout on; the rate a tenth for the last third of the epochs
    (``drop_rate=False``: constant)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    drop = epochs - epochs // 3 if drop_rate else epochs
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr if epoch < drop else lr / 10
        model.train()
        start, total = time.time(), 0.0
        for idx in torch.randperm(len(x), generator=gen).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()


def write_pngs(images: np.ndarray, folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15, help="training epochs")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    ap.add_argument("--lr", type=float, default=0.02, help="base learning rate")
    ap.add_argument("--p", type=float, default=0.5, help="dropout rate of every dropout layer")
    ap.add_argument("--unlabelled", type=int, default=1000, help="training images written to unlabelled/")
    ap.add_argument("--per-class", type=int, default=100, help="test images per class written to eval/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE, help="where to write the sample")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train_images, train_labels = fashion_mnist.load("train")
    test_images, test_labels = fashion_mnist.load("test")

    model = quick(p=args.p)
    train(model, fashion_mnist.as_float(train_images), train_labels, args.epochs, args.lr, args.seed, args.weight_decay)
    torch.save(model.state_dict(), args.out / "fmnist_quick.pt")

    # The margin the sample exists to show: MC dropout beats standard dropout on the full test set.
    x_test = fashion_mnist.as_float(test_images)
    std, _ = predict_probs(model, x_test, 1000)
    torch.manual_seed(args.seed)
    mc, _ = predict_probs(model, x_test, 1000, mc_samples=100)
    metrics = {
        "test_images": len(x_test),
        "standard_error": (std.argmax(1) != test_labels).float().mean().item(),
        "mc100_error": (mc.argmax(1) != test_labels).float().mean().item(),
        "settings": vars(args) | {"out": None},
    }
    print(json.dumps(metrics, indent=2))
    (args.out / "teacher_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    rng = np.random.default_rng(args.seed)
    for name in ("unlabelled", "eval"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    chosen = np.sort(rng.choice(len(train_images), args.unlabelled, replace=False))
    write_pngs(train_images[chosen], args.out / "unlabelled", [f"train_{i:05d}.png" for i in chosen])
    labels = test_labels.numpy()
    for k, cls in enumerate(fashion_mnist.CLASSES):
        idx = np.sort(rng.choice(np.flatnonzero(labels == k), args.per_class, replace=False))
        write_pngs(test_images[idx], args.out / "eval" / f"{k}_{cls}", [f"test_{i:05d}.png" for i in idx])


if __name__ == "__main__":
    main()
