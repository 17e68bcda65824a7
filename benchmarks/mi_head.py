"""The MI head (``--mi-head``) on the Fashion-MNIST panel: does one forward pass give MC dropout's
epistemic uncertainty?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mi_head.py --teachers t10 t9 --seeds 0 1 2
    .venv/bin/python benchmarks/mi_head.py --report      # the table of BENCHMARKS.md

For each teacher of benchmarks/teachers.py (trained first by that script) and seed, ddtool's API
distills the teacher with the defaults and ``mi_head=True`` on the first ``--s-size`` training
images (no labels), then on all 10,000 test images and on 2,000 test images rotated by 90
degrees (teachers.shifted) it measures

* Pearson and Spearman correlation of the head's MI with the teacher's MC-100 mutual information
  MI_100(x) = H(mean_k p_k) - mean_k H(p_k) (100 masks, seed 0; plug-in, uncorrected), on the test
  images; and, as the baseline the head must beat, those of the student's predictive entropy;
* OOD AUROC (rotated against unrotated test images) of the head's MI, of MC-100's MI, of
  MC-100's predictive entropy and of the student's predictive entropy;
* the student's test error and KL to the MC-100 average (unchanged by the head: it is fitted after
  the run).

Rows are appended to benchmarks/results/mi_head.json after each run.
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

import fashion_mnist  # noqa: E402  (on the path through common)

from ddtool.data import Preprocess  # noqa: E402
from ddtool.distillation import DistillConfig, distill  # noqa: E402
from ddtool.evaluation import auroc, entropy, kl_divergence, pearson, spearman  # noqa: E402
from ddtool.mc import MCSampler  # noqa: E402
from ddtool.mihead import WithMI, mutual_information  # noqa: E402

PRE = Preprocess(channels=1)
MC = 100


@torch.no_grad()
def mc_split(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict:
    """MC-100 per input: mean probabilities, predictive entropy and MI (masks from seed 0), cached."""
    path = panel_teachers.TEACHERS_DIR / f"{name}_mi{MC}_{len(x)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    torch.manual_seed(0)
    sampler = MCSampler(model, x[:2])
    probs, mi = [], []
    for chunk in x.split(100):
        p = torch.softmax(sampler.outputs(chunk, MC).float(), dim=-1)
        probs.append(p.mean(0))
        mi.append(mutual_information(p))
    out = {"probs": torch.cat(probs), "mi": torch.cat(mi)}
    torch.save(out, path)
    return out


@torch.no_grad()
def head_outputs(result, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's probabilities and its head's MI on ``x``, one forward pass each batch."""
    both = WithMI(result.student, result.mi_head.head, result.mi_head.feature)
    probs, mi = [], []
    for chunk in x.split(1000):
        out, m = both(chunk)
        probs.append(torch.softmax(out.float(), dim=1))
        mi.append(m)
    return torch.cat(probs), torch.cat(mi)


def run_one(name: str, seed: int, s_x, test_x, ood_x, labels) -> dict:
    teacher = panel_teachers.load(name)
    mc, mc_ood = mc_split(name, teacher, test_x), mc_split(name + "_rot90", teacher, ood_x)
    start = time.perf_counter()
    result = distill(teacher, s_x, PRE, DistillConfig(seed=seed, mi_head=True))
    seconds = time.perf_counter() - start
    probs, mi = head_outputs(result, test_x)
    probs_ood, mi_ood = head_outputs(result, ood_x)
    is_ood = torch.arange(len(test_x) + len(ood_x)) >= len(test_x)

    def ood(score, score_ood):
        return auroc(torch.cat([score, score_ood]), is_ood)

    ent = entropy(probs)
    return {"teacher": name, "seed": seed, "s_size": len(s_x), "distill_seconds": seconds,
            "head": result.mi_head.as_dict(),
            "student_error": 100 * (probs.argmax(1) != labels).float().mean().item(),
            "student_kl_to_mc": kl_divergence(mc["probs"], probs).mean().item(),
            "mean_mi_mc100": mc["mi"].mean().item(), "mean_mi_head": mi.mean().item(),
            "pearson_head": pearson(mi, mc["mi"]), "spearman_head": spearman(mi, mc["mi"]),
            "pearson_student_entropy": pearson(ent, mc["mi"]), "spearman_student_entropy": spearman(ent, mc["mi"]),
            "ood_auroc": {"head_mi": ood(mi, mi_ood), "mc100_mi": ood(mc["mi"], mc_ood["mi"]),
                          "mc100_entropy": ood(entropy(mc["probs"]), entropy(mc_ood["probs"])),
                          "student_entropy": ood(ent, entropy(probs_ood))}}


def report() -> str:
    """The markdown table of mi_head.json: per teacher, mean ± std over seeds."""
    from common import fmt as fmt_seeds

    def fmt(values, spec=".3f"):
        return fmt_seeds(values, spec) if len(values) > 1 else format(values[0], spec)

    rows = json.loads((RESULTS / "mi_head.json").read_text())["rows"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["s_size"]), []).append(r)
    lines = ["| teacher | seeds | Pearson: head / student entropy | Spearman: head / student entropy | "
             "OOD AUROC: head MI / MC-100 MI / MC-100 entropy / student entropy | mean MI: head / MC-100 | "
             "held-out MSE: head / constant (x1e-3) | head fit s / distill s |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, _), rs in groups.items():
        col = lambda key: [r[key] for r in rs]  # noqa: E731
        ood = lambda key: [r["ood_auroc"][key] for r in rs]  # noqa: E731
        head = lambda key, scale=1: [scale * r["head"][key] for r in rs]  # noqa: E731
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {fmt(col('pearson_head'))} / "
                     f"{fmt(col('pearson_student_entropy'))} | {fmt(col('spearman_head'))} / {fmt(col('spearman_student_entropy'))} | "
                     f"{fmt(ood('head_mi'))} / {fmt(ood('mc100_mi'))} / {fmt(ood('mc100_entropy'))} / "
                     f"{fmt(ood('student_entropy'))} | {fmt(col('mean_mi_head'), '.4f')} / {rs[0]['mean_mi_mc100']:.4f} | "
                     f"{fmt(head('held_out_mse', 1e3), '.2f')} / {fmt(head('constant_mse', 1e3), '.2f')} | "
                     f"{fmt(head('seconds'), '.0f')} / {fmt(col('distill_seconds'), '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=["t10", "t9"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--s-size", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print the table of mi_head.json and stop")
    args = ap.parse_args()
    if args.report:
        print(report())
        return
    torch.set_num_threads(args.threads)
    train_images, _ = fashion_mnist.load("train")
    test_images, labels = fashion_mnist.load("test")
    s_x = torch.from_numpy(train_images[:args.s_size]).unsqueeze(1)
    test_x = fashion_mnist.as_float(test_images)
    ood_x = panel_teachers.shifted(test_x)
    path = RESULTS / "mi_head.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.update({"machine": machine() + " (shared with other jobs)", "command": "benchmarks/mi_head.py " + " ".join(sys.argv[1:])})
    done = {(r["teacher"], r["seed"], r["s_size"]) for r in doc["rows"]}
    for seed in args.seeds:
        for name in args.teachers:
            if (name, seed, args.s_size) in done:
                continue
            row = run_one(name, seed, s_x, test_x, ood_x, labels)
            doc["rows"].append(row)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
