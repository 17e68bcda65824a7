"""Is a student's shortfall at 10,000 inputs fit or coverage? Prototype augmentations of S, screened.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_screen.py --teacher t2 \\
        --variant base10:epochs=10 mix1:epochs=10,mix=1.0 shift2:epochs=10,shift=2 \\
        mix04:epochs=10,mix=0.4 k16:epochs=10,teacher_samples=16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_screen.py --teacher t2 --variant base30:epochs=30 \\
        k16e30:teacher_samples=16

For each variant (``DistillConfig`` settings over the defaults, plus at most one augmentation of
S that ddtool does not offer, patched into its perturbation for this screen only) the panel
teacher (benchmarks/teachers.py) is distilled on the first ``--s`` training images and the
student's KL to the teacher's MC-100 average is measured on 2,000 of those training inputs
(``kl_train``: how well it fits S) and on the 10,000 test images (``kl_test``). A ``kl_test``
far above ``kl_train`` says more distinct inputs would help; close to it, the fit itself is short.

* ``mix=a``: mixup of each batch with a shuffled copy of itself, lambda ~ Beta(a, a) folded to
  max(lambda, 1 - lambda) (the teacher labels the mixed input, "function matching");
* ``shift=k``: a random translation of every image by up to k pixels, zero fill.

Rows are appended to benchmarks/results/fit_screen.json with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
import teachers as panel_teachers  # noqa: E402
from panel import PRE, parse_variant  # noqa: E402

import fashion_mnist  # noqa: E402  (on the path through common)

import ddtool.distillation as distillation  # noqa: E402
from ddtool.evaluation import kl_divergence, predict_probs  # noqa: E402

PLAIN = distillation.perturbation


def augmentation(kind: str, arg: float):
    """A stand-in for ddtool.data.perturbation that applies one prototype augmentation."""
    def factory(zero=0.0, flips="", generator=None, text=None, tokens=0.0):
        def perturb(x: torch.Tensor) -> torch.Tensor:
            if kind == "mix":
                lam = torch.distributions.Beta(arg, arg).sample((len(x),)).to(x)
                lam = torch.maximum(lam, 1 - lam).view(-1, 1, 1, 1)
                return lam * x + (1 - lam) * x[torch.randperm(len(x), generator=generator, device=x.device)]
            k, (h, w) = int(arg), x.shape[-2:]
            pad = torch.nn.functional.pad(x, (k, k, k, k))
            dx, dy = (torch.randint(0, 2 * k + 1, (len(x),), generator=generator) for _ in range(2))
            return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])
        return perturb
    return factory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="t2")
    ap.add_argument("--variant", nargs="+", required=True, help="name:key=value,... (mix=a, shift=k besides DistillConfig)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--s", type=int, default=10000, help="unlabelled training images distilled on")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train_images, _ = fashion_mnist.load("train")
    test_images, labels = fashion_mnist.load("test")
    s_x = torch.from_numpy(train_images[:args.s]).unsqueeze(1)
    test_x, fit_x = fashion_mnist.as_float(test_images), fashion_mnist.as_float(train_images[:2000])
    teacher = panel_teachers.load(args.teacher)
    mc_test = torch.load(panel_teachers.TEACHERS_DIR / f"{args.teacher}_probs.pt", weights_only=True)["mc"]
    torch.manual_seed(0)
    mc_fit, _ = predict_probs(teacher, fit_x, 1000, mc_samples=100)
    path = RESULTS / "fit_screen.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.update(machine=machine() + " (shared with other jobs)", command="benchmarks/fit_screen.py " + " ".join(sys.argv[1:]))
    for text in args.variant:
        name, settings = parse_variant(text)
        augment = [(k, float(settings.pop(k))) for k in ("mix", "shift") if k in settings]
        distillation.perturbation = augmentation(*augment[0]) if augment else PLAIN
        start = time.perf_counter()
        student = distillation.distill(teacher, s_x, PRE, distillation.DistillConfig(seed=args.seed, **settings)).student
        seconds = time.perf_counter() - start
        probs, _ = predict_probs(student, test_x, 1000)
        row = {"teacher": args.teacher, "variant": name, "seed": args.seed, "s": args.s,
               "error": 100 * (probs.argmax(1) != labels).float().mean().item(),
               "kl_test": kl_divergence(mc_test, probs).mean().item(),
               "kl_train": kl_divergence(mc_fit, predict_probs(student, fit_x, 1000)[0]).mean().item(), "sec": seconds}
        doc["rows"].append(row)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    distillation.perturbation = PLAIN


if __name__ == "__main__":
    main()
