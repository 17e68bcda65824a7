"""Distill the panel of teachers (benchmarks/teachers.py) and measure what the defaults recover.

    .venv/bin/python benchmarks/teachers.py                                    # first: the teachers
    .venv/bin/python benchmarks/panel.py --teachers t5 t6 t7 t8 --seeds 0 1 2 --tag test
    .venv/bin/python benchmarks/panel.py --teachers t1 t2 --seeds 0 --tag screen \\
        --variant paper:perturb=0.2,lr_drop_epoch=20 --variant cosine:schedule=cosine
    .venv/bin/python benchmarks/panel.py --teachers t5 t9 --seeds 0 --tag check --check-size 5000

Each variant is a set of ``DistillConfig`` settings over the defaults (``defaults``: none at all,
what ``ddtool distill TEACHER --data DIR --out OUT`` runs). For each teacher, variant and seed:
ddtool's API distills the teacher on the first ``--s-size`` Fashion-MNIST training images, held
as a tensor (no labels), with ``DistillConfig(seed=seed, **variant)``; then on all 10,000 test
images it measures the test error of standard dropout, MC dropout (m = 100, computed once per
teacher by teachers.py, for each of its mask seeds) and the student, the gap recovered

    (standard - distilled) / (standard - mean over mask seeds of MC-100)

(MC-100's error is itself random: one mask seed moves it by about 0.1 point, a fifth of a 0.45-point
gap; the KL column uses mask seed 0's probabilities),

the student's KL to the MC average (a low-noise measure of fidelity), and the uncertainty
columns: misclassification AUROC (predictive entropy separating wrong from right test
predictions) and OOD AUROC (entropy on 2,000 test images rotated by 90 degrees against the
10,000 test images), for standard, MC and the student.

With ``--check-size N`` the first N labelled test images are the check set of ``ddtool distill
--check`` (:func:`ddtool.evaluation.check_student`): the student is kept unless its error there
is higher than standard dropout's, else the teacher's own weights are. Every error and AUROC
column is then measured on the other 10,000 - N test images only, and the row records the check
(N, both errors on the check set, which model was kept) and the kept model's error.

Rows are appended to benchmarks/results/panel_<tag>.json after each run (a rerun skips the rows
it has), with the command and the machine.
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
from ddtool.evaluation import auroc, check_student, entropy, kl_divergence, predict_probs  # noqa: E402

PRE = Preprocess(channels=1)  # uint8 images to [0, 1], as the teachers were trained


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` (values as Python literals where they parse)."""
    name, _, body = text.partition(":")
    settings = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def uncertainty(probs: torch.Tensor, probs_ood: torch.Tensor, labels: torch.Tensor) -> dict:
    """Misclassification and OOD AUROC of the predictive entropy."""
    n, m = len(probs), len(probs_ood)
    return {"auroc_error": auroc(entropy(probs), probs.argmax(1) != labels),
            "auroc_ood": auroc(torch.cat([entropy(probs), entropy(probs_ood)]), torch.arange(n + m) >= n)}


def teacher_measures(name: str, labels: torch.Tensor, start: int = 0) -> dict:
    """Standard and MC-100 error (%) and uncertainty of a teacher, from teachers.py's probabilities
    of the test images from ``start`` on (``labels`` are theirs)."""
    kept = torch.load(panel_teachers.TEACHERS_DIR / f"{name}_probs.pt", weights_only=True)
    out = {}
    for method, key in (("standard", "standard"), ("mc100", "mc")):
        probs = kept[key][start:]
        out[method] = {"error": 100 * (probs.argmax(1) != labels).float().mean().item(),
                       **uncertainty(probs, kept[f"{key}_ood"], labels)}
    return out, kept["mc"][start:]


def mc_reference(name: str, row_mc_error: float, check_size: int = 0) -> list[float]:
    """The teacher's MC-100 test errors (%), one per mask seed teachers.py measured: the gap's
    reference is their mean (``teachers.py --mc-seeds N``; one seed = MC-100 of mask seed 0).
    Those are over all 10,000 test images; with a check set, the row's own MC-100 error (mask
    seed 0, on the images the check did not see) is the reference."""
    if check_size:
        return [row_mc_error]
    return json.loads((RESULTS / "teachers.json").read_text())["teachers"][name]["mc100"]


def recovered(std: float, distilled: float, mc_errors: list[float]) -> float | None:
    """The share of the gap recovered, (standard - distilled) / (standard - mean MC-100)."""
    gap = std - sum(mc_errors) / len(mc_errors)
    return (std - distilled) / gap if gap > 0 else None


def run_one(name: str, variant: dict, seed: int, s_x: torch.Tensor, test_x, ood_x, labels, check_size: int = 0) -> dict:
    teacher = panel_teachers.load(name)
    config = DistillConfig(seed=seed, **variant)
    start = time.perf_counter()
    result = distill(teacher, s_x, PRE, config)
    seconds = time.perf_counter() - start
    check = check_student(teacher, result.student, test_x[:check_size], labels[:check_size], 1000) if check_size else None
    test_x, labels = test_x[check_size:], labels[check_size:]  # every column below: the images the check did not see
    measures, mc = teacher_measures(name, labels, check_size)
    probs, _ = predict_probs(result.student, test_x, 1000)
    probs_ood, _ = predict_probs(result.student, ood_x, 1000)
    distilled = {"error": 100 * (probs.argmax(1) != labels).float().mean().item(),
                 "kl_to_mc": kl_divergence(mc, probs).mean().item(), **uncertainty(probs, probs_ood, labels)}
    std, mc_errors = measures["standard"]["error"], mc_reference(name, measures["mc100"]["error"], check_size)
    gap = std - sum(mc_errors) / len(mc_errors)
    return {"teacher": name, "seed": seed, "s_size": len(s_x), "settings": config.as_dict(),
            "standard": measures["standard"], "mc100": measures["mc100"], "distilled": distilled,
            "standard_kl_to_mc": kl_divergence(mc, predict_probs(teacher, test_x, 1000)[0]).mean().item(),
            "gap": gap, "mc100_errors": mc_errors, "recovered": recovered(std, distilled["error"], mc_errors),
            "lr": result.lr, "lr_search": result.lr_search, "epochs_run": len(result.history),
            "distill_seconds": seconds, "check_size": check_size, "test_size": len(labels),
            **({"check": check.as_dict(), "kept_error": (std if check.kept == "standard" else distilled["error"])}
               if check else {})}


def report(tag: str) -> str:
    """Markdown tables of panel_<tag>.json: per teacher, variant and S, mean ± std over seeds; the
    MC-100 column and the gap recovered use every mask seed in teachers.json (mean ± std)."""
    from common import fmt as fmt_seeds

    def fmt(values, spec=".2f"):  # one seed: the value alone
        return fmt_seeds(values, spec) if len(values) > 1 else format(values[0], spec)

    rows = json.loads((RESULTS / f"panel_{tag}.json").read_text())["rows"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["variant"], r["s_size"]), []).append(r)
    lines = ["| teacher | variant | S | seeds | standard % | MC-100 % | distilled % | gap recovered | KL to MC (distilled; standard) | lr | distill s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, variant, s_size), rs in groups.items():
        mc_errors = mc_reference(name, rs[0]["mc100"]["error"], rs[0].get("check_size", 0))  # (older rows too)
        rec = [100 * x for x in (recovered(r["standard"]["error"], r["distilled"]["error"], mc_errors) for r in rs) if x is not None]
        lines.append(f"| {name} | {variant} | {s_size} | {len(rs)} | {rs[0]['standard']['error']:.2f} | {fmt(mc_errors)} | "
                     f"{fmt([r['distilled']['error'] for r in rs])} | {fmt(rec, '.0f') + '%' if rec else '—'} | "
                     f"{fmt([r['distilled']['kl_to_mc'] for r in rs], '.4f')}; {rs[0]['standard_kl_to_mc']:.4f} | "
                     f"{'/'.join(sorted({format(r['lr'], 'g') for r in rs}))} | {fmt([r['distill_seconds'] for r in rs], '.0f')} |")
    lines += ["", "| teacher | variant | S | misclassification AUROC: standard / MC / distilled | OOD AUROC (rotated 90°): standard / MC / distilled |",
              "|---|---|---|---|---|"]
    for (name, variant, s_size), rs in groups.items():
        cells = []
        for key in ("auroc_error", "auroc_ood"):
            cells.append(f"{rs[0]['standard'][key]:.3f} / {rs[0]['mc100'][key]:.3f} / {fmt([r['distilled'][key] for r in rs], '.3f')}")
        lines.append(f"| {name} | {variant} | {s_size} | {cells[0]} | {cells[1]} |")
    checked = [(key, rs) for key, rs in groups.items() if "check" in rs[0]]
    if checked:
        lines += ["", "| teacher | variant | S | seeds | check N / test N | standard % | MC-100 % | distilled % | kept % | "
                  "kept − standard | kept (per seed) | on the check set: standard % / distilled % (per seed) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (name, variant, s_size), rs in checked:
            on_check = "; ".join(f"{100 * r['check']['standard_error']:.2f} / {100 * r['check']['distilled_error']:.2f}" for r in rs)
            lines.append(f"| {name} | {variant} | {s_size} | {len(rs)} | {rs[0]['check_size']} / {rs[0]['test_size']} | "
                         f"{rs[0]['standard']['error']:.2f} | {rs[0]['mc100']['error']:.2f} | "
                         f"{fmt([r['distilled']['error'] for r in rs])} | {fmt([r['kept_error'] for r in rs])} | "
                         f"{fmt([r['kept_error'] - r['standard']['error'] for r in rs])} | "
                         f"{', '.join(r['check']['kept'] for r in rs)} | {on_check} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=panel_teachers.TEST)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--s-size", type=int, default=10000, help="unlabelled training images distilled on")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,... (repeatable; default: defaults)")
    ap.add_argument("--tag", default="test", help="results go to benchmarks/results/panel_<tag>.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see teachers.py)")
    ap.add_argument("--check-size", type=int, default=0,
                    help="the first N labelled test images are a --check set; every error on the other 10,000 - N")
    ap.add_argument("--report", action="store_true", help="print the tables of panel_<tag>.json and stop")
    args = ap.parse_args()
    if args.report:
        print(report(args.tag))
        return
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant] or [("defaults", {})]
    train_images, _ = fashion_mnist.load("train")
    test_images, labels = fashion_mnist.load("test")
    s_x = torch.from_numpy(train_images[:args.s_size]).unsqueeze(1)  # raw uint8, no labels
    test_x = fashion_mnist.as_float(test_images)
    ood_x = panel_teachers.shifted(test_x)
    path = RESULTS / f"panel_{args.tag}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    doc.update({"machine": machine() + " (shared with other jobs)", "command": "benchmarks/panel.py " + " ".join(sys.argv[1:])})
    done = {(r["teacher"], r["variant"], r["seed"], r["s_size"], r.get("check_size", 0)) for r in doc["rows"]}
    for seed in args.seeds:  # every teacher once before any twice; a teacher's variants side by side
        for name in args.teachers:
            for vname, variant in variants:
                if (name, vname, seed, args.s_size, args.check_size) in done:
                    continue
                row = {"variant": vname, "overrides": variant,
                       **run_one(name, variant, seed, s_x, test_x, ood_x, labels, args.check_size)}
                doc["rows"].append(row)
                path.write_text(json.dumps(doc, indent=2) + "\n")
                rec = "—" if row["recovered"] is None else f"{100 * row['recovered']:.0f}%"
                print(f"{name} {vname} seed {seed} S={args.s_size}: std {row['standard']['error']:.2f} mc {row['mc100']['error']:.2f} "
                      f"distilled {row['distilled']['error']:.2f} (KL {row['distilled']['kl_to_mc']:.4f}) recovered {rec} "
                      f"lr {row['lr']:g} {row['distill_seconds']:.0f}s"
                      + (f"; check {row['check']}, kept error {row['kept_error']:.2f}" if "check" in row else ""), flush=True)


if __name__ == "__main__":
    main()
