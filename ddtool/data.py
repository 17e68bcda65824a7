"""Folders of inputs -> tensors: reading, caching or streaming, preprocessing, perturbations.

A folder holds images (png, jpg, bmp, webp, tiff; grayscale or RGB) or arrays (.npy, .pt: one
input per file; .npz: one input per array), flat or nested. It is *labelled* when its inputs sit
in one subfolder per class and none lie at its top; the label of a subfolder is its position in
the sorted list of subfolder names (torchvision's ``ImageFolder`` convention, so ``0_tshirt,
1_trouser, ...`` map to 0, 1, ...).

Images are decoded to uint8 (C, H, W), converted to the model's channel count and resized if a
size is set. A batch becomes model input through :meth:`Preprocess.prepare`: scaled to [0, 1],
perturbed (for distillation), then normalised with ``(x - mean) / std`` per channel. Arrays are
taken as they are (no scaling, no normalisation): they are already model inputs, token ids
included.

The unlabelled set S of Bulo et al. (2016, Sec. 5.1) perturbs training images by zeroing each
pixel independently with probability p = 0.2; :func:`zero_pixels` does that on the [0, 1] image,
before normalisation, so "zero" means a black pixel. Flips are the paper's other augmentation.

A folder is decoded once into a compact cache (uint8 for images) when that fits ``cache_mb``;
a larger one is streamed through DataLoader workers every epoch and never held whole.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import math
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from .errors import DataError, UsageError
from .files import display_path, inside
from .text import TEXT_EXTS, buckets, read_texts, token_noise, trim

#: The key of an input made of a file's named arrays (see :func:`index_folder`).
NAMED = "*named*"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
ARRAY_EXTS = (".npy", ".npz", ".pt")
#: Above this share of unreadable files a folder is refused rather than read partially.
MAX_BAD_SHARE = 0.1
#: Errors that mean "this file is not a readable input" (skipped and counted, not fatal). Decoders
#: of damaged files raise almost anything (zipfile.BadZipFile from an .npz, struct.error, ...).
BAD_FILE_ERRORS = (Exception,)


@dataclass
class Preprocess:
    """How a file becomes a model input."""

    channels: int = 1  # 1 = grayscale, 3 = RGB
    size: tuple[int, int] | None = None  # (H, W) to resize to; None keeps each image's own size
    mean: tuple[float, ...] = (0.0,)  # per channel, or one value for all channels
    std: tuple[float, ...] = (1.0,)
    text: dict | None = None  # text models: the tokenizer and its settings (ddtool.text.text_settings)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise UsageError(f"channels must be 1 (grayscale) or 3 (RGB), not {self.channels}")
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise UsageError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise UsageError("std values must be positive")
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
            if min(self.size) < 1:
                raise UsageError(f"--size must be positive, not {self.size[0]},{self.size[1]}")
            from .limits import require

            # two inputs, decoded (1 byte a value) and as floats (4): the least any command holds
            require(2 * 5 * self.channels * self.size[0] * self.size[1], f"--size {self.size[0]},{self.size[1]}",
                    "give a smaller --size")

    def with_max_length(self, max_length: int | None) -> "Preprocess":
        """This preprocessing with the text length limit ``--max-length`` (refused for a model
        that reads no text)."""
        if max_length is None:
            return self
        if not self.text:
            raise UsageError("--max-length applies to text models (a transformers folder with a tokenizer, or its bundle)")
        self.text = {**self.text, "max_length": int(max_length)}
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        text = d.get("text")
        if text is not None and not (isinstance(text, dict) and isinstance(text.get("tokenizer"), str)
                                     and isinstance(text.get("names"), list) and isinstance(text.get("max_length"), int)):
            raise ValueError("malformed text settings")
        return cls(channels=d["channels"], size=tuple(d["size"]) if d.get("size") else None,
                   mean=tuple(d["mean"]), std=tuple(d["std"]), text=text)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel on an (N, C, H, W) batch in [0, 1], where the batch is
        (the per-channel values are copied to a device once, not at every batch)."""
        mean, std = _channel_values(self.mean, x.device, x.dtype), _channel_values(self.std, x.device, x.dtype)
        return (x - mean) / std

    def prepare(self, raw: torch.Tensor, perturb: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Raw batch -> model input: uint8 images are scaled, perturbed and normalised;
        arrays are only perturbed (and made float32 if they are floating point). Integer arrays
        (token ids) are touched only by a perturbation made for them (``perturbation(tokens=)``)."""
        if raw.dtype == torch.uint8:
            x = raw.float().div_(255)
            return self.normalize(perturb(x) if perturb else x)
        x = raw.float() if raw.is_floating_point() else raw
        return perturb(x) if perturb else x


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-channel values as a (1, C, 1, 1) tensor on ``device``, made once per device."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def model_channels(model: nn.Module) -> int | None:
    """The input channel count the model records (a torch.export program: its example input's),
    else that of its first convolution (in a TorchScript archive: read from its weight), if any."""
    recorded = getattr(model, "ddtool_input_channels", None)
    if isinstance(recorded, int):
        return recorded
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        channels = _script_conv_channels(module)
        if channels:
            return channels
    return None


def _script_conv_channels(module: nn.Module) -> int | None:
    """The input channels of a scripted or traced convolution: its weight is (out, in / groups,
    ...) or, transposed, (in, out / groups, ...); a traced one records no ``groups`` (taken as 1)."""
    name = getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None
    weight = getattr(module, "weight", None) if name and name.startswith("Conv") else None
    if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
        return None
    if name.startswith("ConvTranspose"):
        return int(weight.shape[0])
    groups = getattr(module, "groups", None)
    return int(weight.shape[1]) * (groups if isinstance(groups, int) else _traced_groups(module))


def _traced_groups(module: nn.Module) -> int:
    """The ``groups`` constant of the convolution in a traced module's graph (1 if not found)."""
    at = {"aten::_convolution": 8, "aten::conv1d": 6, "aten::conv2d": 6, "aten::conv3d": 6}
    try:
        graph = module.graph
        for node in graph.nodes():
            inputs = list(node.inputs())
            if node.kind() in at and len(inputs) > at[node.kind()]:
                groups = inputs[at[node.kind()]].toIValue()
                return groups if isinstance(groups, int) and groups > 0 else 1
    except Exception:  # noqa: BLE001 - no graph to read
        pass
    return 1


def resolve_preprocess(
    model: nn.Module,
    recorded: dict | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Preprocess:
    """The preprocessing to use: explicit options, else what a bundle recorded, else defaults.

    The default channel count is the in_channels of the model's first convolution (1 if it has
    none); the default mean and std leave the [0, 1] pixels as they are.
    """
    base = Preprocess.from_dict(recorded) if recorded else Preprocess(channels=model_channels(model) or 1)
    channels = channels or base.channels
    if mean is None:
        mean = base.mean if len(base.mean) in (1, channels) else (0.0,)
    if std is None:
        std = base.std if len(base.std) in (1, channels) else (1.0,)
    return Preprocess(channels=channels, size=size or base.size, mean=mean, std=std, text=base.text)


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class Unused:
    """An entry of a folder that was not used as an input, and why."""

    path: Path
    reason: str

    def as_dict(self) -> dict:
        return {"path": display_path(self.path), "reason": self.reason}


def _errno_reason(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "path too long for the file system"
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "not readable (permission denied)"
    return f"cannot be read ({err.strerror or err})"


def _entry(path: Path, root: Path, root_real: str, follow_outside: bool) -> tuple[os.stat_result | None, str | None]:
    """The status of a folder entry (following symlinks), or the reason it is not looked into:
    hidden, a broken symlink or a loop, unreadable, a symlink leading outside ``root``."""
    if path.name.startswith("."):
        return None, "hidden folder (not searched)" if os.path.isdir(path) else "hidden file"
    try:
        is_link = os.path.islink(path)
        if is_link and not os.path.exists(path):
            os.stat(path)  # raises the reason: a loop, or a missing target
            raise FileNotFoundError(errno.ENOENT, "no target")
        st = os.stat(path)
    except OSError as err:
        return None, "broken symlink" if err.errno == errno.ENOENT else _errno_reason(err)
    if is_link and not follow_outside and not inside(os.path.realpath(path), root_real):
        return None, f"symlink leads outside {root} (pass --follow-outside to read it)"
    return st, None


def _file_reason(path: Path, st: os.stat_result, exts: tuple[str, ...] = IMAGE_EXTS + ARRAY_EXTS) -> str | None:
    """Why a file that is not a folder is not an input, if it is not."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, device or socket)"
    if path.suffix.lower() not in exts:
        return "not an input type"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None


def walk_inputs(root: Path, follow_outside: bool = False,
                exts: tuple[str, ...] = IMAGE_EXTS + ARRAY_EXTS) -> tuple[list[Path], list[Unused]]:
    """Every input file under ``root`` (recursively, in a stable order), and every entry that is
    not one, with the reason: hidden, not an input type, unreadable, a broken symlink or a loop,
    a symlink leading outside ``root`` (unless ``follow_outside``), not a regular file, a file
    already reached through another path.

    Symlinks are followed, to folders too; a folder is searched once however many links lead to
    it, so a loop ends.
    """
    root_real = os.path.realpath(root)
    found: list[Path] = []
    unused: list[Unused] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: dict[tuple[int, int], Path] = {}
    try:
        st = os.stat(root)
        seen_dirs.add((st.st_dev, st.st_ino))
    except OSError as err:
        return [], [Unused(root, _errno_reason(err))]
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted(entry.name for entry in it)
        except OSError as err:
            unused.append(Unused(folder, "folder " + _errno_reason(err)))
            continue
        subfolders = []
        for path in (folder / name for name in names):
            st, reason = _entry(path, root, root_real, follow_outside)
            ident = None if st is None else (st.st_dev, st.st_ino)
            if st is not None and stat.S_ISDIR(st.st_mode):
                if ident not in seen_dirs:
                    seen_dirs.add(ident)
                    subfolders.append(path)
                    continue
                reason = "folder already searched through another path (a symlink loop?)"
            elif st is not None:
                twin = seen_files.get(ident)
                reason = _file_reason(path, st, exts) or (f"the same file as {twin.name} (read once)" if twin else None)
            if reason:
                unused.append(Unused(path, reason))
                continue
            seen_files[ident] = path
            found.append(path)
        stack.extend(reversed(subfolders))  # depth first, in name order
    return found, unused


def list_inputs(root: Path, follow_outside: bool = False) -> list[Path]:
    """Every input file under ``root``, recursively, in a stable order (see :func:`walk_inputs`)."""
    return walk_inputs(Path(root), follow_outside)[0]


@dataclass
class InputIndex:
    """A folder listed but not read: one item per input (a file, or an array of an .npz)."""

    root: Path
    items: list[tuple[Path, str | None]]
    labels: list[int] | None = None
    classes: list[str] | None = None
    unused: list[Unused] = field(default_factory=list)  # entries of the folder that are not inputs
    names: tuple[str, ...] = ()  # the model's named inputs: a file of such arrays is one input

    def __len__(self) -> int:
        return len(self.items)

    def reading(self) -> str:
        """How the files were read, in one sentence."""
        files = len({path for path, _ in self.items})
        named = sum(key == NAMED for _, key in self.items)
        if self.kind == "image":
            return f"{len(self.items)} images from {files} file(s)"
        if named:
            return (f"{len(self.items)} inputs from {files} array file(s): {named} file(s) of named arrays, one input "
                    f"each, passed to the model by name ({', '.join(self.names)})"
                    + (f"; {len(self.items) - named} other array(s), one input each" if named < len(self.items) else ""))
        return f"{len(self.items)} inputs from {files} array file(s) (.npy/.pt: one per file; .npz: one per array)"

    @property
    def kind(self) -> str:
        return "image" if self.items and self.items[0][0].suffix.lower() in IMAGE_EXTS else "array"


def index_folder(root: str | os.PathLike, labelled: bool | None = None, follow_outside: bool = False,
                 names: tuple[str, ...] = ()) -> InputIndex:
    """List the inputs of ``root``; detect class subfolders unless ``labelled`` says otherwise.

    The folder is labelled when every input lies in a subfolder and at least two subfolders hold
    inputs; each of those is a class, named by the subfolder. An .npz (or a .pt dict) whose
    arrays all bear names of the model's inputs (``names``: input_ids, attention_mask, ...) is
    one input, its arrays passed to the model by name; any other .npz is one input per array.
    """
    root = Path(root)
    try:
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
    except OSError as err:
        raise DataError(f"data folder {root} cannot be used: {err.strerror or err}") from None
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data folder {root} is not readable (permission denied)")
    paths, unused = walk_inputs(root, follow_outside)
    top = {p.relative_to(root).parts[0] for p in paths}
    is_labelled = bool(paths) and all(len(p.relative_to(root).parts) > 1 for p in paths) and len(top) >= 2
    if labelled and not is_labelled:
        raise DataError(f"{root} has no class subfolders (one subfolder of inputs per class)")
    classes = sorted(top) if is_labelled and labelled is not False else None
    if not paths:
        raise DataError(f"no readable inputs in {root} (looked for {', '.join(IMAGE_EXTS + ARRAY_EXTS)})"
                        + _unused_note(unused))
    kinds = {p.suffix.lower() in IMAGE_EXTS for p in paths}
    if len(kinds) > 1:
        raise DataError(f"{root} mixes images and arrays; give a folder of one or the other")
    if classes:
        position = {name: i for i, name in enumerate(classes)}
        paths = sorted(paths, key=lambda p: position[p.relative_to(root).parts[0]])  # stable within a class
    items, labels = [], []
    for path in paths:
        keys = _npz_keys(path) if path.suffix.lower() == ".npz" else [None]
        if path.suffix.lower() == ".pt" and names or (names and keys and keys[0] is not None and set(keys) <= set(names)):
            keys = [NAMED]  # one input whose arrays go to the model by name
        if not keys:
            unused.append(Unused(path, "an .npz holding no arrays"))
        items += [(path, k) for k in keys]
        if classes:
            labels += [position[path.relative_to(root).parts[0]]] * len(keys)
    return InputIndex(root, items, labels if classes else None, classes, unused, tuple(names))


def _unused_note(unused: list[Unused]) -> str:
    if not unused:
        return ""
    return f"; {len(unused)} entr{'y' if len(unused) == 1 else 'ies'} not used, e.g. {unused[0].path.name}: {unused[0].reason}"


def _npz_keys(path: Path) -> list[str | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return sorted(npz.files)
    except BAD_FILE_ERRORS:
        return [None]  # unreadable: fails again when read, and is counted as bad there


# --------------------------------------------------------------------------- reading one input
#: Pillow modes of more than 8 bits per channel, and the value that is full white in each.
_DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _pixels(img: Image.Image, channels: int) -> np.ndarray:
    """The image as uint8 (H, W) or (H, W, 3), scaled by its bit depth: 16-bit and 32-bit integer
    images by 65535, float images by 1 (their pixels must lie in [0, 1])."""
    if img.mode in _DEEP_MODES:
        arr = np.asarray(img).astype(np.float64)
        top = _DEEP_MODES[img.mode]
        if not np.isfinite(arr).all():
            raise ValueError("float pixels that are NaN or infinite")
        if arr.min() < 0 or arr.max() > top * (1 + 1e-6):
            lo, hi = float(arr.min()), float(arr.max())
            raise ValueError(f"{img.mode} pixels in [{lo:g}, {hi:g}], outside [0, {top:g}]")
        arr = np.rint(arr * (255.0 / top)).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2) if channels == 3 else arr
    return np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def read_image(path: Path, pre: Preprocess) -> tuple[torch.Tensor, str | None]:
    """One image as a (C, H, W) uint8 tensor, and a note if only part of it was used (the first
    frame of an animation). Pixels are scaled by the bit depth, the EXIF orientation is applied.
    Raises one of ``BAD_FILE_ERRORS`` if unreadable."""
    note = None
    with Image.open(path) as img:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
            note = f"{img.n_frames} frames: the first was used"
        img.load()
        img = ImageOps.exif_transpose(img)
        arr = _pixels(img, pre.channels)
    if pre.size is not None and arr.shape[:2] != tuple(pre.size):
        arr = np.array(Image.fromarray(arr).resize((pre.size[1], pre.size[0]), Image.BILINEAR))
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr)), note


def read_named(path: Path, names: tuple[str, ...]) -> torch.Tensor:
    """An .npz or .pt dict of named arrays as one input: the arrays stacked in the order of the
    model's input ``names`` (so the model gets each by name); an absent attention_mask is all
    ones, another absent name all zeros. The arrays must have one shape, (L,) or (1, L): a
    tokenizer's output for one text, with or without its batch axis."""
    if path.suffix.lower() == ".pt":
        value = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(value, torch.Tensor):
            return read_array(path, None)  # a plain tensor: one unnamed input
        if not (isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())):
            raise ValueError(f"{path.name} holds a {type(value).__name__}, not a tensor or a dict of tensors")
        arrays = {k: v.numpy() for k, v in value.items()}
    else:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    unknown = sorted(set(arrays) - set(names))
    if unknown or names[0] not in arrays:
        raise ValueError(f"{path.name} holds arrays {', '.join(sorted(arrays))}; the model takes {', '.join(names)} "
                         f"and needs {names[0]}")
    shape = arrays[names[0]].shape
    if any(a.shape != shape for a in arrays.values()):
        raise ValueError(f"{path.name}: its arrays have different shapes")
    if any(a.dtype.kind not in "biu" for a in arrays.values()):
        raise ValueError(f"{path.name}: named arrays must hold integers (token ids, masks)")
    if len(shape) == 2 and shape[0] == 1:  # a tokenizer's return_tensors="np": a batch of one
        arrays, shape = {k: a[0] for k, a in arrays.items()}, shape[1:]
    if len(shape) != 1:
        raise ValueError(f"{path.name}: named arrays of shape {tuple(shape)}; a file holds one input, "
                         f"its arrays of shape (length,) or (1, length)")
    rows = [torch.from_numpy(np.asarray(arrays[n], dtype=np.int64)) if n in arrays
            else torch.full(shape, 1 if n == "attention_mask" else 0, dtype=torch.long) for n in names]
    return torch.stack(rows)


def read_array(path: Path, key: str | None) -> torch.Tensor:
    """One array input (.npy, an .npz entry, or a .pt tensor), never unpickling objects."""
    suffix = path.suffix.lower()
    if suffix == ".pt":
        value = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path.name} holds a {type(value).__name__}, not a tensor")
        t = value
    else:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arr = npz[key]
        else:
            arr = np.load(path, allow_pickle=False)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{path.name} holds {arr.dtype} values, not numbers")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_floating_point():
        t = t.float()
        if not torch.isfinite(t).all():
            raise DataError(f"{path} holds NaN or infinite values")
    elif t.dtype == torch.bool:
        t = t.float()
    else:
        t = t.long()
    return t


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (f"{type(err).__name__}: {text}" if text else type(err).__name__)[:160]


class FolderDataset(torch.utils.data.Dataset):
    """The inputs of an :class:`InputIndex`. Never raises, so that a DataLoader worker never
    prints a traceback: an item is ``(x, i, problem)`` where ``problem`` is ``None``, a note
    (``x`` usable), the reason ``x`` is ``None`` (an unreadable file), or a fatal error."""

    def __init__(self, index: InputIndex, pre: Preprocess, positions: list[int] | None = None):
        self.index, self.pre = index, pre
        self.positions = list(range(len(index))) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        path, key = self.index.items[self.positions[i]]
        try:
            if path.suffix.lower() in IMAGE_EXTS:
                x, note = read_image(path, self.pre)
                return x, i, ("note", note) if note else None
            if key == NAMED:
                return read_named(path, self.index.names), i, None
            return read_array(path, key), i, None
        except DataError as err:
            return None, i, ("fatal", str(err))
        except MemoryError:
            return None, i, ("fatal", f"{path} is too large to decode in memory")
        except BAD_FILE_ERRORS as err:
            return None, i, ("bad", _reason(err))


@dataclass
class Batch:
    """What :func:`collate` makes of a list of items: the readable inputs stacked, their
    positions, and what went wrong with the others."""

    x: torch.Tensor | None
    index: torch.Tensor
    bad: list[tuple[int, str]]
    notes: list[tuple[int, str]]
    fatal: str | None = None

    def __iter__(self):  # (x, index, number of unreadable inputs), as before
        return iter((self.x, self.index, len(self.bad)))


def collate(batch) -> Batch:
    """Stack the readable inputs; report which were not, and why."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, p[1]) for x, i, p in batch if x is None and p and p[0] == "bad"]
    notes = [(i, p[1]) for x, i, p in batch if x is not None and p and p[0] == "note"]
    fatal = next((p[1] for _, _, p in batch if p and p[0] == "fatal"), None)
    shapes = {tuple(x.shape) for x, _ in good}
    if len(shapes) > 1 and fatal is None:
        a, b = sorted(shapes)[:2]
        fatal = (f"inputs have different shapes ({'x'.join(map(str, a))} and {'x'.join(map(str, b))}); "
                 "set a size with --size H,W")
    xs = torch.stack([x for x, _ in good]) if good and fatal is None else None
    return Batch(xs, torch.tensor([i for _, i in good], dtype=torch.long), bad, notes, fatal)


def _loader_batches(loader) -> Iterator[Batch]:
    """A DataLoader's batches, with a worker's death (a decoder crash, the OOM killer) as one line."""
    try:
        for batch in loader:
            if batch.fatal:
                raise DataError(batch.fatal)
            yield batch
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        raise DataError(f"reading the inputs failed: {str(err).strip().splitlines()[0]}") from None


def default_workers() -> int:
    """DataLoader workers for decoding: one per core beyond the main process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------------- whole folders
@dataclass
class Inputs:
    """Inputs read into memory: raw (uint8 images or arrays), with labels if any."""

    x: torch.Tensor
    paths: list[Path]
    labels: torch.Tensor | None = None  # (N,) int64
    classes: list[str] | None = None
    skipped: int = 0
    unused: list[Unused] = field(default_factory=list)  # entries not used, with the reason
    notes: list[Unused] = field(default_factory=list)  # inputs used only in part (first frames)
    reading: str = ""  # how the files were read, for inspect and distill to say

    def __len__(self) -> int:
        return len(self.paths)


def report_unused(unused: list[Unused], notes: list[Unused], root: Path) -> None:
    """One line on stderr for the entries of ``root`` that were not used (by reason), and one
    for the inputs used only in part; every entry is listed in ``--json``."""
    if unused:
        counts = Counter(u.reason.split(" (")[0] for u in unused)
        parts = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
        print(f"note: {len(unused)} entr{'y' if len(unused) == 1 else 'ies'} of {root} not used: {parts} "
              f"(e.g. {unused[0].path.name}: {unused[0].reason}; --json lists them all)", file=sys.stderr)
    if notes:
        print(f"note: {len(notes)} animated or multi-page image(s) in {root}: the first frame was used "
              f"(e.g. {notes[0].path.name})", file=sys.stderr)


def _check_bad(bad: list[Unused], total: int, root: Path) -> None:
    """The folder contract: more than MAX_BAD_SHARE unreadable files is an error, fewer a warning."""
    first = f", e.g. {bad[0].path.name} ({bad[0].reason})" if bad else ""
    if bad and len(bad) > MAX_BAD_SHARE * total:
        raise DataError(f"{len(bad)} of {total} files in {root} are unreadable (more than {MAX_BAD_SHARE:.0%}){first}")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable file(s) of {total} in {root}{first}", file=sys.stderr)


@dataclass
class Scan:
    """A folder decoded once: the inputs (if kept), the positions that were readable, and what
    was not used, with the reasons."""

    x: torch.Tensor | None
    positions: list[int]
    bad: list[Unused]
    notes: list[Unused]
    sample_shape: tuple[int, ...]


def scan_inputs(index: InputIndex, pre: Preprocess, positions: list[int] | None = None, workers: int = 0,
                batch_size: int = 256, keep: bool = True) -> Scan:
    """Decode the inputs at ``positions`` (default: all) and apply the folder contract: none
    readable, inputs of different shapes, or more than ``MAX_BAD_SHARE`` unreadable is a
    :class:`DataError`. ``keep=False`` checks a folder that will be streamed, holding nothing."""
    dataset = FolderDataset(index, pre, positions)
    total = len(dataset)
    if keep:
        _require_fits(index, pre, dataset)
    if keep and total < 2 * batch_size:
        workers = 0  # a pool costs more to start than a small folder takes to read (a streamed one is large)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    cache, kept, bad, notes, shape = None, [], [], [], None
    for batch in _loader_batches(loader):
        bad += [Unused(index.items[dataset.positions[i]][0], why) for i, why in batch.bad]
        notes += [Unused(index.items[dataset.positions[i]][0], why) for i, why in batch.notes]
        if batch.x is None:
            continue
        if shape is not None and tuple(batch.x.shape[1:]) != shape:
            raise DataError(f"inputs in {index.root} have different shapes; set a size with --size H,W")
        shape = tuple(batch.x.shape[1:])
        kept += batch.index.tolist()
        if keep:
            cache = _fill(cache, batch.x, len(kept) - len(batch.x), total)
    if not kept:
        first = f" (e.g. {bad[0].path.name}: {bad[0].reason})" if bad else ""
        raise DataError(f"no readable inputs in {index.root}: all {total} files failed to decode{first}")
    _check_bad(bad, total, index.root)
    if keep and len(kept) < total:
        cache = cache[:len(kept)].clone()  # (unreadable files left rows unused)
    return Scan(cache if keep else None, [dataset.positions[i] for i in kept], bad, notes, shape)


def _fill(cache: torch.Tensor | None, x: torch.Tensor, at: int, total: int) -> torch.Tensor:
    """Rows ``at:`` of the cache of ``total`` inputs set to the batch ``x``: one tensor allocated
    once (uint8 for images), never a list of batches concatenated at the end (twice the memory)."""
    if cache is None:
        cache = torch.empty((total, *x.shape[1:]), dtype=x.dtype)
    elif x.dtype != cache.dtype:  # arrays of mixed types: the common one, as torch.cat would
        cache = cache.to(torch.promote_types(cache.dtype, x.dtype))
    cache[at:at + len(x)] = x
    return cache


def _require_fits(index: InputIndex, pre: Preprocess, dataset: FolderDataset) -> None:
    """Refuse to read a folder into memory when its decoded inputs cannot fit."""
    from .limits import require

    if index.kind == "image" and pre.size is not None:
        per_input = pre.channels * pre.size[0] * pre.size[1]
    else:
        sample = next((x for x, _, _ in (dataset[i] for i in range(min(len(dataset), 8))) if x is not None), None)
        if sample is None:
            return
        per_input = sample.numel() * sample.element_size()
    require(per_input * len(dataset), f"reading {len(dataset):,} inputs of {index.root} into memory",
            "give a smaller --size or fewer inputs")


def load_inputs(index: InputIndex, pre: Preprocess, positions: list[int] | None = None,
                workers: int = 0, batch_size: int = 256) -> Inputs:
    """Decode the inputs at ``positions`` (default: all) into one in-memory tensor."""
    scan = scan_inputs(index, pre, positions, workers, batch_size)
    labels = torch.tensor([index.labels[p] for p in scan.positions]) if index.labels is not None else None
    return Inputs(scan.x, [index.items[p][0] for p in scan.positions], labels, index.classes, len(scan.bad),
                  index.unused + scan.bad, scan.notes)


def read_folder(root: str | os.PathLike, pre: Preprocess, labelled: bool | None = None, limit: int | None = None,
                workers: int = 0, follow_outside: bool = False, report: bool = True) -> Inputs:
    """Read every input of ``root`` into memory (``limit``: only the first that many).

    Unreadable files are skipped with one warning; more than ``MAX_BAD_SHARE`` of them, or none
    readable at all, is a :class:`DataError`. Entries that are not inputs are reported on stderr
    (``report``) and listed in ``Inputs.unused``.
    """
    if pre.text and walk_inputs(Path(root), follow_outside, TEXT_EXTS)[0]:
        return read_text_folder(root, pre, labelled, limit, follow_outside, report)
    index = index_folder(root, labelled, follow_outside, names=tuple(pre.text["names"]) if pre.text else ())
    positions = list(range(min(limit, len(index)))) if limit else None
    inputs = load_inputs(index, pre, positions, workers)
    inputs.reading = index.reading()
    if report:
        report_unused(index.unused, inputs.notes, index.root)
    return inputs


def read_text_folder(root: str | os.PathLike, pre: Preprocess, labelled: bool | None = None, limit: int | None = None,
                     follow_outside: bool = False, report: bool = True) -> Inputs:
    """Every text of ``root`` (.txt lines, .jsonl records; see :mod:`ddtool.text`) tokenized with
    the model's tokenizer (``pre.text``): ``Inputs.x`` is (N, K, L), one path per input
    (``file:line``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    paths, unused = walk_inputs(root, follow_outside, TEXT_EXTS)
    x, where, labels, classes, bad, reading = read_texts(root, paths, pre.text, labelled, limit)
    inputs = Inputs(x, where, labels, classes, len(bad), unused + [Unused(p, why) for p, why in bad], reading=reading)
    if report:
        report_unused(unused, [], root)
    return inputs


def class_labels(inputs: Inputs, classes: list[str] | None, outputs: int) -> torch.Tensor | None:
    """The labels of a labelled folder as indices of the model's ``outputs`` classes.

    With the model's class names (a bundle's, ONNX metadata, ``--classes``), each subfolder is
    the class of the same name (a leading ``3_`` or ``3-`` and letter case aside), whatever the
    order; a subfolder naming no class is refused. Without names, the sorted subfolders are
    classes 0, 1, ... and must be as many as the model's outputs.
    """
    if inputs.labels is None or inputs.classes is None:
        return inputs.labels
    folders = inputs.classes
    if classes:
        if len(classes) != outputs:
            raise DataError(f"{len(classes)} class names for a model with {outputs} outputs")

        def key(name: str) -> str:
            return re.sub(r"^\d+[_\-. ]", "", name).strip().casefold()

        exact = {c: i for i, c in enumerate(classes)}
        loose = {key(c): i for i, c in enumerate(classes)}
        mapping = [exact.get(f, loose.get(key(f))) for f in folders]
        missing = [f for f, m in zip(folders, mapping) if m is None]
        if missing:
            raise DataError(f"class folder(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} name no class "
                            f"of the model ({', '.join(classes[:6])}{' ...' if len(classes) > 6 else ''})")
        twice = [f for f, m in zip(folders, mapping) if mapping.count(m) > 1]
        if twice:
            raise DataError(f"class folders {', '.join(twice[:3])} name the same class of the model")
    else:
        if len(folders) != outputs:
            raise DataError(f"{len(folders)} class folders in the data, but the model has {outputs} outputs: "
                            "pass --classes (names in the model's output order) to map folders to classes by name")
        mapping = list(range(len(folders)))
    return torch.tensor(mapping, dtype=torch.long)[inputs.labels]


@dataclass
class UnlabelledSet:
    """The unlabelled set S for distillation: cached in memory, or streamed from disk each epoch.

    ``batches(order)`` yields raw batches in the given order of positions; with a cache this is
    slicing, without one a DataLoader decodes the files in ``workers`` processes. Either way the
    folder was decoded once when opened (:func:`scan_inputs`), so both hold the same readable
    inputs; ``skipped`` counts the unreadable files of the last pass (opening, or an epoch).
    """

    index: InputIndex
    pre: Preprocess
    positions: list[int]
    cache: torch.Tensor | None = None
    workers: int = 0
    pin_memory: bool = False
    skipped: int = 0
    sample_shape: tuple[int, ...] = field(default=())
    unused: list[Unused] = field(default_factory=list)  # entries not used, with the reason
    notes: list[Unused] = field(default_factory=list)  # inputs used only in part (first frames)
    bad: list[Unused] = field(default_factory=list)  # unreadable when the set was opened
    moved: torch.Tensor | None = field(default=None, repr=False, compare=False)  # the cache on a device
    reading: str = ""  # how the files were read, for distill to say

    @classmethod
    def from_tensor(cls, x: torch.Tensor, pre: Preprocess) -> "UnlabelledSet":
        """Raw inputs already in memory (uint8 images, or arrays)."""
        return cls(InputIndex(Path("."), []), pre, list(range(x.shape[0])), x, sample_shape=tuple(x.shape[1:]))

    def __len__(self) -> int:
        return len(self.positions) if self.cache is None else self.cache.shape[0]

    def fingerprint(self) -> str:
        """What identifies these inputs for ``--resume``: the folder, its files' names, sizes and
        count (or, for inputs given as a tensor, their bytes)."""
        digest = hashlib.sha256(os.fsencode(os.path.realpath(self.index.root)) + b"\0")
        if not self.index.items:
            digest.update(str((tuple(self.cache.shape), str(self.cache.dtype))).encode())
            digest.update(self.cache.contiguous().view(torch.uint8).numpy().tobytes())
            return digest.hexdigest()
        for position in self.positions:
            path, key = self.index.items[position]
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            digest.update(os.fsencode(path.relative_to(self.index.root)) + f"\0{key}\0{size}\n".encode())
        return f"{len(self.positions)}:{digest.hexdigest()}"

    def sample(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` readable raw inputs (fewer if the set is smaller)."""
        for batch in self.batches(torch.arange(min(len(self), max(n, 1))), max(n, 1)):
            return batch
        raise DataError(f"no readable inputs in {self.index.root}")

    def on(self, device: torch.device | None) -> torch.Tensor:
        """The cache on ``device``: copied there once (one uint8 tensor for images) and kept."""
        if device is None or self.cache.device == torch.device(device):
            return self.cache
        if self.moved is None or self.moved.device != torch.device(device):
            self.moved = None  # (the previous device's copy is freed before the next is made)
            self.moved = self.cache.to(device)
        return self.moved

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """Raw batches in ``order``, on ``device`` if given: slices of the cache there (copied once),
        or streamed batches copied one batch ahead (pinned memory, non-blocking, on CUDA)."""
        if len(order) == 0:  # (``split`` of an empty order would yield one empty batch)
            return
        if self.cache is not None and self.pre.text and self.cache.dim() == 3 and self.cache.shape[1] > 1:
            for idx in buckets(order, self.cache[:, 1].sum(dim=1), batch_size):  # similar lengths together
                yield trim(self.cache[idx])
            return
        if self.cache is not None:
            cache = self.on(device)
            for idx in order.to(cache.device).split(batch_size):
                yield cache[idx]
            return
        pin = self.pin_memory or (device is not None and torch.device(device).type == "cuda")
        dataset = FolderDataset(self.index, self.pre, self.positions)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=self.workers,
            collate_fn=collate, pin_memory=pin, persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(0),  # worker seeds: never from the global RNG
        )
        yield from prefetch(self._streamed(loader), device)

    def _streamed(self, loader) -> Iterator[torch.Tensor]:
        failed: list[Unused] = []
        total = len(self.positions) + len(self.bad)
        self.skipped = len(self.bad)
        for batch in _loader_batches(loader):
            failed += [Unused(self.index.items[self.positions[i]][0], why) for i, why in batch.bad]
            self.skipped = len(self.bad) + len(failed)  # this pass only: never summed over epochs
            if self.skipped > MAX_BAD_SHARE * total:
                _check_bad(self.bad + failed, total, self.index.root)  # the folder contract, as when opened
            if batch.x is not None:
                yield batch.x


def prefetch(batches: Iterator[torch.Tensor], device: torch.device | None) -> Iterator[torch.Tensor]:
    """``batches`` on ``device``, each copied while the one before is in use. On CUDA the copy
    (from pinned memory, non-blocking) runs on a side stream that the compute stream waits for,
    so the host never waits for it; elsewhere it is a plain copy (none for the CPU)."""
    if device is None or torch.device(device).type != "cuda":
        for batch in batches:
            yield batch if device is None else batch.to(device)
        return
    copying, ahead = torch.cuda.Stream(device), None
    for batch in batches:
        with torch.cuda.stream(copying):
            moved = batch.to(device, non_blocking=True)
        if ahead is not None:
            yield ahead
        torch.cuda.current_stream(device).wait_stream(copying)
        moved.record_stream(torch.cuda.current_stream(device))  # its memory is used on the compute stream
        ahead = moved
    if ahead is not None:
        yield ahead


def open_unlabelled(index: InputIndex, pre: Preprocess, positions: list[int], cache_mb: float = 1024,
                    workers: int | None = None, pin_memory: bool = False) -> UnlabelledSet:
    """Cache the inputs at ``positions`` if their decoded size fits ``cache_mb``, else stream them.

    Both decode the folder once here and apply the same contract (:func:`scan_inputs`); a
    streamed set keeps only the readable positions and decodes them again every epoch.
    """
    workers = default_workers() if workers is None else workers
    dataset = FolderDataset(index, pre, positions)
    sample = next((x for x, _, _ in (dataset[i] for i in range(min(len(dataset), 64))) if x is not None), None)
    estimate = sample.numel() * sample.element_size() * len(positions) / 2**20 if sample is not None else 0.0
    stream = sample is not None and estimate > cache_mb
    scan = scan_inputs(index, pre, positions, workers, keep=not stream)
    return UnlabelledSet(index, pre, scan.positions, scan.x, 0 if scan.x is not None else workers, pin_memory,
                         len(scan.bad), scan.sample_shape, index.unused + scan.bad, scan.notes, scan.bad)


def open_distill_data(
    root: str | os.PathLike, pre: Preprocess, val_fraction: float = 0.0, seed: int = 0,
    cache_mb: float = 1024, workers: int | None = None, pin_memory: bool = False, follow_outside: bool = False,
) -> tuple[UnlabelledSet, torch.Tensor | None]:
    """The unlabelled folder as a training set S, and the held-out raw inputs (or None).

    For images without a set size, ``pre.size`` becomes the size found, so that the bundle
    records what the student was made for. What was not used is reported on stderr and kept in
    ``UnlabelledSet.unused``.
    """
    if pre.text and walk_inputs(Path(root), follow_outside, TEXT_EXTS)[0]:
        texts = read_text_folder(root, pre, labelled=False, follow_outside=follow_outside)
        train_pos, val_pos = split_positions(len(texts), val_fraction, seed)
        train = UnlabelledSet.from_tensor(texts.x[train_pos], pre)
        train.index, train.unused, train.reading = InputIndex(Path(root), []), texts.unused, texts.reading
        return train, (texts.x[val_pos] if val_pos else None)
    index = index_folder(root, labelled=False, follow_outside=follow_outside,
                         names=tuple(pre.text["names"]) if pre.text else ())
    train_pos, val_pos = split_positions(len(index), val_fraction, seed)
    train = open_unlabelled(index, pre, train_pos, cache_mb, workers, pin_memory)
    if index.kind == "image" and pre.size is None:
        pre.size = tuple(train.sample_shape[1:])
    val = None
    if val_pos:
        held = load_inputs(index, pre, val_pos)
        val = held.x
        train.unused += held.unused[len(index.unused):]
        train.notes += held.notes
    report_unused(index.unused, train.notes, index.root)  # (unreadable files have their own warning)
    train.reading = index.reading()
    return train, val


def input_spec(pre: Preprocess, sample: torch.Tensor) -> dict:
    """Shape (without the batch) and dtype of the model input that ``sample`` (raw) becomes."""
    x = pre.prepare(sample[:1])
    return {"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch.")}


def spec_example(spec: dict, batch: int = 2) -> torch.Tensor:
    """An input matching an :func:`input_spec`: seeded normal floats, or zeros for integer inputs
    (of a stacked text input (K, L), the attention mask, row 1, is ones: no row all padding)."""
    dtype = getattr(torch, spec["dtype"])
    if dtype.is_floating_point:
        return example_input(tuple(spec["shape"]), batch).to(dtype)
    x = torch.zeros((batch, *spec["shape"]), dtype=dtype)
    if x.dim() == 3 and x.shape[1] > 1:
        x[:, 1] = 1
    return x


# --------------------------------------------------------------------------- perturbations
def example_input(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch of ``shape`` (without the batch axis), to run a model once."""
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def zero_pixels(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Set each pixel (all its channels) of an (N, C, H, W) batch to zero with probability ``p``.

    For arrays of another rank every element is a "pixel".
    """
    if p <= 0:
        return x
    shape = (x.shape[0], 1, *x.shape[2:]) if x.dim() == 4 else x.shape
    keep = torch.rand(shape, generator=generator, device=_draw_device(generator)).to(x.device) >= p
    return x * keep


def _draw_device(generator: torch.Generator | None) -> torch.device:
    """Where random numbers for ``x`` are drawn: on ``generator``'s device (distillation gives it
    one on the GPU, so the masks never cross to the host), else on the CPU as before."""
    return generator.device if generator is not None else torch.device("cpu")


def flip(x: torch.Tensor, dims: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of an (N, C, H, W) batch horizontally ("h") and/or vertically ("v"), each
    with probability 1/2 per image."""
    if x.dim() != 4:
        return x
    for axis, dim in (("h", 3), ("v", 2)):
        if axis in dims:
            chosen = (torch.rand(x.shape[0], generator=generator, device=_draw_device(generator)) < 0.5).to(x.device)
            x = torch.where(chosen.view(-1, 1, 1, 1), x.flip(dim), x)
    return x


def perturbation(zero: float = 0.0, flips: str = "", generator: torch.Generator | None = None,
                 text: dict | None = None, tokens: float = 0.0):
    """The perturbation of S as one callable: on floating-point inputs flips, then pixels zeroed
    with probability ``zero``; integer inputs (token ids) are never zeroed or flipped, only
    their tokens replaced with probability ``tokens`` (:func:`ddtool.text.token_noise`, with the
    tokenizer's ``text`` settings)."""
    words = token_noise(text, tokens, generator)
    if zero <= 0 and not flips and words is None:
        return None

    def perturb(x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return words(x) if words is not None and x.dim() == 3 else x
        return zero_pixels(flip(x, flips, generator), zero, generator)

    return perturb


def split_positions(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``range(n)`` into (training, validation) positions."""
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    n_val = math.floor(n * val_fraction) if val_fraction else 0
    if val_fraction and (n_val < 1 or n - n_val < 1):
        raise DataError(f"--val-fraction {val_fraction} leaves no inputs for one side of the split ({n} inputs)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])

