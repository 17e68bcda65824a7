"""A panel of Fashion-MNIST teachers trained with dropout, for choosing and testing ddtool's defaults.

    .venv/bin/python benchmarks/teachers.py                 # trains every missing teacher, then measures them
    .venv/bin/python benchmarks/teachers.py --only t5 t6    # some of them

Each teacher is trained here on the first ``n_train`` Fashion-MNIST *training* images (labels are
used only here), with SGD (momentum 0.9, batch 128, a constant rate, no weight decay: the low-rate
fine-tuning and weight decay that close the standard -> MC gap are left out on purpose, see
samples/make_samples.py). The nets are small (a teacher trains in about a minute on 2 cores) and
differ in what matters for dropout distillation (tiny on purpose: on 2 shared cores MC-100 on the
10,000 test images and 30 epochs of distillation must take minutes, not hours):

* architecture: a conv net (3x3 convs, max-pooling), maxout MLPs and ReLU MLPs;
* where dropout sits: before the max (max-pool or maxout; ``before``: E[max] != max E, where MC
  dropout pays off), after it (``after``), in the fc layers only (ReLU MLPs), on the input (``p_in``);
* the rate (0.3 or 0.5), the width, the seed and the training length.

The first design (conv nets of width 4-12 only) was dropped after its first teacher: on these
cores its MC-100 took 3 minutes, and at width 4 it had no gap (t1, kept). The panel is split
before anything else was measured: TUNE (t1-t4) is what the defaults were chosen
on; TEST (t5-t10; t9 and t10 added when t5 had no gap, before the test half was distilled) stays untouched until the defaults are fixed, then is distilled with the
defaults only. Each test teacher has a tune teacher of the same family beside it, differing in
seed, width, rate or length, so the test asks whether the defaults carry over, not whether a
new kind of net works.

For each teacher: the standard (deterministic, weight-scaled) and MC-100 test error on all 10,000
test images (MC with one mask seed: on these 2 cores a second seed cost as much as training;
MC-100's spread over mask seeds was 0.03-0.10 points on the paper-table nets, BENCHMARKS.md), written to
benchmarks/results/teachers.json; the weights go to build/bench/teachers/<name>.pt, and the
standard and MC-100 probabilities on the test images and on shifted ones (rotated by 90 degrees,
see :func:`shifted`) to build/bench/teachers/<name>_probs.pt, for benchmarks/panel.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILD, RESULTS, machine, seed_all  # noqa: E402

import fashion_mnist  # noqa: E402  (on the path through common)
from make_samples import train  # noqa: E402  (samples/ is on the path through common too)

from ddtool.evaluation import predict_probs  # noqa: E402

TEACHERS_DIR = BUILD / "teachers"


# --------------------------------------------------------------------------- architectures
def conv(width: int = 16, p: float = 0.5, where: str = "before", fc: int = 128, num_classes: int = 10) -> nn.Sequential:
    """Two 3x3 conv blocks (width, 2 * width filters), each max-pooled 2x2, and two fc layers.
    Dropout with rate ``p`` after every conv (``where="before"`` the pooling, ``"after"`` it)
    and after the hidden fc layer."""

    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        return layers + ([nn.Dropout(p), nn.MaxPool2d(2)] if where == "before" else [nn.MaxPool2d(2), nn.Dropout(p)])

    return nn.Sequential(*block(1, width), *block(width, 2 * width), nn.Flatten(),  # 28 -> 14 -> 7
                         nn.Linear(2 * width * 7 * 7, fc), nn.ReLU(), nn.Dropout(p), nn.Linear(fc, num_classes))


def mlp(width: int = 1024, depth: int = 2, p: float = 0.5, p_in: float = 0.0, num_classes: int = 10) -> nn.Sequential:
    """``depth`` fc layers of ``width`` units, dropout ``p`` after each; ``p_in`` on the input pixels."""
    layers: list[nn.Module] = [nn.Flatten()] + ([nn.Dropout(p_in)] if p_in else [])
    for i in range(depth):
        layers += [nn.Linear(784 if i == 0 else width, width), nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class Maxout(nn.Module):
    """The max over groups of ``pieces`` consecutive units (Goodfellow et al. 2013): (N, k * m) -> (N, m)."""

    def __init__(self, pieces: int):
        super().__init__()
        self.pieces = pieces

    def forward(self, x):
        return x.view(x.shape[0], -1, self.pieces).amax(-1)


def maxout(width: int = 512, pieces: int = 4, p: float = 0.5, where: str = "before", p_in: float = 0.0,
           num_classes: int = 10) -> nn.Sequential:
    """Two maxout layers of ``width`` linear units pooled ``pieces`` at a time. Dropout ``p`` on the
    linear units ``before`` the max (E[max] != max E: the case of Quick's dropout before
    max-pooling, at a fraction of a conv net's cost) or ``after`` it (the usual maxout + dropout);
    ``p_in`` on the input pixels."""
    layers: list[nn.Module] = [nn.Flatten()] + ([nn.Dropout(p_in)] if p_in else [])
    for i in range(2):
        linear = nn.Linear(784 if i == 0 else width // pieces, width)
        layers += [linear, nn.Dropout(p), Maxout(pieces)] if where == "before" else [linear, Maxout(pieces), nn.Dropout(p)]
    return nn.Sequential(*layers, nn.Linear(width // pieces, num_classes))


ARCHS = {"conv": conv, "mlp": mlp, "maxout": maxout}

#: name -> (architecture, its arguments, training: seed, epochs, training images, rate)
TEACHERS = {
    # tune half: the defaults were chosen on these
    "t1": ("conv", {"width": 4, "p": 0.5, "where": "before", "fc": 64}, {"seed": 0, "epochs": 10, "n_train": 20000, "lr": 0.05}),
    "t2": ("maxout", {"width": 512, "pieces": 4, "p": 0.5, "where": "before"}, {"seed": 0, "epochs": 5, "n_train": 20000, "lr": 0.02}),
    "t3": ("mlp", {"width": 256, "depth": 2, "p": 0.5}, {"seed": 0, "epochs": 8, "n_train": 20000, "lr": 0.05}),
    "t4": ("maxout", {"width": 384, "pieces": 3, "p": 0.3, "where": "before"}, {"seed": 0, "epochs": 5, "n_train": 20000, "lr": 0.02}),
    # test half: untouched until the defaults were fixed
    "t5": ("maxout", {"width": 512, "pieces": 4, "p": 0.5, "where": "before"}, {"seed": 1, "epochs": 7, "n_train": 20000, "lr": 0.02}),
    "t6": ("maxout", {"width": 512, "pieces": 4, "p": 0.5, "where": "after"}, {"seed": 2, "epochs": 5, "n_train": 30000, "lr": 0.02}),
    "t7": ("mlp", {"width": 256, "depth": 3, "p": 0.5, "p_in": 0.2}, {"seed": 1, "epochs": 8, "n_train": 20000, "lr": 0.05}),
    "t8": ("maxout", {"width": 384, "pieces": 2, "p": 0.5, "where": "before", "p_in": 0.2}, {"seed": 3, "epochs": 6, "n_train": 20000, "lr": 0.02}),
    # added to the test half (before any of it was distilled) when t5 came out without a gap
    "t9": ("maxout", {"width": 512, "pieces": 4, "p": 0.5, "where": "before"}, {"seed": 4, "epochs": 5, "n_train": 20000, "lr": 0.02}),
    "t10": ("maxout", {"width": 640, "pieces": 5, "p": 0.5, "where": "before"}, {"seed": 5, "epochs": 4, "n_train": 20000, "lr": 0.02}),
}
TUNE = ["t1", "t2", "t3", "t4"]
TEST = ["t5", "t6", "t7", "t8", "t9", "t10"]


def build(name: str) -> nn.Module:
    arch, kwargs, _ = TEACHERS[name]
    return ARCHS[arch](**kwargs)


def describe(name: str) -> str:
    arch, kwargs, train = TEACHERS[name]
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{arch}({args}); seed {train['seed']}, {train['epochs']} epochs on {train['n_train']} images"


# --------------------------------------------------------------------------- training and loading
def load(name: str) -> nn.Module:
    """The trained teacher ``name`` (trained by :func:`main` first)."""
    model = build(name)
    model.load_state_dict(torch.load(TEACHERS_DIR / f"{name}.pt", weights_only=True))
    return model.eval()


def trained(name: str, train_x: torch.Tensor, train_y: torch.Tensor) -> tuple[nn.Module, float | None]:
    """The teacher, trained now (and saved) unless it was already; the training seconds."""
    path = TEACHERS_DIR / f"{name}.pt"
    if path.exists():
        return load(name), None
    _, _, settings = TEACHERS[name]
    seed_all(settings["seed"])
    model = build(name)
    n = settings["n_train"]
    start = time.perf_counter()
    train(model, train_x[:n], train_y[:n], settings["epochs"], settings["lr"], settings["seed"], drop_rate=False)
    seconds = time.perf_counter() - start
    TEACHERS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, seconds


#: The shifted inputs of the OOD columns: the first OOD_N test images rotated by 90 degrees.
OOD_N = 2000


def shifted(test_x: torch.Tensor) -> torch.Tensor:
    """Fashion-MNIST made out-of-distribution: test images rotated by 90 degrees (a shoe on its heel)."""
    return torch.rot90(test_x[:OOD_N], 1, dims=(-2, -1)).contiguous()


def test_errors(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mc_seeds=(0,)) -> dict:
    """Standard and MC-100 test error in %, MC per mask seed. The probabilities (test and
    shifted inputs; MC of the first seed) are kept for the panel under build/bench/teachers/."""
    std, _ = predict_probs(model, x, 1000)
    out = {"standard": 100 * (std.argmax(1) != y).float().mean().item(), "mc100": []}
    keep = {"standard": std, "standard_ood": predict_probs(model, shifted(x), 1000)[0]}
    for seed in mc_seeds:
        torch.manual_seed(seed)
        mc, _ = predict_probs(model, x, 1000, mc_samples=100)
        out["mc100"].append(100 * (mc.argmax(1) != y).float().mean().item())
        if seed == mc_seeds[0]:
            keep["mc"] = mc
            torch.manual_seed(seed)
            keep["mc_ood"] = predict_probs(model, shifted(x), 1000, mc_samples=100)[0]
    torch.save(keep, TEACHERS_DIR / f"{name}_probs.pt")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(TEACHERS), help="teachers to train and measure")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine two threads "
                    "ran 2-7x slower than one)")
    ap.add_argument("--mc-seeds", type=int, default=1, help="mask seeds of MC-100 (the panel's reference is their mean "
                    "error; the probabilities kept are seed 0's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_images, train_labels = fashion_mnist.load("train")
    test_images, test_labels = fashion_mnist.load("test")
    train_x, test_x = fashion_mnist.as_float(train_images), fashion_mnist.as_float(test_images)
    path = RESULTS / "teachers.json"
    doc = json.loads(path.read_text()) if path.exists() else {"teachers": {}}
    doc.update({"machine": machine(), "command": "benchmarks/teachers.py " + " ".join(sys.argv[1:]),
                "tune": TUNE, "test": TEST})
    for name in args.only:
        print(f"{name}: {describe(name)}", flush=True)
        model, seconds = trained(name, train_x, train_labels)
        start = time.perf_counter()
        errors = test_errors(name, model, test_x, test_labels, mc_seeds=tuple(range(args.mc_seeds)))
        entry = {"description": describe(name), "half": "tune" if name in TUNE else "test",
                 "train_seconds": seconds if seconds is not None else doc["teachers"].get(name, {}).get("train_seconds"),
                 "measure_seconds": time.perf_counter() - start, **errors}
        entry["gap"] = entry["standard"] - sum(errors["mc100"]) / len(errors["mc100"])
        doc["teachers"][name] = entry
        print(json.dumps({name: entry}), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")  # after every teacher: an interrupted run keeps what it did


if __name__ == "__main__":
    main()
