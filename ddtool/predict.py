"""The serving path: an exported or distilled model over a folder, top-k classes per file.

A model is an ONNX file (run in onnxruntime, as a server would), a TorchScript or torch.export
archive, or any checkpoint ddtool reads (bundles included). The preprocessing and the class
names come from the file itself (ONNX metadata_props, the archive's ddtool.json, or the bundle),
so the predictions are those the model will make in production.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .data import Inputs, Preprocess, resolve_preprocess
from .errors import CheckpointError, DataError, ModelError, UsageError, first_line
from .exporting import read_metadata
from .files import display_path, is_regular_file, write_text
from .mihead import MI_OUTPUT
from .mihead import with_mi as mi_module
from .outputs import check_classes, select_output
from .text import trim


@dataclass
class Predictor:
    """A model ready to serve: ``probs(x)`` maps a prepared batch to class probabilities."""

    probs: Callable[[torch.Tensor], torch.Tensor]
    preprocess: Preprocess
    classes: list[str] | None
    runtime: str  # "onnxruntime" or "pytorch"
    input_spec: dict | None = None
    with_mi: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None  # x -> (probs, MI head's value)
    model: torch.nn.Module | None = None  # the PyTorch model behind ``probs`` (None: onnxruntime)

    @property
    def kind(self) -> str:
        """``logits`` (a classifier: top-k classes), else ``embedding`` or ``tokens`` (the output itself)."""
        return ((self.preprocess.text or {}).get("kind")) or "logits"


def _is_onnx(path: Path) -> bool:
    """ONNX files are protobuf ModelProto messages: field 1 (ir_version, a varint) comes first."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x08"


def load_predictor(
    path: str | os.PathLike, arch: str | None = None, arch_args: dict | None = None, trust: bool = False,
    select=None, classes: list[str] | None = None, **preprocess_overrides,
) -> Predictor:
    """Open ``path`` for prediction; options given here override what the file records."""
    path = Path(path)
    max_length = preprocess_overrides.pop("max_length", None)
    if path.is_file() and _is_onnx(path):
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"onnxruntime could not open {path}: {first_line(err)}") from None
        meta = read_metadata(path)
        names = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        wanted = "probabilities" if "probabilities" in outputs else outputs[0]
        text = (meta.get("ddtool.preprocess") or {}).get("text")
        scores = text is None or text.get("kind", "logits") == "logits"

        def feed(x: torch.Tensor) -> dict:
            if text is None:
                return {names[0]: x.numpy()}
            return {n: x[:, text["names"].index(n)].numpy() for n in names}  # the named inputs, by name

        def probs(x: torch.Tensor) -> torch.Tensor:
            return with_mi(x)[0]

        def with_mi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            got = session.run([wanted, MI_OUTPUT] if MI_OUTPUT in outputs else [wanted], feed(x))
            out = torch.from_numpy(np.asarray(got[0]))
            out = out if wanted == "probabilities" or not scores else F.softmax(out.float(), dim=1)
            return out, torch.from_numpy(np.asarray(got[1])) if len(got) > 1 else None

        channels = (meta.get("ddtool.input") or {}).get("shape", [None])[0]
        pre = resolve_preprocess(torch.nn.Identity(), meta.get("ddtool.preprocess"),
                                 **_with_channels(preprocess_overrides, channels)).with_max_length(max_length)
        return Predictor(probs, pre, classes or meta.get("ddtool.classes"), "onnxruntime", meta.get("ddtool.input"),
                         with_mi if MI_OUTPUT in outputs else None)

    loaded = load_model(path, arch=arch, arch_args=arch_args, trust=trust, output=select)
    if (loaded.arch_ref or {}).get("kind") == "hf":
        select = None  # a transformers model returns the output it was loaded with
    meta = read_metadata(path) if loaded.format in ("torchscript", "torch-export") else {}
    recorded = loaded.preprocess or meta.get("ddtool.preprocess")
    model = loaded.model.eval()

    pre = resolve_preprocess(model, recorded, **preprocess_overrides).with_max_length(max_length)
    scores = (pre.text or {}).get("kind", "logits") == "logits"

    @torch.no_grad()
    def probs(x: torch.Tensor) -> torch.Tensor:
        out = select_output(model(x), select).float()
        return F.softmax(out, dim=1) if scores else out

    names = classes or loaded.classes or meta.get("ddtool.classes")
    return Predictor(probs, pre, names, "pytorch", loaded.input_spec or meta.get("ddtool.input"),
                     _torch_with_mi(loaded, meta, select), model)


def _torch_with_mi(loaded, meta: dict, select) -> Callable | None:
    """x -> (probabilities, MI head's value) for a bundle with an MI head (the head attached to its
    student) or an archive exported from one (the output its ddtool.json names); else None."""
    if loaded.mi_head:
        both = mi_module(loaded.model, loaded.mi_head, select)
    elif meta.get("ddtool.mi_head"):
        model = loaded.model.eval()

        def both(x):  # the archive returns (logits, [probabilities,] mutual_information)
            out = model(x)
            return out[0], out[-1]
    else:
        return None

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, mi = both(x)
        return F.softmax(logits.float(), dim=1), mi.float()
    return run


def _with_channels(overrides: dict, channels) -> dict:
    if overrides.get("channels") is None and channels in (1, 3):
        return {**overrides, "channels": channels}
    return overrides


def predict(predictor: Predictor, inputs: Inputs, top_k: int = 5, batch_size: int = 256) -> list[dict]:
    """One record per input: its file and its top-k (class, index, probability)."""
    if top_k < 1 or batch_size < 1:
        raise UsageError("--top-k and --batch-size must be at least 1")
    rows = []
    for start in range(0, len(inputs), batch_size):
        raw = trim(inputs.x[start:start + batch_size])  # (text: cut to the batch's longest input)
        try:
            x = predictor.preprocess.prepare(raw)
            probs, mi = predictor.with_mi(x) if predictor.with_mi else (predictor.probs(x), None)
        except Exception as err:  # noqa: BLE001 - a model failing on the data is a user error
            raise ModelError(f"the model failed on inputs of shape {tuple(raw.shape)}: "
                             f"{first_line(err)}") from None
        bad = (~torch.isfinite(probs)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ModelError(f"the model gives NaN or infinite outputs for {len(bad)} input(s), e.g. "
                             f"{display_path(inputs.paths[start + bad[0]])}; no predictions written")
        if predictor.kind != "logits":
            rows += _output_rows(probs, raw, inputs.paths[start:start + len(raw)])
            continue
        if start == 0:
            check_classes(predictor.classes, probs.shape[1])
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for i, (vals, idxs) in enumerate(zip(values.tolist(), indices.tolist())):
            top = [{"index": j, "class": _name(predictor.classes, j), "probability": round(v, 6)} for v, j in zip(vals, idxs)]
            rows.append({"file": display_path(inputs.paths[start + i]), "top": top,
                         **({MI_OUTPUT: round(float(mi[i]), 6)} if mi is not None else {})})
    return rows


def _output_rows(out: torch.Tensor, raw: torch.Tensor, paths) -> list[dict]:
    """The output itself per input (an embedding; per token, the real tokens only), for models
    that are not classifiers."""
    rows = []
    for i, path in enumerate(paths):
        value = out[i]
        if value.dim() == 2 and raw.dim() == 3 and raw.shape[1] > 1:
            value = value[: int(raw[i, 1].sum())]
        rows.append({"file": display_path(path), "output": [round(v, 6) for v in value.flatten().tolist()],
                     "shape": list(value.shape)})
    return rows


def _name(classes: list[str] | None, index: int) -> str:
    return classes[index] if classes and index < len(classes) else str(index)


def write_predictions(rows: list[dict], out: str | os.PathLike, force: bool = False) -> Path:
    """Write predictions as CSV (file, then class/probability per rank) or JSON, by suffix."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        text = json.dumps(rows, indent=2, allow_nan=False) + "\n"
    elif out.suffix.lower() == ".csv":
        k = max((len(r.get("top", ())) for r in rows), default=0)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        if rows and "output" in rows[0]:  # an embedding per input: the file, then its values
            for r in rows:
                writer.writerow([r["file"]] + r["output"])
            write_text(out, buffer.getvalue(), force)
            return out
        mi = [MI_OUTPUT] if rows and MI_OUTPUT in rows[0] else []  # a bundle with an MI head: its value last
        writer.writerow(["file"] + [f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability")] + mi)
        for r in rows:
            writer.writerow([r["file"]] + [v for t in r["top"] for v in (t["class"], t["probability"])] + [r[m] for m in mi])
        text = buffer.getvalue()
    else:
        raise UsageError(f"--out {out.name}: predictions are written as .csv or .json")
    write_text(out, text, force)
    return out


def parse_classes(text: str | None) -> list[str] | None:
    """``--classes``: a comma-separated list, or the path of a text file with one name per line."""
    if not text:
        return None
    path = Path(text)
    if is_regular_file(path):
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"--classes file {path} could not be read: {getattr(err, 'strerror', None) or err}") from None
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DataError(f"--classes {text!r} names no classes")
    return names
