"""The ``ddtool`` command line: each command parses its options, calls the API, and prints.

Errors a user can cause arrive as :class:`ddtool.errors.DDToolError` and leave as one line on
stderr and the exit code of their type (see the README's table); ``--debug`` shows the traceback.
Tables and ``--json`` documents go to stdout, progress and warnings to stderr.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .arch import parse_arch_args
from .checkpoint import BUNDLE_NAME
from .compress import parse_shrink
from .distillation import DistillConfig
from .errors import EXIT_INTERRUPTED, DDToolError, UsageError
from .exporting import FORMATS
from .files import json_safe
from .limits import is_out_of_memory, require
from .outputs import parse_select
from .pipeline import distill_to_folder, evaluate_folder, export_checkpoint, inspect_checkpoint, predict_folder
from .version import __version__

_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` as one line without terminal control sequences (colours, cursor moves, newlines)."""
    return " ".join(_CONTROL.sub(" ", str(text)).split())


class PlainErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, a value out of range, a missing argument) as one
    ``error:`` line on stderr with exit code 2, like every other error, instead of a coloured box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as err:  # click's own exceptions (typer vendors click: matched by their methods)
            if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
                raise
            command = getattr(getattr(err, "ctx", None), "command_path", None) or "ddtool"
            print(f"error: {one_line(err.format_message())} (see '{command} --help')", file=sys.stderr)
            if standalone_mode:
                sys.exit(err.exit_code)
            raise
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    help="Distill a network trained with dropout into a deterministic one that predicts like its MC-dropout ensemble.",
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=PlainErrors,
)
# Piped output (CI logs, files) gets wide tables rather than rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)
_debug = False


def _floats_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """A typer callback: the value is a finite number in [lo, hi] (open ends as asked)."""
    def check(value):
        if value is None:
            return value
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise typer.BadParameter(f"{value} is not a finite number in {'(' if lo_open else '['}{lo:g}, "
                                     f"{hi:g}{')' if hi_open else ']'}")
        return value
    return check


MAX_SEED = 2**32 - 1
MAX_COUNT = 1_000_000

# ----------------------------------------------------------------------------- shared options
Checkpoint = Annotated[Path, typer.Argument(help="Checkpoint: state dict (+ --arch), TorchScript archive, or ddtool bundle / distill --out folder.", show_default=False, readable=False)]
Arch = Annotated[Optional[str], typer.Option("--arch", help="Architecture of a state dict: path/to/file.py:factory or package.module:factory.")]
ArchArgs = Annotated[Optional[str], typer.Option("--arch-args", help="Keyword arguments for the --arch factory, as a JSON object.")]
Data = Annotated[Path, typer.Option("--data", help="Folder of inputs (images, searched recursively; class subfolders = labels).", show_default=False, readable=False)]
Channels = Annotated[Optional[int], typer.Option("--channels", min=1, max=3, help="Input channels: 1 (grayscale) or 3 (RGB). Default: the bundle's, else the first conv's.")]
Size = Annotated[Optional[str], typer.Option("--size", help="Resize inputs to H,W. Default: the bundle's, else each image's own size.")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean subtracted from [0,1] pixels, comma-separated. Default: bundle's, else 0.")]
Std = Annotated[Optional[str], typer.Option("--std", help="Per-channel std dividing [0,1] pixels, comma-separated. Default: bundle's, else 1.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
Force = Annotated[bool, typer.Option("--force", help="Replace outputs that already exist.")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed for dropout masks, data order and perturbations.")]
Trust = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow a pickled full module (torch.save(model)); this runs code from the file.")]
SampleDropPath = Annotated[bool, typer.Option("--sample-drop-path/--no-sample-drop-path", help="Also sample DropPath / stochastic depth in MC mode (default: off, reported only).")]
Output = Annotated[Optional[str], typer.Option("--output", help="Which model output is the prediction: a name or an index. Default: logits, else the first tensor; a transformers folder: logits of a classifier head, a sentence-transformers folder's pooled embedding, else last_hidden_state (padding zeroed).")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Input shape without the batch, as C,H,W (or any comma-separated dims).")]
FollowOutside = Annotated[bool, typer.Option("--follow-outside", help="Follow symlinks in --data that lead outside it (default: reported and skipped).")]
MaxLength = Annotated[Optional[int], typer.Option("--max-length", min=2, max=1_000_000, help="Text models: at most this many tokens per input, special tokens included. Default: the folder's sentence-transformers max_seq_length, else its position embeddings (at most 512).")]
HFOutput = Annotated[Optional[str], typer.Option("--output", help="Transformers folders: the output to use (last_hidden_state, pooler_output, ...). Default: logits for a classifier head, the pooled sentence embedding of a sentence-transformers folder, else last_hidden_state (padding zeroed).")]
Classes = Annotated[Optional[str], typer.Option("--classes", help="Class names: comma-separated, or a text file with one per line.")]


CheckFolder = Annotated[Optional[Path], typer.Option("--check", help="A labelled folder (class subfolders; labelled .jsonl for text): after distilling, measure standard dropout's and the student's error there, and keep the teacher's own weights (standard dropout) if the student errs more.", readable=False)]


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and abs(v) <= 1e6 for v in values):
        raise UsageError(f"{name} must be finite numbers (at most 1e6 in size), got {text!r}")
    return values


def _ints(text: str | None, name: str, count: int | None) -> tuple[int, ...] | None:
    """Comma-separated positive integers; exactly ``count`` of them unless it is None."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if not values or (count and len(values) != count) or min(values) < 1 or len(values) > 8:
        what = f"{count} positive integers" if count else "positive integers (at most 8)"
        raise UsageError(f"{name} must be {what} separated by commas, got {text!r}")
    require(4 * math.prod(values), f"{name} {text}: one input", "give a smaller shape")
    return values


def _preprocess(channels, size, mean, std, max_length=None) -> dict:
    """The preprocessing options, parsed: keyword arguments of the API's calls."""
    return {"channels": channels, "size": _ints(size, "--size", 2), "mean": _floats(mean, "--mean"),
            "std": _floats(std, "--std"), **({"max_length": max_length} if max_length is not None else {})}


def _emit_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def handles_errors(fn):
    """Turn ddtool's errors into one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DDToolError as err:
            if _debug:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:  # noqa: BLE001 - a bug in ddtool, not the user's doing
            if _debug:
                raise
            if is_out_of_memory(err):
                print(f"error: out of memory ({one_line(err)[:120]}); lower --batch-size, --teacher-samples or --size",
                      file=sys.stderr)
                raise typer.Exit(UsageError.exit_code) from None
            print(f"error: internal error: {type(err).__name__}: {one_line(err)} (rerun with --debug for the traceback)",
                  file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"ddtool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Distill a dropout network into a deterministic one that predicts like MC dropout."""
    global _debug
    _debug = debug


# ----------------------------------------------------------------------------- inspect
@app.command()
@handles_errors
def inspect(
    checkpoint: Checkpoint,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    input_shape: InputShape = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Run the model on the first input of this folder to find functional dropout.", readable=False)] = None,
    sample_drop_path: SampleDropPath = False,
    trust_checkpoint: Trust = False,
    channels: Channels = None, size: Size = None, mean: Mean = None, std: Std = None,
    max_length: MaxLength = None,
    output: HFOutput = None,
    follow_outside: FollowOutside = False,
    as_json: Json = False,
) -> None:
    """List every dropout site (name, kind, p, how it was found, calls per forward pass)."""
    found = inspect_checkpoint(checkpoint, arch, parse_arch_args(arch_args), input_shape=_ints(input_shape, "--input-shape", None),
                               data=data, sample_drop_path=sample_drop_path, trust=trust_checkpoint,
                               follow_outside=follow_outside, output=output,
                               **_preprocess(channels, size, mean, std, max_length))
    if as_json:
        _emit_json(found.as_dict())
    else:
        out.print(f"{checkpoint}: {found.format}, {found.arch}, {found.parameters:,} parameters"
                  + (f"; output: {found.output}" if found.output else ""))
        if found.reading:
            out.print(f"read {found.reading}")
        table = Table()
        for col in ("name", "kind", "p", "found by", "calls", "sampled"):
            table.add_column(col, overflow="fold")
        for s in found.sites:
            table.add_row(s.name, s.kind, f"{s.p:g}", s.found_by, "?" if s.calls is None else str(s.calls),
                          "yes" if s.sampled else "no")
        out.print(table)
    if not found.ran_model and found.sites and found.traceable:
        print("note: functional and attention dropout show only when the model runs: pass --input-shape or --data",
              file=sys.stderr)
    found.require_dropout()  # after the report: no dropout is an error


# ----------------------------------------------------------------------------- distill
MIHeadOption = Annotated[bool, typer.Option("--mi-head", help="Also fit a small head that predicts MC dropout's mutual information (epistemic uncertainty) per input in the same forward pass; stored in the bundle, exported as the output mutual_information.")]


class DistillProgress:
    """Progress on stderr: a rich bar (samples/s, loss, fidelity, ETA) on a terminal, else one
    plain line per epoch. The bar starts at the first finished step, so an early error prints
    only its own line."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.fidelity = self.loss = "—"  # the loss is read from the device at check points only

    def __call__(self, event: dict) -> None:
        if event["event"] == "lr_find":
            tried = ", ".join(f"{t['lr']:g}: {t['fidelity']:.4g}" for t in event["tried"])
            print(f"lr-find: base rate {event['lr']:g} (probe fidelity per rate: {tried})", file=sys.stderr, flush=True)
            return
        if event["event"] == "mi_head":
            print(f"mi-head: fitted on {event['inputs']} inputs; held-out squared error {event['held_out_mse']:.3g} "
                  f"(a constant's: {event['constant_mse']:.3g})", file=sys.stderr, flush=True)
            return
        if event["event"] == "epoch":
            if "fidelity" in event:
                self.fidelity = f"{event['fidelity']:.4f}"
            if not err_console.is_terminal:
                fid = f", fidelity (KL to MC) {event['fidelity']:.4f}" if "fidelity" in event else ""
                print(f"epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f}{fid}, "
                      f"{event['samples_per_s']:.0f} samples/s, {event['seconds']:.1f}s", file=sys.stderr, flush=True)
            return
        if not err_console.is_terminal:
            return
        if self.bar is None:
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.0f} samples/s  loss {task.fields[loss]}  fidelity {task.fields[fidelity]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err_console,
            )
            self.bar.start()
            self.task = self.bar.add_task("distill", total=event["total"], completed=event["done"] - 1,
                                          epoch=1, loss=self.loss, rate=0.0, fidelity="—")
        if "loss" in event:
            self.loss = f"{event['loss']:.4f}"
        self.bar.update(self.task, completed=event["done"], epoch=event["epoch"], loss=self.loss,
                        rate=event["samples_per_s"], fidelity=self.fidelity)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
@handles_errors
def distill(
    checkpoint: Checkpoint,
    data: Data,
    out_dir: Annotated[Path, typer.Option("--out", help=f"Folder for the distilled bundle ({BUNDLE_NAME}), history.json and, while running, resume.pt.", show_default=False, readable=False)],
    arch: Arch = None,
    arch_args: ArchArgs = None,
    student_arch: Annotated[Optional[str], typer.Option("--student-arch", help="A smaller student network (file.py:factory); tensors matching the teacher's are copied in.")] = None,
    student_arch_args: Annotated[Optional[str], typer.Option("--student-arch-args", help="Keyword arguments for --student-arch, as a JSON object.")] = None,
    shrink: Annotated[Optional[list[str]], typer.Option("--shrink", help="LAYER=FRACTION: keep the strongest units of a Linear/Conv layer and slice the next; repeatable.")] = None,
    epochs: Annotated[int, typer.Option(min=1, max=100_000, help="Epochs over the unlabelled set (paper: 20 + 10; the rate drops after two thirds of them).")] = DistillConfig.epochs,
    lr: Annotated[float, typer.Option(callback=_floats_in(0, 10, lo_open=True), help="Base learning rate, in (0, 10].")] = DistillConfig.lr,
    lr_drop_epoch: Annotated[Optional[int], typer.Option(min=0, max=100_000, help="--schedule step: epochs 1..N use lr, the later ones lr/10. Default: two thirds of --epochs (the paper's 20 of 30).", show_default=False)] = DistillConfig.lr_drop_epoch,
    schedule: Annotated[str, typer.Option(help="step (lr/10 after --lr-drop-epoch) or cosine (per epoch, from lr towards 0).")] = DistillConfig.schedule,
    lr_find: Annotated[bool, typer.Option("--lr-find", help="Choose the base rate without labels: a short range test on the fidelity (KL to MC) of inputs it holds out; replaces --lr.")] = DistillConfig.lr_find,
    optimizer: Annotated[str, typer.Option(help="sgd (with momentum, the paper's) or adam.")] = DistillConfig.optimizer,
    momentum: Annotated[float, typer.Option(callback=_floats_in(0, 1, hi_open=True), help="SGD momentum, in [0, 1).")] = DistillConfig.momentum,
    weight_decay: Annotated[float, typer.Option(callback=_floats_in(0, 10), help="L2 weight decay, in [0, 10].")] = DistillConfig.weight_decay,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Inputs per step.")] = DistillConfig.batch_size,
    teacher_samples: Annotated[int, typer.Option(min=1, max=10_000, help="K: masked teacher outputs averaged into each target.")] = DistillConfig.teacher_samples,
    loss: Annotated[str, typer.Option(help="kl (classifiers) or mse (regression outputs).")] = DistillConfig.loss,
    class_dim: Annotated[int, typer.Option(min=-8, max=8, help="Class axis of the output; KL is taken per position along it.")] = DistillConfig.class_dim,
    perturb: Annotated[float, typer.Option(callback=_floats_in(0, 1, hi_open=True), help="Probability of zeroing each input pixel (paper: 0.2; default off: it lowered fidelity on every teacher measured).")] = DistillConfig.perturb,
    flip: Annotated[str, typer.Option(help="Random image flips: '' (none), h, v or hv.")] = DistillConfig.flip,
    perturb_tokens: Annotated[float, typer.Option(callback=_floats_in(0, 1, hi_open=True), help="Text: probability of replacing each real, non-special token with the tokenizer's mask (else unknown) token (0 = off).")] = DistillConfig.perturb_tokens,
    val_fraction: Annotated[float, typer.Option(callback=_floats_in(0, 1, hi_open=True), help="Share of inputs held out to measure fidelity (KL to MC) each epoch; 0 = none.")] = DistillConfig.val_fraction,
    patience: Annotated[int, typer.Option(min=0, max=100_000, help="Stop after this many epochs without better fidelity, keeping the best; 0 = never.")] = DistillConfig.patience,
    seed: Seed = DistillConfig.seed,
    output: Output = None,
    sample_drop_path: SampleDropPath = False, mi_head: MIHeadOption = DistillConfig.mi_head,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")] = DistillConfig.device,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the student (slow to start; the teacher samples eagerly).")] = False,
    workers: Annotated[Optional[int], typer.Option(min=0, max=64, help="DataLoader worker processes for decoding. Default: cores - 1, at most 8.")] = None,
    cache_mb: Annotated[float, typer.Option(callback=_floats_in(0, 1e9), help="Hold the decoded inputs in memory if they fit in this many MB; else stream them.")] = 1024,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/resume.pt.")] = False,
    export_formats: Annotated[Optional[str], typer.Option("--export", help="Also export and verify: onnx, torchscript, pt2, comma-separated (OUT/model.onnx, ...).")] = None,
    classes: Classes = None, check: CheckFolder = None,
    trust_checkpoint: Trust = False,
    channels: Channels = None, size: Size = None, mean: Mean = None, std: Std = None, max_length: MaxLength = None,
    follow_outside: FollowOutside = False, force: Force = False, as_json: Json = False,
) -> None:
    """Distill the checkpoint into a deterministic student (Algorithm 2). Ctrl-C (or SIGTERM) writes
    OUT/resume.pt and exits with 130 (143); --resume continues. Data-parallel on N processes or GPUs:
    torchrun --nproc-per-node N -m ddtool distill ... (--batch-size is then the global batch)."""
    config = DistillConfig(
        epochs=epochs, lr=lr, lr_drop_epoch=lr_drop_epoch, schedule=schedule, lr_find=lr_find, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, teacher_samples=teacher_samples, loss=loss,
        class_dim=class_dim, perturb=perturb, flip=flip, perturb_tokens=perturb_tokens, val_fraction=val_fraction,
        patience=patience, seed=seed, output=parse_select(output), sample_drop_path=sample_drop_path, device=device,
        compile=compile_model, mi_head=mi_head)
    progress = DistillProgress()
    try:
        result = distill_to_folder(
            checkpoint, data, out_dir, config, arch=arch, arch_args=parse_arch_args(arch_args),
            student_arch=student_arch, student_arch_args=parse_arch_args(student_arch_args, "--student-arch-args"),
            shrink=parse_shrink(shrink), classes=classes, export=_parse_formats(export_formats) if export_formats else [],
            cache_mb=cache_mb, workers=workers, resume=resume, trust=trust_checkpoint, force=force, follow_outside=follow_outside, progress=progress,
            check=check, **_preprocess(channels, size, mean, std, max_length))
    finally:
        progress.close()
    _report_distilled(result, as_json)


def _report_distilled(result, as_json: bool) -> None:
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if result.check is not None:
        print(result.check.line(), file=sys.stderr, flush=True)
    if as_json:
        _emit_json(result.as_dict())
        return
    if result.reading:
        out.print(f"read {result.reading}")
    for exported in result.exports:
        _print_export(exported)
    last, compression = result.history[-1], result.compression
    fid = f", fidelity {last['fidelity']:.4f}" if "fidelity" in last else ""
    size_note = f"; {compression['student_parameters']:,} of {compression['teacher_parameters']:,} parameters" if compression else ""
    kept = " (the teacher's own weights: --check kept standard dropout)" if result.check and result.check.kept == "standard" else ""
    out.print(f"distilled {result.inputs} inputs x {len(result.history)} epochs; final loss {last['loss']:.4f}{fid}"
              f"{size_note}; wrote {result.bundle}{kept}")
    if result.mi_head:
        out.print(f"MI head on layer {result.mi_head['feature']!r}: held-out squared error {result.mi_head['held_out_mse']:.3g} "
                  f"(a constant's: {result.mi_head['constant_mse']:.3g})")


# ----------------------------------------------------------------------------- evaluate
@app.command()
@handles_errors
def evaluate(
    checkpoint: Checkpoint,
    data: Data,
    distilled: Annotated[Optional[list[Path]], typer.Option("--distilled", help="A distilled model (bundle or distill --out folder) to compare; repeatable.")] = None,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    mc_samples: Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="m: masked forward passes averaged by MC dropout.")] = 100,
    repeats: Annotated[int, typer.Option(min=1, max=10_000, help="Draw the MC reference this many times (new seed each) and report mean ± std.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Inputs per forward pass for the metrics and the throughput.")] = 256,
    timing: Annotated[bool, typer.Option("--timing/--no-timing", help="Measure batch-1 latency (default: on).")] = True,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: error with error bars per method, and a reliability diagram.", readable=False)] = None,
    seed: Seed = 0,
    output: Output = None,
    class_dim: Annotated[Optional[int], typer.Option(min=-8, max=8, help="Class axis of the output; other axes are positions compared one by one. Default: the distilled bundle's, else 1.")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="The model's class names in output order (comma-separated or a file): class folders are matched to them by name. Default: a bundle's.")] = None,
    sample_drop_path: SampleDropPath = False,
    trust_checkpoint: Trust = False,
    channels: Channels = None, size: Size = None, mean: Mean = None, std: Std = None,
    max_length: MaxLength = None,
    ood: Annotated[Optional[Path], typer.Option("--ood", help="A folder of inputs from another distribution: adds each method's OOD-detection AUROC (predictive entropy).", exists=True, file_okay=False, show_default=False)] = None,
    follow_outside: FollowOutside = False, force: Force = False, as_json: Json = False,
) -> None:
    """Compare standard dropout, MC dropout and distilled models on a folder: quality, uncertainty and cost."""
    report = evaluate_folder(checkpoint, data, distilled or [], arch=arch, arch_args=parse_arch_args(arch_args),
                             mc_samples=mc_samples, repeats=repeats, batch_size=batch_size, timing=timing, seed=seed,
                             select=parse_select(output), sample_drop_path=sample_drop_path, trust=trust_checkpoint,
                             plot_to=plot, force=force, class_dim=class_dim, classes=classes, follow_outside=follow_outside,
                             ood=ood, **_preprocess(channels, size, mean, std, max_length))
    if as_json:
        _emit_json(report.as_dict())
        return
    kind = "labelled" if report.labelled else "unlabelled"
    where = f" x {report.positions} positions" if report.positions > 1 else ""
    table = Table(title=f"{data}: {report.inputs} {kind} inputs{where}, MC m={mc_samples}, {repeats} repeat(s)")
    columns = [("method", None, 1, ""), ("error %", "error", 100, ".2f"), ("NLL", "nll", 1, ".3f"),
               ("ECE %", "ece", 100, ".2f"), ("KL to MC", "kl_to_mc", 1, ".4f"), ("agree %", "agreement", 100, ".1f"),
               ("MSE to MC", "mse_to_mc", 1, ".3g"), ("cosine to MC", "cosine_to_mc", 1, ".5f"),
               ("AUROC err", "auroc_error", 1, ".3f"), ("AUROC OOD", "auroc_ood", 1, ".3f"),
               ("ms / input (b1)", "latency_ms", 1, ".2f"), ("inputs/s (b256)", "throughput", 1, ",.0f"),
               ("params", "parameters", 1, ",d")]
    if not report.labelled:
        columns = [c for c in columns if c[1] not in ("error", "nll", "ece", "auroc_error")]
    if not report.ood_inputs:
        columns = [c for c in columns if c[1] != "auroc_ood"]
    columns = [c for c in columns if c[1] != "latency_ms"] if not timing else columns
    embedding = all(r.kl_to_mc is None for r in report.results)  # embeddings: MSE and cosine, else KL and agreement
    columns = [c for c in columns if c[1] not in (("kl_to_mc", "agreement") if embedding else ("mse_to_mc", "cosine_to_mc"))]
    for title, *_ in columns:
        table.add_column(title, justify="left" if title == "method" else "right")
    for r in report.results:
        row = [r.method]
        for _, key, scale, spec in columns[1:]:
            value = getattr(r, key)
            cell = _fmt(None if value is None else scale * value, spec)
            if repeats > 1 and key in r.std and value is not None and key not in ("latency_ms", "throughput"):
                cell += f" ± {format(scale * r.std[key], spec)}"
            row.append(cell)
        table.add_row(*row)
    out.print(table)
    _print_mi(report.mutual_information, mc_samples)


def _print_mi(heads: dict, mc_samples: int) -> None:
    """The MI heads' agreement with MC dropout's mutual information (evaluate's second table)."""
    if not heads:
        return
    ood = any("auroc_ood_head" in h for h in heads.values())
    table = Table(title=f"MI head vs MC dropout's mutual information (m={mc_samples})")
    for title in ["model", "Pearson", "Spearman", "mean MI head", "mean MI MC"] + ["AUROC OOD head", "AUROC OOD MC MI"] * ood:
        table.add_column(title, justify="left" if title == "model" else "right")
    for name, h in heads.items():
        keys = ["pearson", "spearman", "mean_head", "mean_mc"] + ["auroc_ood_head", "auroc_ood_mc"] * ood
        table.add_row(name, *(_fmt(h.get(k), ".4f" if k.startswith("mean") else ".3f") for k in keys))
    out.print(table)


# ----------------------------------------------------------------------------- export
Probabilities = Annotated[bool, typer.Option("--probabilities", help="ONNX/TorchScript/pt2: add a softmax 'probabilities' output to the graph.")]
Atol = Annotated[float, typer.Option(callback=_floats_in(0, 1e6), help="Largest absolute difference from PyTorch allowed in the parity check.")]


def _parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"--format must be among {', '.join(FORMATS)} (comma-separated), not {text!r}")
    return formats


@app.command()
@handles_errors
def export(
    model: Annotated[Path, typer.Argument(help="Model to export: a distill --out folder or bundle, or any checkpoint ddtool reads.", show_default=False, readable=False)],
    fmt: Annotated[str, typer.Option("--format", help="onnx, torchscript (traced; deprecated in torch 2.13 but still loadable) or pt2 (torch.export).")] = "onnx",
    out_file: Annotated[Path, typer.Option("--out", help="File to write; kept only if it matches PyTorch.", show_default=False, readable=False)] = ...,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Input shape without the batch, as C,H,W. Default: the bundle's.")] = None,
    atol: Atol = 1e-4,
    opset: Annotated[Optional[int], typer.Option(min=7, max=100, help="ONNX opset version. Default: the exporter's.")] = None,
    external_data: Annotated[bool, typer.Option("--external-data", help="ONNX: keep the weights in FILE.data beside the graph (for models over 2 GB).")] = False,
    script: Annotated[bool, typer.Option("--script", help="TorchScript: torch.jit.script instead of tracing.")] = False,
    probabilities: Probabilities = False,
    classes: Classes = None,
    output: Output = None,
    trust_checkpoint: Trust = False,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Export a model to ONNX, TorchScript or torch.export and check it against PyTorch at batch 1 and 64."""
    fmt = _parse_formats(fmt)
    if len(fmt) != 1:
        raise UsageError("export writes one format per --out; run it once per format")
    result = export_checkpoint(model, out_file, fmt[0], arch=arch, arch_args=parse_arch_args(arch_args),
                               input_shape=_ints(input_shape, "--input-shape", None), classes=classes,
                               trust=trust_checkpoint, force=force, atol=atol, opset=opset, external_data=external_data,
                               script=script, probabilities=probabilities, select=parse_select(output))
    if as_json:
        _emit_json(result.as_dict())
    else:
        _print_export(result)


def _print_export(result) -> None:
    lengths = f", sequence length {' and '.join(map(str, result.parity_lengths))}" if result.parity_lengths else ""
    out.print(f"wrote {result.path} ({result.format}); parity at batch {' and '.join(map(str, result.parity_batches))}{lengths}: "
              f"max |diff| {result.max_abs_diff:.2e} <= {result.atol:g}")


# ----------------------------------------------------------------------------- predict
@app.command()
@handles_errors
def predict(
    model: Annotated[Path, typer.Argument(help="An exported .onnx (run in onnxruntime), TorchScript or .pt2 file, or any checkpoint ddtool reads.", show_default=False, readable=False)],
    data: Data,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write predictions to FILE.csv or FILE.json instead of printing them.", readable=False)] = None,
    top_k: Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Classes reported per input.")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_COUNT, help="Inputs per forward pass.")] = 256,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    classes: Classes = None,
    output: Output = None,
    trust_checkpoint: Trust = False,
    channels: Channels = None, size: Size = None, mean: Mean = None, std: Std = None,
    max_length: MaxLength = None,
    follow_outside: FollowOutside = False, force: Force = False, as_json: Json = False,
) -> None:
    """Predict the top-k classes of every input in a folder, with the model's own preprocessing."""
    found = predict_folder(model, data, out_file, top_k=top_k, batch_size=batch_size, arch=arch,
                           arch_args=parse_arch_args(arch_args), classes=classes, select=parse_select(output),
                           trust=trust_checkpoint, follow_outside=follow_outside, force=force,
                           **_preprocess(channels, size, mean, std, max_length))
    rows = found.rows
    if as_json:
        _emit_json(found.as_dict())
    elif out_file is not None:
        out.print(f"wrote {len(rows)} predictions ({found.runtime}) to {out_file}")
    else:
        table = Table(title=f"{data}: {len(rows)} inputs, {found.runtime}")
        table.add_column("file", overflow="fold")
        table.add_column("top classes (probability)" if not rows or "top" in rows[0] else "output (first values)")
        for r in rows:
            shown = (", ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"]) if "top" in r
                     else f"{r['shape']}: " + ", ".join(f"{v:.4f}" for v in r["output"][:4]) + " ...")
            table.add_row(r["file"], shown)
        out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
