"""What each command does, as one Python call from files and folders to results.

The stage functions (``load_model``, ``find_dropout``, ``read_folder``, ``distill``, ``evaluate``,
``export``) work on modules and tensors. The calls here chain them the way the ``ddtool``
commands do, so that a script gets exactly what the command line gets:

    inspect_checkpoint   a checkpoint -> its format and dropout sites        (ddtool inspect)
    distill_to_folder    a checkpoint and a folder of inputs -> a bundle,
                         its history and verified exports, in one folder    (ddtool distill)
    evaluate_folder      a checkpoint, distilled bundles and a folder -> the
                         standard / MC / distilled comparison               (ddtool evaluate)

Every output is checked before any work starts (an existing file without ``force``, an
interrupted run without ``resume``), so a run that would fail to write fails first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import parallel
from .checkpoint import BUNDLE_NAME, LoadedModel, load_model, save_bundle
from .compress import shrunk_student, student_from_arch
from .data import Preprocess, example_input, input_spec, open_distill_data, read_folder, resolve_preprocess
from .distillation import DistillConfig, distill, resolve_device
from .dropout import DropoutSite, find_dropout, require_dropout
from .errors import NoDropoutError, OutputError, UsageError
from .evaluation import EvalReport, evaluate, plot
from .exporting import SUFFIXES, ExportResult, export_loaded
from .files import check_output, write_text
from .model import count_parameters
from .parallel import World

#: The resumable state of an interrupted run, in the output folder.
RESUME_NAME = "resume.pt"
HISTORY_NAME = "history.json"

PathLike = str | os.PathLike


def _preprocess(loaded: LoadedModel, recorded: dict | None = None, **overrides) -> Preprocess:
    """The preprocessing: ``overrides`` (channels, size, mean, std), else what the checkpoint
    (or ``recorded``) records, else the defaults of :func:`ddtool.data.resolve_preprocess`."""
    return resolve_preprocess(loaded.model, recorded or loaded.preprocess, overrides.get("channels"),
                              overrides.get("size"), overrides.get("mean"), overrides.get("std"))


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

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "format": self.format, "arch": self.arch, "parameters": self.parameters,
                "ran_model": self.ran_model, "dropout": [s.as_dict() for s in self.sites]}

    def require_dropout(self) -> None:
        """Raise :class:`NoDropoutError` when the model has no active dropout."""
        if self.no_dropout:
            raise NoDropoutError(self.no_dropout)


def inspect_checkpoint(checkpoint: PathLike, arch: str | None = None, arch_args: dict | None = None, *,
                       input_shape: tuple[int, ...] | None = None, data: PathLike | None = None,
                       sample_drop_path: bool = False, trust: bool = False, **preprocess) -> Inspection:
    """Load ``checkpoint`` and find its dropout sites, running the model once on the first two
    inputs of ``data``, a seeded input of ``input_shape`` (without the batch), or the input the
    format provides (bundles, transformers folders, .pt2 programs), in that order of preference."""
    loaded = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust)
    pre = _preprocess(loaded, **preprocess)
    if data is not None:
        example = pre.prepare(read_folder(data, pre, labelled=False, limit=2).x)
    else:
        example = example_input(tuple(input_shape)) if input_shape else loaded.example
    sites = find_dropout(loaded.model, example, sample_drop_path)
    try:
        require_dropout(loaded.model, example, sample_drop_path)
        why = None
    except NoDropoutError as err:
        why = str(err)
    return Inspection(str(checkpoint), loaded.format, loaded.arch, count_parameters(loaded.model), sites,
                      example is not None, not isinstance(loaded.model, torch.jit.ScriptModule), why)


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

    def as_dict(self) -> dict:
        return {"bundle": self.bundle, "inputs": self.inputs, "held_out": self.held_out, "skipped": self.skipped,
                "best_epoch": self.best_epoch, "shared_prefix": self.shared_prefix, **self.compression,
                "history": self.history, "exports": [e.as_dict() for e in self.exports]}


def _outputs(out: Path, formats, resume: bool, force: bool) -> dict[str, Any]:
    """Every path the run will write, checked now: bundle, history, exports, resumable state."""
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


def distill_to_folder(
    checkpoint: PathLike, data: PathLike, out: PathLike, config: DistillConfig | None = None, *,
    arch: str | None = None, arch_args: dict | None = None,
    student_arch: str | None = None, student_arch_args: dict | None = None, shrink: dict[str, float] | None = None,
    classes: list[str] | None = None, export: list[str] = (), cache_mb: float = 1024, workers: int | None = None,
    resume: bool = False, trust: bool = False, force: bool = False,
    progress: Callable[[dict], None] | None = None, world: World | None = None, **preprocess,
) -> FolderResult | None:
    """Distill ``checkpoint`` on the inputs of the folder ``data`` into ``out``: what ``ddtool distill`` does.

    ``out`` receives the bundle (``model.pt``: weights, architecture, preprocessing, class names,
    provenance), ``history.json``, the ``export`` formats (each verified against PyTorch) and,
    while running, ``resume.pt`` (continued with ``resume=True``). The student is a copy of the
    teacher, ``shrink`` ({layer: fraction kept}) of it, or ``student_arch``. ``preprocess``
    holds channels, size (H, W), mean and std overrides. Under torchrun (``world``, read from the
    environment by default) every rank calls this; rank 0 writes, reports ``progress`` and gets
    the result, the others get None.
    """
    config, out, world = config or DistillConfig(), Path(out), world or parallel.from_environment()
    paths = _outputs(out, export, resume, force)
    if student_arch and shrink:
        raise UsageError("--student-arch and --shrink are two ways to a smaller student: choose one")
    loaded = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust)
    pre = _preprocess(loaded, **preprocess)
    pin = resolve_device(config.device).type == "cuda"
    train, val = open_distill_data(data, pre, config.val_fraction, config.seed, cache_mb, workers, pin_memory=pin)
    student, arch_ref, compression = _student(loaded, student_arch, student_arch_args, shrink)
    result = distill(loaded.model, train, pre, config, progress if world.main else None, val=val, student=student,
                     checkpoint=paths["resume"], resume=resume, teacher_sha256=loaded.sha256, world=world)
    if not world.main:
        return None  # rank 0 writes the results
    held_out = 0 if val is None else len(val)
    provenance = {"teacher": Path(checkpoint).name, "teacher_sha256": loaded.sha256, "teacher_format": loaded.format,
                  "inputs": len(train), "held_out": held_out, "settings": config.as_dict(),
                  "best_epoch": result.best_epoch, **compression}
    save_bundle(paths["bundle"], result.student, arch_ref=arch_ref, preprocess=pre.as_dict(), classes=classes,
                input_spec=input_spec(pre, next(train.batches(torch.arange(1), 1))), provenance=provenance, force=force)
    write_text(paths["history"], json.dumps(result.history, indent=2) + "\n", force=force)
    bundle = load_model(paths["bundle"], trust=trust) if export else None  # what is exported is what was saved
    exports = [export_loaded(bundle, path, fmt, force=force, select=config.output)
               for fmt, path in zip(export, paths["exports"])]
    return FolderResult(str(paths["bundle"]), len(train), held_out, train.skipped, result.best_epoch,
                        result.shared_prefix, result.history, compression, exports)


# --------------------------------------------------------------------------- evaluate
def evaluate_folder(
    checkpoint: PathLike, data: PathLike, distilled: list[PathLike] = (), *,
    arch: str | None = None, arch_args: dict | None = None, mc_samples: int = 100, repeats: int = 1,
    batch_size: int = 256, timing: bool = True, seed: int = 0, select: str | int | None = None,
    sample_drop_path: bool = False, trust: bool = False, plot_to: PathLike | None = None, force: bool = False,
    class_dim: int | None = None, **preprocess,
) -> EvalReport:
    """Compare the checkpoint's standard and MC dropout with each ``distilled`` model on the
    folder ``data``: what ``ddtool evaluate`` does. A distilled model is named after its folder;
    the preprocessing and the class axis are the ones the distilled bundles recorded
    (``preprocess`` and ``class_dim`` override them). ``plot_to`` also writes the PNG of
    :func:`ddtool.evaluation.plot`."""
    if mc_samples < 1 or batch_size < 1 or repeats < 1:
        raise UsageError("--mc-samples, --batch-size and --repeats must be at least 1")
    if plot_to is not None:
        check_output(plot_to, force)
    teacher = load_model(checkpoint, arch=arch, arch_args=arch_args, trust=trust)
    students: dict[str, LoadedModel] = {}
    for path in map(Path, distilled):
        name = path.parent.name if path.name == BUNDLE_NAME else path.name
        students[name if name not in students else str(path)] = load_model(path, arch=arch, arch_args=arch_args, trust=trust)
    recorded = next((s.preprocess for s in students.values() if s.preprocess), None)
    pre = _preprocess(teacher, recorded, **preprocess)
    if class_dim is None:
        settings = [(s.provenance or {}).get("settings") or {} for s in students.values()]
        class_dim = next((d["class_dim"] for d in settings if "class_dim" in d), 1)
    report = evaluate(teacher.model, read_folder(data, pre), pre, {k: v.model for k, v in students.items()},
                      mc_samples=mc_samples, batch_size=batch_size, seed=seed, select=select,
                      sample_drop_path=sample_drop_path, repeats=repeats, timing=timing, class_dim=class_dim)
    if plot_to is not None:
        plot(report, plot_to, force=force)
    return report
