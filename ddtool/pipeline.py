"""What each command does, as one Python call from files and folders to results.

The stage functions (``load_model``, ``find_dropout``, ``read_folder``, ``distill``, ``evaluate``,
``export``) work on modules and tensors. The calls here chain them the way the ``ddtool``
commands do, so that a script gets exactly what the command line gets:

    inspect_checkpoint   a checkpoint -> its format and dropout sites        (ddtool inspect)
    distill_to_folder    a checkpoint and a folder of inputs -> a bundle,
                         its history and verified exports, in one folder    (ddtool distill)
    evaluate_folder      a checkpoint, distilled bundles and a folder -> the
                         standard / MC / distilled comparison               (ddtool evaluate)
    export_checkpoint    a checkpoint -> a verified ONNX / TorchScript / .pt2 (ddtool export)
    predict_folder       a model and a folder -> top-k classes per input    (ddtool predict)

Every call declares what it reads (the checkpoint or bundle, the data folder, an ``--arch`` file,
a class-names file) before it writes anything, and no output may resolve to one of those inputs,
whatever ``force`` says (:func:`ddtool.files.protect_inputs`). Every output is checked before any
work starts (an existing file without ``force``, an interrupted run without ``resume``), so a run
that would fail to write fails first. ``distill_to_folder`` holds a lock on its folder for the
whole run, so a second run on the same folder refuses at once, and writes the bundle, the
history and every export together or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import parallel
from .checkpoint import BUNDLE_NAME, LoadedModel, load_model, save_bundle
from .compress import shrunk_student, student_from_arch
from .data import Preprocess, UnlabelledSet, example_input, input_spec, open_distill_data, read_folder, resolve_preprocess
from .distillation import DistillConfig, DistillResult, distill, resolve_device
from .dropout import DropoutSite, find_dropout, require_dropout
from .errors import DataError, NoDropoutError, OutputError, UsageError
from .evaluation import Check, EvalReport, check_labels, check_student, evaluate, plot
from .exporting import SUFFIXES, ExportResult, export_loaded
from .files import Outputs, check_output, check_output_folder, folder_lock, json_safe, protected_inputs
from .limits import check_distill, check_forward, require
from .mihead import head_field, with_mi
from .model import clone_model, count_parameters, probe
from .outputs import check_class_dim, check_classes
from .parallel import World
from .predict import load_predictor, parse_classes, predict, write_predictions
from .text import trim

#: The resumable state of an interrupted run, in the output folder.
RESUME_NAME = "resume.pt"
HISTORY_NAME = "history.json"

PathLike = str | os.PathLike


def _preprocess(loaded: LoadedModel, recorded: dict | None = None, **overrides) -> Preprocess:
    """The preprocessing: ``overrides`` (channels, size, mean, std; max_length for text), else
    what the checkpoint (or ``recorded``) records, else the defaults of
    :func:`ddtool.data.resolve_preprocess`."""
    pre = resolve_preprocess(loaded.model, recorded or loaded.preprocess, overrides.get("channels"),
                             overrides.get("size"), overrides.get("mean"), overrides.get("std"))
    return pre.with_max_length(overrides.get("max_length"))


def _text_config(loaded: LoadedModel, config: DistillConfig) -> DistillConfig:
    """A transformers model returns the output it was loaded with (``--output`` was applied
    when loading it); an embedding is distilled with MSE (see :mod:`ddtool.hf`)."""
    kind = getattr(loaded.model, "kind", None)
    if (loaded.arch_ref or {}).get("kind") != "hf" or kind is None:
        return config
    loss = config.loss if kind == "logits" else "mse"
    if loss != config.loss:
        print(f"note: the model's output is an embedding ({kind}): distilled with MSE, not {config.loss}",
              file=sys.stderr)
    return dataclasses.replace(config, output=None, loss=loss, class_dim=-1 if kind == "tokens" else config.class_dim)


# --------------------------------------------------------------------------- inputs
def _model_file(path: PathLike | None) -> Path | None:
    """What a model argument reads: a distill --out folder's bundle file (other files may be
    written beside it, such as an evaluation plot), else the path itself (a file, or a whole
    transformers folder)."""
    if path is None:
        return None
    path = Path(path)
    return path / BUNDLE_NAME if (path / BUNDLE_NAME).is_file() else path


def _arch_file(spec: str | None) -> Path | None:
    """The file an ``--arch file.py:factory`` names (an input like any other), if it is one."""
    target = (spec or "").rpartition(":")[0]
    return Path(target) if target.endswith(".py") or "/" in target else None


def _class_names(classes: list[str] | str | None) -> tuple[list[str] | None, Path | None]:
    """Class names given as a list, or as ``--classes`` text (comma-separated names, or a file of
    one name per line), and the file they were read from (an input), if any."""
    if classes is None or isinstance(classes, (list, tuple)):
        return (list(classes) if classes else None), None
    path = Path(classes)
    return parse_classes(classes), path if path.is_file() else None


def _unused(entries) -> list[dict]:
    return [u.as_dict() for u in entries]


# --------------------------------------------------------------------------- inspect
@dataclass
class Inspection:
    """A checkpoint's format, architecture, size and dropout sites."""

    checkpoint: str
    format: str
    arch: str
    parameters: int
    sites: list[DropoutSite]
    ran_model: bool  # whether the model ran on an input (functional sites and call counts need it)
    traceable: bool  # False for TorchScript, which is not traced from Python
    no_dropout: str | None = None  # why nothing would be sampled, if so
    unused: list[dict] = field(default_factory=list)  # entries of --data not used, with the reason
    reading: str = ""  # how the --data files were read
    output: str = ""  # what the model's output is (transformers: logits, an embedding, ...)

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "format": self.format, "arch": self.arch, "parameters": self.parameters,
                "ran_model": self.ran_model, "dropout": [s.as_dict() for s in self.sites], "unused": self.unused,
                "reading": self.reading, "output": self.output}

    def require_dropout(self) -> None:
        """Raise :class:`NoDropoutError` when the model has no active dropout."""
        if self.no_dropout:
            raise NoDropoutError(self.no_dropout)


def inspect_checkpoint(checkpoint: PathLike, arch: str | None = None, arch_args: dict | None = None, *,
                       input_shape: tuple[int, ...] | None = None, data: PathLike | None = None,
                       sample_drop_path: bool = False, trust: bool = False, follow_outside: bool = False,
                       output: str | None = None, **preprocess) -> Inspection:
    """Load ``checkpoint`` and find its dropout sites, running the model once on the first two
    inputs of ``data``, a seeded input of ``input_shape`` (without the batch), or the input the
    format provides (bundles, transformers folders, .pt2 programs), in that order of preference.
    ``follow_outside`` follows symlinks in ``data`` that lead outside it; ``output`` chooses the
    output of a transformers folder (see :mod:`ddtool.hf`)."""
    reading = ""
    with protected_inputs(_model_file(checkpoint), data, _arch_file(arch)):
        loaded = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust, output=output)
        pre = _preprocess(loaded, **preprocess)
        unused = []
        if data is not None:
            inputs = read_folder(data, pre, labelled=False, limit=2, follow_outside=follow_outside)
            example, unused, reading = pre.prepare(inputs.x), _unused(inputs.unused), inputs.reading
        else:
            example = example_input(tuple(input_shape)) if input_shape else loaded.example
    sites = find_dropout(loaded.model, example, sample_drop_path)
    try:
        require_dropout(loaded.model, example, sample_drop_path)
        why = None
    except NoDropoutError as err:
        why = str(err)
    return Inspection(str(checkpoint), loaded.format, loaded.arch, count_parameters(loaded.model), sites,
                      example is not None, not isinstance(loaded.model, torch.jit.ScriptModule), why, unused, reading,
                      _output_of(loaded))


def _output_of(loaded: LoadedModel) -> str:
    """What a transformers model's output is, in words ("" for other formats)."""
    model, ref = loaded.model, loaded.arch_ref or {}
    kind = getattr(model, "kind", None)
    if ref.get("kind") != "hf" or kind is None:
        return ""
    if ref.get("pooling"):
        return f"sentence embedding: {'+'.join(ref['pooling'])} pooling{', normalized' if ref.get('normalize') else ''}"
    return "logits" if kind == "logits" else f"{ref.get('output')} ({kind})"


# --------------------------------------------------------------------------- distill
@dataclass
class FolderResult:
    """What :func:`distill_to_folder` wrote and how the run went."""

    bundle: str
    inputs: int  # inputs distilled on
    held_out: int  # inputs held out for fidelity
    skipped: int  # unreadable files skipped
    best_epoch: int | None  # with early stopping: the epoch whose weights were kept
    shared_prefix: bool  # whether the teacher's deterministic prefix ran once for all K samples
    history: list[dict] = field(default_factory=list)
    compression: dict = field(default_factory=dict)  # parameters of teacher and student, if smaller
    exports: list[ExportResult] = field(default_factory=list)
    unused: list[dict] = field(default_factory=list)  # entries of the data folder not used, with the reason
    notes: list[dict] = field(default_factory=list)  # inputs used only in part (an animation's first frame)
    reading: str = ""  # how the data files were read
    lr: float | None = None  # the base rate used (--lr, or --lr-find's choice)
    lr_search: list[dict] = field(default_factory=list)  # with --lr-find: each rate tried and its probe fidelity
    mi_head: dict | None = None  # with --mi-head: how the head fits (ddtool.mihead.HeadFit.as_dict)
    check: Check | None = None  # with --check: both errors on the labelled folder and which model was kept

    def as_dict(self) -> dict:
        return {"bundle": self.bundle, "inputs": self.inputs, "held_out": self.held_out, "skipped": self.skipped,
                "best_epoch": self.best_epoch, "shared_prefix": self.shared_prefix, **self.compression,
                "history": self.history, "exports": [e.as_dict() for e in self.exports], "unused": self.unused,
                "notes": self.notes, "reading": self.reading, "lr": self.lr, "lr_search": self.lr_search,
                "check": None if self.check is None else self.check.as_dict(),
                **({"mi_head": self.mi_head} if self.mi_head else {})}


def _outputs(out: Path, formats, resume: bool, force: bool) -> dict[str, Any]:
    """Every path the run will write, checked now: bundle, history, exports, resumable state."""
    check_output_folder(out)  # not an input, not inside one, holding none
    paths = {"bundle": check_output(out / BUNDLE_NAME, force), "history": check_output(out / HISTORY_NAME, force),
             "exports": [check_output(out / f"model{SUFFIXES[f]}", force) for f in formats], "resume": out / RESUME_NAME}
    if paths["resume"].exists() and not (resume or force):
        raise OutputError(f"{paths['resume']} holds an interrupted run: pass --resume to continue it or --force to start over")
    return paths


def _student(loaded: LoadedModel, student_arch: str | None, student_arch_args, shrink) -> tuple[nn.Module | None, dict, dict]:
    """The student (None: a copy of the teacher), its architecture reference, and its size."""
    if shrink:
        student, ref = shrunk_student(loaded.model, loaded.arch_ref, shrink)
        compression = {}
    elif student_arch:
        student, ref, copied = student_from_arch(loaded.model, student_arch, student_arch_args)
        compression = {"tensors_from_teacher": copied}
    else:
        return None, loaded.arch_ref, {}
    compression.update(teacher_parameters=count_parameters(loaded.model), student_parameters=count_parameters(student))
    return student, ref, compression


def _check_run(loaded: LoadedModel, student, train: UnlabelledSet, pre: Preprocess, config: DistillConfig,
               world: World, classes: list[str] | None) -> None:
    """What can be refused before the first step: a teacher batch or a student that cannot fit in
    memory, a class axis the output does not have, class names that do not name every output."""
    example = pre.prepare(train.sample(2))
    check_distill(loaded.model, student or loaded.model, example, min(parallel.local_batch(world, config.batch_size),
                  len(train)), config.teacher_samples, resolve_device(config.device))
    if config.loss == "kl" or classes:
        out = probe(loaded.model, example, config.output)
        check_class_dim(out, config.class_dim)
        check_classes(classes, out.shape[config.class_dim])


def _open_check(check: PathLike | None, loaded: LoadedModel, pre: Preprocess, config: DistillConfig,
                classes: list[str] | None, compression: dict, follow_outside: bool):
    """The inputs of the labelled folder ``check`` and their labels as the teacher's classes, read
    and matched before any distillation (see :func:`ddtool.evaluation.check_labels`); None
    without one. A smaller student, a loss other than KL, or an MI head, is refused."""
    if check is None:
        return None
    if compression:
        raise UsageError("--check falls back to the teacher's own weights, which a smaller student (--shrink, "
                         "--student-arch) cannot hold: distill without --check and compare with ddtool evaluate")
    if config.loss != "kl":
        raise UsageError("--check compares classification errors: it needs --loss kl (a classifier)")
    if config.mi_head:
        raise UsageError("--check with --mi-head: the head is fitted to the distilled student's features, which a "
                         "fallback to the teacher's own weights would not keep; use one of the two")
    inputs = read_folder(check, pre, labelled=True, follow_outside=follow_outside)
    return inputs, check_labels(loaded.model, inputs, pre, config.output, config.class_dim, classes)


def _checked(loaded: LoadedModel, result: DistillResult, labelled, pre: Preprocess, config: DistillConfig) -> Check | None:
    """With ``--check``: both errors on the check folder (``labelled``: its inputs and labels);
    where the student errs more than standard dropout, ``result.student`` becomes a copy of the
    teacher's own weights (the student was a copy of the teacher: its architecture holds them)."""
    if labelled is None:
        return None
    inputs, labels = labelled
    found = check_student(loaded.model, result.student, pre.prepare(inputs.x), labels, select=config.output,
                          class_dim=config.class_dim)
    if found.kept == "standard":
        result.student = clone_model(loaded.model).eval()
    return found


def _fingerprint(arch_ref: dict, pre: Preprocess) -> dict:
    """What, besides the teacher and the inputs, makes a resumed run the same run: the student's
    architecture (its reference without archive bytes or absolute paths) and the preprocessing."""
    def strip(r):
        if isinstance(r, dict):
            return {k: strip(v) for k, v in r.items() if k not in ("archive", "abs")}
        return r if isinstance(r, (str, int, float, bool, type(None), list)) else str(type(r))
    return {"architecture": json.dumps(strip(arch_ref), sort_keys=True, default=str),
            "preprocessing": json.dumps(pre.as_dict(), sort_keys=True)}


def _write_results(paths: dict, result: DistillResult, bundle: dict, formats, reload: dict, select,
                   force: bool) -> list[ExportResult]:
    """The bundle (``bundle``: the fields of :func:`ddtool.checkpoint.save_bundle`), the history
    and every export, all or nothing; then the resumable state, which is no longer needed. The
    exports are made from the bundle as saved (reloaded with ``reload``): what is exported is
    what was saved."""
    with Outputs(force) as outputs:
        save_bundle(paths["bundle"], result.student, outputs=outputs, **bundle)
        outputs.write(paths["history"], (json.dumps(json_safe(result.history), indent=2) + "\n").encode())
        saved = load_model(outputs.path(paths["bundle"]), **reload) if formats else None
        exports = [export_loaded(saved, path, fmt, select=select, outputs=outputs)
                   for fmt, path in zip(formats, paths["exports"])]
    paths["resume"].unlink(missing_ok=True)  # the results are in place: nothing left to resume
    return exports


def _bundle(checkpoint, loaded: LoadedModel, result: DistillResult, config: DistillConfig, pre: Preprocess, train,
            held_out: int, arch_ref: dict, names, compression: dict, checked: Check | None) -> dict:
    """The bundle's fields besides the weights: architecture, preprocessing, classes, provenance."""
    provenance = {"teacher": Path(checkpoint).name, "teacher_sha256": loaded.sha256,
                  "teacher_format": loaded.format, "inputs": len(train), "held_out": held_out,
                  "settings": config.as_dict(), "best_epoch": result.best_epoch, "lr": result.lr,
                  "lr_search": result.lr_search, **compression,
                  **({"check": checked.as_dict()} if checked else {})}
    return {"arch_ref": arch_ref, "preprocess": pre.as_dict(), "classes": names, "provenance": provenance,
            "input_spec": input_spec(pre, train.sample(1)),
            "mi_head": head_field(result.mi_head, config.output) if result.mi_head else None}


def distill_to_folder(
    checkpoint: PathLike, data: PathLike, out: PathLike, config: DistillConfig | None = None, *,
    arch: str | None = None, arch_args: dict | None = None,
    student_arch: str | None = None, student_arch_args: dict | None = None, shrink: dict[str, float] | None = None,
    classes: list[str] | str | None = None, export: list[str] = (), cache_mb: float = 1024, workers: int | None = None,
    resume: bool = False, trust: bool = False, force: bool = False, follow_outside: bool = False,
    progress: Callable[[dict], None] | None = None, world: World | None = None, check: PathLike | None = None,
    **preprocess,
) -> FolderResult | None:
    """Distill ``checkpoint`` on the inputs of the folder ``data`` into ``out``: what ``ddtool distill`` does.

    ``out`` receives the bundle (``model.pt``: weights, architecture, preprocessing, class names,
    provenance, and a code-free program of the student), ``history.json``, the ``export`` formats
    (each verified against PyTorch) and, while running, ``resume.pt`` (continued with
    ``resume=True``; it stays until the results are in place). The student is a copy of the
    teacher, ``shrink`` ({layer: fraction kept}) of it, or ``student_arch``. ``check``, a labelled
    folder, is read before distilling and measured after it: where the student errs more there
    than standard dropout, the bundle holds the teacher's own weights instead (see
    :func:`ddtool.evaluation.check_student`; not with a smaller student). ``classes`` are
    names or ``--classes`` text; ``preprocess`` holds channels, size (H, W), mean and std
    overrides. Under torchrun (``world``, read from the environment by default) every rank
    calls this; rank 0 locks ``out``, writes, reports ``progress`` and gets the result, the
    others get None.
    """
    config, out, world = config or DistillConfig(), Path(out), world or parallel.from_environment()
    names, names_file = _class_names(classes)
    with protected_inputs(_model_file(checkpoint), data, _arch_file(arch), _arch_file(student_arch), names_file,
                          *([check] if check is not None else [])):
        paths = _outputs(out, export, resume, force)
        if student_arch and shrink:
            raise UsageError("--student-arch and --shrink are two ways to a smaller student: choose one")
        with folder_lock(out) if world.main else contextlib.nullcontext():  # a second run on ``out`` refuses here
            loaded = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust, output=config.output)
            config = _text_config(loaded, config)
            pre = _preprocess(loaded, **preprocess)
            train, val = open_distill_data(data, pre, config.val_fraction, config.seed, cache_mb, workers,
                                           pin_memory=resolve_device(config.device).type == "cuda",
                                           follow_outside=follow_outside)
            student, arch_ref, compression = _student(loaded, student_arch, student_arch_args, shrink)
            _check_run(loaded, student, train, pre, config, world, names)
            labelled = _open_check(check, loaded, pre, config, names, compression, follow_outside)
            result = distill(loaded.model, train, pre, config, progress if world.main else None, val=val,
                             student=student, checkpoint=paths["resume"], resume=resume, teacher_sha256=loaded.sha256,
                             world=world, fingerprint=_fingerprint(arch_ref, pre), keep_checkpoint=True)
            if not world.main:
                return None  # rank 0 writes the results
            checked = _checked(loaded, result, labelled, pre, config)
            held_out = 0 if val is None else len(val)
            bundle = _bundle(checkpoint, loaded, result, config, pre, train, held_out, arch_ref, names, compression, checked)
            exports = _write_results(paths, result, bundle, export, {"arch": student_arch or arch, "trust": trust},
                                     config.output, force)
    return FolderResult(str(paths["bundle"]), len(train), held_out, train.skipped, result.best_epoch,
                        result.shared_prefix, result.history, compression, exports, _unused(train.unused),
                        _unused(train.notes), train.reading, result.lr, result.lr_search,
                        result.mi_head.as_dict() if result.mi_head else None, checked)


# --------------------------------------------------------------------------- evaluate
def _model_classes(given: list[str] | None, models: list[LoadedModel]) -> list[str] | None:
    """The class names the models answer in: ``given``, else those the bundles record (which
    must agree with each other)."""
    recorded = {tuple(m.classes) for m in models if m.classes}
    if given:
        return given
    if len(recorded) > 1:
        raise DataError("the models record different class names; pass --classes to say which are right")
    return list(next(iter(recorded))) if recorded else None


def evaluate_folder(
    checkpoint: PathLike, data: PathLike, distilled: list[PathLike] = (), *,
    arch: str | None = None, arch_args: dict | None = None, mc_samples: int = 100, repeats: int = 1,
    batch_size: int = 256, timing: bool = True, seed: int = 0, select: str | int | None = None,
    sample_drop_path: bool = False, trust: bool = False, plot_to: PathLike | None = None, force: bool = False,
    class_dim: int | None = None, classes: list[str] | str | None = None, follow_outside: bool = False,
    ood: PathLike | None = None, **preprocess,
) -> EvalReport:
    """Compare the checkpoint's standard and MC dropout with each ``distilled`` model on the
    folder ``data``: what ``ddtool evaluate`` does. A distilled model is named after its folder;
    the preprocessing, the class axis and the class names are the ones the distilled bundles
    recorded (``preprocess``, ``class_dim`` and ``classes`` override them). Class subfolders of
    ``data`` are matched to the class names by name. ``plot_to`` also writes the PNG of
    :func:`ddtool.evaluation.plot`. ``ood``, a folder of inputs from another distribution, adds
    the OOD-detection AUROC of each method."""
    if mc_samples < 1 or batch_size < 1 or repeats < 1:
        raise UsageError("--mc-samples, --batch-size and --repeats must be at least 1")
    names, names_file = _class_names(classes)
    with protected_inputs(_model_file(checkpoint), data, *map(_model_file, distilled), _arch_file(arch), names_file,
                          *([ood] if ood is not None else [])):
        if plot_to is not None:
            check_output(plot_to, force)
        teacher = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust, output=select)
        kind = getattr(teacher.model, "kind", None) if (teacher.arch_ref or {}).get("kind") == "hf" else None
        if kind is not None:  # a transformers model returns the output it was loaded with
            select, class_dim = None, (-1 if kind == "tokens" else class_dim)
        students: dict[str, LoadedModel] = {}
        for path in map(Path, distilled):
            name = path.parent.name if path.name == BUNDLE_NAME else path.name
            students[name if name not in students else str(path)] = load_model(path, arch=arch, arch_args=arch_args,
                                                                               trust=trust)
        names = _model_classes(names, [teacher, *students.values()])
        recorded = next((s.preprocess for s in students.values() if s.preprocess), None)
        pre = _preprocess(teacher, recorded, **preprocess)
        if class_dim is None:
            settings = [(s.provenance or {}).get("settings") or {} for s in students.values()]
            class_dim = next((d["class_dim"] for d in settings if "class_dim" in d), 1)
        report = evaluate(teacher.model, read_folder(data, pre, follow_outside=follow_outside), pre,
                          {k: v.model for k, v in students.items()}, mc_samples=mc_samples, batch_size=batch_size,
                          seed=seed, select=select, sample_drop_path=sample_drop_path, repeats=repeats, timing=timing,
                          class_dim=class_dim, classes=names, regression=kind not in (None, "logits"),
                          ood=None if ood is None else read_folder(ood, pre, labelled=False, follow_outside=follow_outside),
                          mi_heads={k: with_mi(v.model, v.mi_head, select) for k, v in students.items() if v.mi_head})
        if plot_to is not None:
            plot(report, plot_to, force=force)
    return report


# --------------------------------------------------------------------------- export
def export_checkpoint(
    checkpoint: PathLike, out: PathLike, format: str = "onnx", *, arch: str | None = None,
    arch_args: dict | None = None, input_shape: tuple[int, ...] | None = None, classes: list[str] | str | None = None,
    trust: bool = False, force: bool = False, **options,
) -> ExportResult:
    """Export the model of ``checkpoint`` (a bundle or distill folder, or any checkpoint ddtool
    reads) to ``out`` and verify it: what ``ddtool export`` does. The input shape and the
    metadata (preprocessing, class names, provenance) come from what the checkpoint records;
    ``options`` are those of :func:`ddtool.exporting.export` (atol, opset, external_data, script,
    probabilities, select)."""
    names, names_file = _class_names(classes)
    with protected_inputs(_model_file(checkpoint), _arch_file(arch), names_file):
        check_output(out, force)
        loaded = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust)
        return export_loaded(loaded, out, format, input_shape=input_shape, classes=names, force=force, **options)


# --------------------------------------------------------------------------- predict
@dataclass
class Predictions:
    """What :func:`predict_folder` predicted, with what and where it wrote them."""

    runtime: str  # "onnxruntime" or "pytorch"
    rows: list[dict]  # per input: its file and its top-k (class, index, probability)
    path: str | None = None  # the file the predictions were written to, if any
    unused: list[dict] = field(default_factory=list)  # entries of the folder not used, with the reason
    notes: list[dict] = field(default_factory=list)  # inputs used only in part

    def as_dict(self) -> dict:
        where = {"predictions": self.path, "inputs": len(self.rows)} if self.path else {"predictions": self.rows}
        return {"runtime": self.runtime, **where, "unused": self.unused, "notes": self.notes}


def predict_folder(
    model: PathLike, data: PathLike, out: PathLike | None = None, *, top_k: int = 5, batch_size: int = 256,
    arch: str | None = None, arch_args: dict | None = None, classes: list[str] | str | None = None,
    select: str | int | None = None, trust: bool = False, follow_outside: bool = False, force: bool = False,
    **preprocess,
) -> Predictions:
    """The top-k classes of every input of the folder ``data`` by ``model`` (an ONNX file run in
    onnxruntime, an archive, or any checkpoint), with the model's own preprocessing: what
    ``ddtool predict`` does. ``out`` (a .csv or .json file) also receives them."""
    names, names_file = _class_names(classes)
    with protected_inputs(_model_file(model), data, _arch_file(arch), names_file):
        if out is not None:
            check_output(out, force)
        predictor = load_predictor(model, arch, arch_args, trust, select, names, **preprocess)
        inputs = read_folder(data, predictor.preprocess, labelled=False, follow_outside=follow_outside)
        batch = min(batch_size, len(inputs))
        require(batch * inputs.x[:1].numel() * 4, f"--batch-size {batch_size} inputs", "lower --batch-size")
        if predictor.model is not None:  # what its widest layer holds for a batch (onnxruntime: not known)
            check_forward(predictor.model, predictor.preprocess.prepare(trim(inputs.x[:1])), batch,
                          f"predicting {batch} inputs at a time", "lower --batch-size (or --size)")
        rows = predict(predictor, inputs, top_k, batch_size)
        if out is not None:
            write_predictions(rows, out, force)
    return Predictions(predictor.runtime, rows, None if out is None else str(out), _unused(inputs.unused),
                       _unused(inputs.notes))
