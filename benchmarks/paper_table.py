"""The protocol of the paper's Table 1 (Bulo et al. 2016) on Fashion-MNIST, scaled to 2 CPU cores.

    .venv/bin/python benchmarks/paper_table.py                      # every part (see BENCHMARKS.md for the time)
    .venv/bin/python benchmarks/paper_table.py --only table --seeds 3

Parts (``--only``, repeatable):

* table: for LeNet (dropout before the last layer), LeNetAll (after every conv and fc layer but
  the last, after the pooling) and Quick (the sample's net: dropout before every max-pool), the
  test error of standard dropout, MC dropout (m = 100) and the distilled student, mean ± std over
  seeds, and the share of the standard -> MC gap that distillation recovers,
  (standard - distilled) / (standard - MC). The teacher is fixed per network (its standard
  error has no spread); the seeds vary MC's masks and everything random in distillation.
* latency: batch-1 latency of standard dropout, MC dropout (ddtool's, the m samples stacked
  after the shared deterministic prefix, and the usual m passes one by one) and the student.
* s: the paper's right-hand table, Quick distilled with S = training inputs, perturbed training
  inputs (pixels zeroed with p = 0.2) and unlabelled test inputs.
* tried: the things tried to close the gap, one variant of the Quick row per ``--try`` (for
  example ``--try k=1 --try epochs=30 --try perturb=0,flip=h --try s_size=60000,epochs=3``).
* compress: the curve of the paper's Fig. 3: Quick students whose conv and fc layers keep a
  fraction of their units (``--shrink``), distilled, test error against the share of parameters
  kept; beside them the same shrunk nets without distillation. Written as a PNG.

Teachers: Quick is the embedded sample (samples/fmnist_quick.pt, trained with dropout on all
60,000 training images); LeNet and LeNetAll are trained here with dropout on ``--teacher-train``
training images (SGD, momentum 0.9, the rate cut tenfold for the last third) and cached under
build/bench/paper/. Distillation uses ddtool's API (``ddtool.distill``) on the first
``--s-size`` training images held as a tensor; no label is read after the teacher is trained.
Results: benchmarks/results/paper_table_<part>.json (with ``--tag T``: paper_table_<part>_T.json)
and benchmarks/results/compression.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILD, RESULTS, ROOT, fmt, mean_std, median_ms, save, seed_all  # noqa: E402
from nets import NETS  # noqa: E402

import fashion_mnist  # noqa: E402  (on the path through common)
from make_samples import train  # noqa: E402

from ddtool.checkpoint import load_model  # noqa: E402
from ddtool.compress import shrunk_student  # noqa: E402
from ddtool.data import Preprocess  # noqa: E402
from ddtool.distillation import DistillConfig, distill  # noqa: E402
from ddtool.dropout import mc_mode  # noqa: E402
from ddtool.evaluation import latency_ms, predict_probs  # noqa: E402
from ddtool.model import count_parameters, fast_layout  # noqa: E402

PAPER = BUILD / "paper"
PRE = Preprocess(channels=1)  # images in [0, 1], as the teachers were trained
#: Quick's layers that --shrink narrows in the compression curve (convs and the hidden fc).
QUICK_LAYERS = ("0", "4", "8", "13")
#: Points by which MC must beat standard dropout for the gap-recovered share to be reported.
CLEAR_GAP = 0.3


# --------------------------------------------------------------------------- data and teachers
def data(args):
    train_images, train_labels = fashion_mnist.load("train")
    test_images, test_labels = fashion_mnist.load("test")
    return {
        "train_x": torch.from_numpy(train_images).unsqueeze(1),  # raw uint8 (N, 1, 28, 28)
        "train_y": train_labels,
        "test_x": torch.from_numpy(test_images).unsqueeze(1),
        "test_y": test_labels,
    }


def teacher_tag(name: str, args) -> str:
    return "sample" if name == "quick" else f"{args.teacher_train}x{args.teacher_epochs}"


def teacher(name: str, d: dict, args) -> torch.nn.Module:
    """The trained-with-dropout network ``name`` (cached; Quick is the sample checkpoint)."""
    if name == "quick":
        return load_model(ROOT / "samples" / "fmnist_quick.pt", arch=f"{ROOT / 'samples' / 'quick.py'}:quick").model.eval()
    path = PAPER / f"teacher_{name}_{args.teacher_train}_{args.teacher_epochs}.pt"
    model = NETS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    seed_all(0)
    n = args.teacher_train
    start = time.perf_counter()
    train(model, d["train_x"][:n].float().div_(255), d["train_y"][:n], args.teacher_epochs, 0.02, 0)
    print(f"trained {name} on {n} images in {time.perf_counter() - start:.0f}s", flush=True)
    PAPER.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


# --------------------------------------------------------------------------- measuring
def test_inputs(d: dict, args) -> tuple[torch.Tensor, torch.Tensor]:
    return d["test_x"][: args.test].float().div_(255), d["test_y"][: args.test]


def error(model, x, y, mc: int = 0, seed: int = 0) -> float:
    torch.manual_seed(seed)
    with fast_layout([model], x) as xl:
        probs, _ = predict_probs(model, xl, 500, mc_samples=mc)
    return 100 * (probs.argmax(1) != y).float().mean().item()


def cached(key: dict, compute) -> dict:
    """One measured seed of one row, kept under build/bench/paper/ so that parts that share a row
    (the table's Quick row is also S = perturbed training inputs) or a teacher's MC-100 error
    measure it once, and an interrupted run picks up where it stopped."""
    path = PAPER / "measured.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    name = json.dumps(key, sort_keys=True)
    if name not in store:
        store[name] = compute()
        if path.exists():  # another part may have written meanwhile: merge
            store = {**json.loads(path.read_text()), name: store[name]}
        PAPER.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(store, indent=1))
    return store[name]


def mc_error(name: str, model, x, y, args, seed: int) -> float:
    key = {"what": "mc", "net": name, "m": args.mc, "test": len(x), "seed": seed, "teacher": teacher_tag(name, args)}
    return cached(key, lambda: {"error": error(model, x, y, args.mc, seed)})["error"]


def settings_of(args, s_name: str, s_size: int, *, k=None, epochs=None, lr=None, perturb=None, flip="") -> dict:
    """A row's distillation settings: the command line's, with the given ones changed. They are
    both what ``distilled`` runs and the row's key in the cache and the results."""
    settings = {"k": k or args.k, "epochs": epochs or args.epochs, "lr": lr or args.lr,
                "perturb": args.perturb if perturb is None else perturb, "s": s_name, "s_size": s_size}
    if flip:
        settings["flip"] = flip
    return settings


def distilled(model, s: torch.Tensor, settings: dict, seed: int, student=None):
    """Distill ``model`` on ``s`` with ``settings`` (see settings_of): (student, seconds)."""
    epochs = settings["epochs"]
    config = DistillConfig(epochs=epochs, lr=settings["lr"], lr_drop_epoch=max(1, round(epochs * 2 / 3)),
                           teacher_samples=settings["k"], perturb=settings["perturb"], flip=settings.get("flip", ""),
                           batch_size=64, seed=seed, device="cpu")
    start = time.perf_counter()
    result = distill(model, s, PRE, config, student=student)
    return result.student, time.perf_counter() - start


def gap_recovered(std: float, mc: float, dist: float) -> float | None:
    """(standard - distilled) / (standard - MC), in %, from the means; None without a clear gap
    (MC ahead of standard by less than ``CLEAR_GAP`` points)."""
    return None if std - mc < CLEAR_GAP else 100 * (std - dist) / (std - mc)


def row(name, model, d, args, s=None, s_name="train", **kw) -> dict:
    """standard, MC-m and distilled errors over the seeds (each seed measured once, see cached)."""
    x, y = test_inputs(d, args)
    s = d["train_x"][: args.s_size] if s is None else s
    out = {"standard": [], "mc": [], "distilled": [], "seconds": []}
    standard = error(model, x, y)
    settings = settings_of(args, s_name, len(s), **kw)
    for seed in range(args.seeds):
        def run():
            student, seconds = distilled(model, s, settings, seed)
            return {"distilled": error(student, x, y), "seconds": seconds}
        key = {"what": "distilled", "net": name, "test": len(x), "seed": seed, "teacher": teacher_tag(name, args), **settings}
        measured = cached(key, run)
        out["standard"].append(standard)
        out["mc"].append(mc_error(name, model, x, y, args, seed))
        out["distilled"].append(measured["distilled"])
        out["seconds"].append(measured["seconds"])
        print(f"{name} {settings} seed {seed}: standard {standard:.2f}% MC-{args.mc} {out['mc'][-1]:.2f}% "
              f"distilled {out['distilled'][-1]:.2f}% ({measured['seconds']:.0f}s)", flush=True)
    means = [mean_std(out[k])[0] for k in ("standard", "mc", "distilled")]
    out["gap_recovered"] = gap_recovered(*means)
    out["settings"] = settings
    return out


def naive_mc_ms(model, x, m: int, runs: int = 10) -> float:
    """Median ms per input of MC dropout as it is usually written: m masked passes, one by one."""
    singles = [x[i % len(x): i % len(x) + 1] for i in range(runs + 2)]
    with torch.no_grad(), mc_mode(model):
        return median_ms(lambda one: torch.stack([model(one).softmax(1) for _ in range(m)]).mean(0), singles, warmup=2)


def latencies(model, student, x, args) -> dict:
    """Batch-1 latency (ms) of standard dropout, MC-m (ddtool's: the m samples stacked into one
    batch after the shared deterministic prefix; and naive: m passes one by one) and the student."""
    with fast_layout([model, student], x[:64]) as xl:
        return {"standard_ms": latency_ms(model, xl, runs=100), "mc_ms": latency_ms(model, xl, args.mc, runs=20),
                "mc_naive_ms": naive_mc_ms(model, xl, args.mc), "distilled_ms": latency_ms(student, xl, runs=100)}


# --------------------------------------------------------------------------- the parts
def part_table(d, args) -> dict:
    rows = {}
    for name in args.nets:
        model = teacher(name, d, args)
        rows[name] = row(name, model, d, args)
    return rows


def part_latency(d, args) -> dict:
    """Batch-1 latencies of each net on the test inputs, one set per seed. The weights do not
    change the time, so the nets are freshly initialised; the student is a copy of the teacher."""
    rows = {}
    x, _ = test_inputs(d, args)
    for name in args.nets:
        runs = []
        for seed in range(args.seeds):
            seed_all(seed)
            model = NETS[name]().eval()
            runs.append(latencies(model, copy.deepcopy(model), x, args))
            print(f"latency {name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), flush=True)
        rows[name] = {k: [r[k] for r in runs] for k in runs[0]}
    return rows


def part_s(d, args) -> dict:
    model = teacher("quick", d, args)
    n = args.s_size
    variants = {
        "training inputs": (d["train_x"][:n], "train", 0.0),
        "perturbed training inputs": (d["train_x"][:n], "train", args.perturb),
        "unlabelled test inputs": (d["test_x"][:n], "test", 0.0),
    }
    return {label: row("quick", model, d, args, s=s, s_name=s_name, perturb=p) for label, (s, s_name, p) in variants.items()}


#: What ``--try`` may vary, and how its value is read.
TRY_KEYS = {"k": int, "epochs": int, "lr": float, "perturb": float, "flip": str, "s_size": int, "s": str}


def parse_try(spec: str) -> dict:
    """``"k=8,epochs=30"`` -> ``{"k": 8, "epochs": 30}``: one variant of the Quick row."""
    out = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in TRY_KEYS or not value:
            raise SystemExit(f"--try {spec!r}: use key=value pairs with keys {', '.join(TRY_KEYS)}")
        out[key] = TRY_KEYS[key](value)
    return out


def part_tried(d, args) -> dict:
    """Each ``--try`` variant of the Quick row (the table's settings with the given ones changed)."""
    model = teacher("quick", d, args)
    rows = {}
    for spec in args.tries:
        kw = parse_try(spec)
        n, s_name = kw.pop("s_size", args.s_size), kw.pop("s", "train")
        s = d[f"{s_name}_x"][:n]
        rows[spec] = row("quick", model, d, args, s=s, s_name=s_name, **kw)
    return rows


def part_compress(d, args) -> dict:
    model = teacher("quick", d, args)
    x, y = test_inputs(d, args)
    total = count_parameters(model)
    s = d["train_x"][: args.s_size]
    settings = settings_of(args, "train", len(s))
    points = []
    for fraction in args.fractions:
        shrunk, _ = shrunk_student(model, {}, {layer: fraction for layer in QUICK_LAYERS})
        kept = 100 * count_parameters(shrunk) / total
        dist, undistilled = [], error(shrunk, x, y)
        for seed in range(args.compress_seeds):
            def run():
                student, seconds = distilled(model, s, settings, seed, student=copy.deepcopy(shrunk))  # trained in place
                return {"distilled": error(student, x, y), "seconds": seconds}
            # all units kept is the table's Quick row: the same key, measured once
            extra = {} if fraction == 1.0 else {"shrink": fraction}
            key = {"what": "distilled", "net": "quick", "test": len(x), "seed": seed, "teacher": teacher_tag("quick", args), **settings, **extra}
            dist.append(cached(key, run)["distilled"])
        points.append({"fraction": fraction, "params_kept_pct": kept, "distilled": dist, "shrunk_not_distilled": undistilled})
        print(f"compress {fraction}: {kept:.1f}% of parameters, distilled {fmt(dist)}%, "
              f"shrunk only {undistilled:.2f}%", flush=True)
    std, mc = error(model, x, y), mc_error("quick", model, x, y, args, 0)
    plot_compression(points, std, mc, RESULTS / "compression.png")
    return {"points": points, "teacher_standard": std, "teacher_mc": mc}


def plot_compression(points, std, mc, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    kept = [p["params_kept_pct"] for p in points]
    means = [mean_std(p["distilled"]) for p in points]
    ax.errorbar(kept, [m for m, _ in means], yerr=[s for _, s in means], marker="o", capsize=3, label="distilled student")
    ax.plot(kept, [p["shrunk_not_distilled"] for p in points], marker="x", linestyle=":", label="shrunk, not distilled")
    ax.axhline(std, color="gray", linestyle="--", label=f"teacher, standard dropout ({std:.2f}%)")
    ax.axhline(mc, color="green", linestyle="--", label=f"teacher, MC-100 ({mc:.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters kept (% of the teacher's)")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(min(mc, *(m for m, _ in means)) - 1, max(std + 2, *(m for m, _ in means)) + 1)
    ax.set_title("Quick on Fashion-MNIST: compression by distillation (cf. Fig. 3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


PARTS = {"table": part_table, "latency": part_latency, "s": part_s, "tried": part_tried, "compress": part_compress}


def summary(part: str, results: dict, mc: int) -> str:
    """The part's results as a markdown table (what BENCHMARKS.md quotes)."""
    if part == "compress":
        lines = ["| fraction of units | parameters kept | distilled error % | shrunk, not distilled % |", "|---|---|---|---|"]
        for p in results["points"]:
            lines.append(f"| {p['fraction']} | {p['params_kept_pct']:.1f}% | {fmt(p['distilled'])} | {p['shrunk_not_distilled']:.2f} |")
        return "\n".join(lines)
    if part == "latency":
        lines = [f"| net | standard ms | MC-{mc} ms (ddtool: stacked) | MC-{mc} ms (one by one) | distilled ms | "
                 f"MC-{mc} / distilled |", "|---|---|---|---|---|---|"]
        for n, r in results.items():
            ratio = [m / dd for m, dd in zip(r["mc_ms"], r["distilled_ms"])]
            naive = [m / dd for m, dd in zip(r["mc_naive_ms"], r["distilled_ms"])]
            lines.append(f"| {n} | {fmt(r['standard_ms'], '.3f')} | {fmt(r['mc_ms'])} | {fmt(r['mc_naive_ms'])} | "
                         f"{fmt(r['distilled_ms'], '.3f')} | {fmt(ratio, '.0f')}x stacked, {fmt(naive, '.0f')}x one by one |")
        return "\n".join(lines)
    lines = [f"| row | standard % | MC-{mc} % | distilled % | gap recovered % | distill s/run |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        gap = r["gap_recovered"]
        lines.append(f"| {name} | {fmt(r['standard'])} | {fmt(r['mc'])} | {fmt(r['distilled'])} | "
                     f"{'no clear gap' if gap is None else f'{gap:.0f}'} | {fmt(r['seconds'], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(PARTS), action="append", help="run only these parts")
    ap.add_argument("--nets", nargs="+", default=["lenet", "lenet_all", "quick"], choices=sorted(NETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--test", type=int, default=2000, help="test images evaluated (the first N of the 10k)")
    ap.add_argument("--mc", type=int, default=100, help="MC dropout samples")
    ap.add_argument("--s-size", type=int, default=10000, help="inputs in the distillation set S")
    ap.add_argument("--epochs", type=int, default=15, help="distillation epochs (rate cut tenfold after 2/3)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--k", type=int, default=4, help="teacher samples per target")
    ap.add_argument("--perturb", type=float, default=0.2)
    ap.add_argument("--teacher-train", type=int, default=20000, help="training images of the LeNet teachers")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--try", dest="tries", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                    help=f"a variant of the Quick row for the tried part (repeatable); keys: {', '.join(TRY_KEYS)}")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    ap.add_argument("--compress-seeds", type=int, default=2)
    ap.add_argument("--tag", default="", help="write paper_table_<part>_<tag>.json, keeping earlier results of the part")
    args = ap.parse_args()
    args.tries = args.tries or ["k=1", "epochs=30"]
    d = data(args)
    for part in args.only or list(PARTS):
        start = time.perf_counter()
        results = PARTS[part](d, args)
        doc = {"command": " ".join(["benchmarks/paper_table.py", *sys.argv[1:]]), "args": vars(args),
               "wall_s": time.perf_counter() - start, "results": results}
        print(save(f"paper_table_{part}" + (f"_{args.tag}" if args.tag else ""), doc))
        print(summary(part, results, args.mc), flush=True)


if __name__ == "__main__":
    main()
