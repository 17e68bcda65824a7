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

import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import DataError, UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(channels=d["channels"], size=tuple(d["size"]) if d.get("size") else None,
                   mean=tuple(d["mean"]), std=tuple(d["std"]))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel on an (N, C, H, W) batch in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def prepare(self, raw: torch.Tensor, perturb: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Raw batch -> model input: uint8 images are scaled, perturbed and normalised;
        arrays are only perturbed (and made float32 if they are floating point)."""
        if raw.dtype == torch.uint8:
            x = raw.float().div_(255)
            return self.normalize(perturb(x) if perturb else x)
        x = raw.float() if raw.is_floating_point() else raw
        return perturb(x) if perturb else x


def model_channels(model: nn.Module) -> int | None:
    """The input channel count of the model's first convolution, if it has one."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


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
    return Preprocess(channels=channels, size=size or base.size, mean=mean, std=std)


# --------------------------------------------------------------------------- listing
def _is_input(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS + ARRAY_EXTS and not path.name.startswith(".") and path.is_file()


def list_inputs(root: Path) -> list[Path]:
    """Every input file under ``root``, recursively, in a stable order (hidden folders skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for p in (Path(dirpath) / f for f in sorted(filenames)) if _is_input(p))
    return found


def _class_dirs(root: Path) -> list[Path] | None:
    entries = list(root.iterdir())
    subdirs = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    if not subdirs or any(_is_input(p) for p in entries):
        return None
    with_inputs = [d for d in subdirs if list_inputs(d)]
    return with_inputs if len(with_inputs) >= 2 else None


@dataclass
class InputIndex:
    """A folder listed but not read: one item per input (a file, or an array of an .npz)."""

    root: Path
    items: list[tuple[Path, str | None]]
    labels: list[int] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> str:
        return "image" if self.items and self.items[0][0].suffix.lower() in IMAGE_EXTS else "array"


def index_folder(root: str | os.PathLike, labelled: bool | None = None) -> InputIndex:
    """List the inputs of ``root``; detect class subfolders unless ``labelled`` says otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data folder {root} is not readable (permission denied)")
    class_dirs = _class_dirs(root) if labelled is not False else None
    if labelled and class_dirs is None:
        raise DataError(f"{root} has no class subfolders (one subfolder of inputs per class)")
    files = [(p, i) for i, d in enumerate(class_dirs) for p in list_inputs(d)] if class_dirs else \
        [(p, None) for p in list_inputs(root)]
    if not files:
        raise DataError(f"no readable inputs in {root} (looked for {', '.join(IMAGE_EXTS + ARRAY_EXTS)})")
    kinds = {p.suffix.lower() in IMAGE_EXTS for p, _ in files}
    if len(kinds) > 1:
        raise DataError(f"{root} mixes images and arrays; give a folder of one or the other")
    items, labels = [], []
    for path, label in files:
        keys = _npz_keys(path) if path.suffix.lower() == ".npz" else [None]
        items += [(path, k) for k in keys]
        labels += [label] * len(keys)
    return InputIndex(root, items, labels if class_dirs else None, [d.name for d in class_dirs] if class_dirs else None)


def _npz_keys(path: Path) -> list[str | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return sorted(npz.files)
    except BAD_FILE_ERRORS:
        return [None]  # unreadable: fails again when read, and is counted as bad there


# --------------------------------------------------------------------------- reading one input
def read_image(path: Path, pre: Preprocess) -> torch.Tensor:
    """One image as a (C, H, W) uint8 tensor. Raises one of ``BAD_FILE_ERRORS`` if unreadable."""
    with Image.open(path) as img:
        img.load()
        img = img.convert("L" if pre.channels == 1 else "RGB")
        if pre.size is not None and img.size != (pre.size[1], pre.size[0]):
            img = img.resize((pre.size[1], pre.size[0]), Image.BILINEAR)
        arr = np.array(img, dtype=np.uint8)  # a writable copy
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


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


class FolderDataset(torch.utils.data.Dataset):
    """The inputs of an :class:`InputIndex`; an unreadable one comes back as ``None``."""

    def __init__(self, index: InputIndex, pre: Preprocess, positions: list[int] | None = None):
        self.index, self.pre = index, pre
        self.positions = list(range(len(index))) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        path, key = self.index.items[self.positions[i]]
        try:
            x = read_image(path, self.pre) if path.suffix.lower() in IMAGE_EXTS else read_array(path, key)
        except DataError:
            raise
        except BAD_FILE_ERRORS:
            x = None
        return x, i


def collate(batch):
    """Stack the readable inputs; report how many were not and which positions came through."""
    good = [(x, i) for x, i in batch if x is not None]
    shapes = {tuple(x.shape) for x, _ in good}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(f"inputs have different shapes ({'x'.join(map(str, a))} and {'x'.join(map(str, b))}); "
                        "set a size with --size H,W")
    xs = torch.stack([x for x, _ in good]) if good else None
    return xs, torch.tensor([i for _, i in good], dtype=torch.long), len(batch) - len(good)


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

    def __len__(self) -> int:
        return len(self.paths)


def _check_bad(bad: int, total: int, root: Path, first_bad: Path | None) -> None:
    if bad and bad > MAX_BAD_SHARE * total:
        raise DataError(f"{bad} of {total} files in {root} are unreadable (more than {MAX_BAD_SHARE:.0%})"
                        + (f", e.g. {first_bad.name}" if first_bad else ""))
    if bad:
        print(f"warning: skipped {bad} unreadable file(s) of {total} in {root}"
              + (f", e.g. {first_bad.name}" if first_bad else ""), file=sys.stderr)


def load_inputs(index: InputIndex, pre: Preprocess, positions: list[int] | None = None,
                workers: int = 0, batch_size: int = 256) -> Inputs:
    """Decode the inputs at ``positions`` (default: all) into one in-memory tensor."""
    dataset = FolderDataset(index, pre, positions)
    if len(dataset) < 2 * batch_size:
        workers = 0  # a pool costs more to start than a small folder takes to read
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    chunks, kept, bad = [], [], 0
    for xs, idx, nbad in loader:
        bad += nbad
        if xs is not None:
            chunks.append(xs)
            kept.append(idx)
    total = len(dataset)
    kept = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    first_bad = None
    if bad:
        good = set(kept.tolist())
        first_bad = next(index.items[dataset.positions[i]][0] for i in range(total) if i not in good)
    if not chunks:
        raise DataError(f"no readable inputs in {index.root}: all {total} files failed to decode")
    _check_bad(bad, total, index.root, first_bad)
    shapes = {tuple(c.shape[1:]) for c in chunks}
    if len(shapes) > 1:
        raise DataError(f"inputs in {index.root} have different shapes; set a size with --size H,W")
    order = [dataset.positions[i] for i in kept.tolist()]
    labels = torch.tensor([index.labels[p] for p in order]) if index.labels is not None else None
    return Inputs(torch.cat(chunks), [index.items[p][0] for p in order], labels, index.classes, bad)


def read_folder(root: str | os.PathLike, pre: Preprocess, labelled: bool | None = None, limit: int | None = None,
                workers: int = 0) -> Inputs:
    """Read every input of ``root`` into memory (``limit``: only the first that many).

    Unreadable files are skipped with one warning; more than ``MAX_BAD_SHARE`` of them, or none
    readable at all, is a :class:`DataError`.
    """
    index = index_folder(root, labelled)
    positions = list(range(min(limit, len(index)))) if limit else None
    return load_inputs(index, pre, positions, workers)


@dataclass
class UnlabelledSet:
    """The unlabelled set S for distillation: cached in memory, or streamed from disk each epoch.

    ``batches(order)`` yields raw batches in the given order of positions; with a cache this is
    slicing, without one a DataLoader decodes the files in ``workers`` processes.
    """

    index: InputIndex
    pre: Preprocess
    positions: list[int]
    cache: torch.Tensor | None = None
    workers: int = 0
    pin_memory: bool = False
    skipped: int = 0
    sample_shape: tuple[int, ...] = field(default=())

    @classmethod
    def from_tensor(cls, x: torch.Tensor, pre: Preprocess) -> "UnlabelledSet":
        """Raw inputs already in memory (uint8 images, or arrays)."""
        return cls(InputIndex(Path("."), []), pre, list(range(x.shape[0])), x, sample_shape=tuple(x.shape[1:]))

    def __len__(self) -> int:
        return len(self.positions) if self.cache is None else self.cache.shape[0]

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        if len(order) == 0:  # (``split`` of an empty order would yield one empty batch)
            return
        if self.cache is not None:
            for idx in order.split(batch_size):
                yield self.cache[idx]
            return
        dataset = FolderDataset(self.index, self.pre, self.positions)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=self.workers,
            collate_fn=collate, pin_memory=self.pin_memory, persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(0),  # worker seeds: never from the global RNG
        )
        for xs, _, nbad in loader:
            self.skipped += nbad
            if xs is not None:
                yield xs


def open_unlabelled(index: InputIndex, pre: Preprocess, positions: list[int], cache_mb: float = 1024,
                    workers: int | None = None, pin_memory: bool = False) -> UnlabelledSet:
    """Cache the inputs at ``positions`` if their decoded size fits ``cache_mb``, else stream them."""
    workers = default_workers() if workers is None else workers
    dataset = FolderDataset(index, pre, positions)
    sample = next((x for x, _ in (dataset[i] for i in range(min(len(dataset), 64))) if x is not None), None)
    estimate = sample.numel() * sample.element_size() * len(positions) / 2**20 if sample is not None else 0.0
    if sample is None or estimate <= cache_mb:  # (nothing readable up front: reading all says why)
        inputs = load_inputs(index, pre, positions, workers)
        return UnlabelledSet(index, pre, positions, inputs.x, skipped=inputs.skipped, sample_shape=tuple(inputs.x.shape[1:]))
    return UnlabelledSet(index, pre, positions, None, workers, pin_memory, sample_shape=tuple(sample.shape))


def open_distill_data(
    root: str | os.PathLike, pre: Preprocess, val_fraction: float = 0.0, seed: int = 0,
    cache_mb: float = 1024, workers: int | None = None, pin_memory: bool = False,
) -> tuple[UnlabelledSet, torch.Tensor | None]:
    """The unlabelled folder as a training set S, and the held-out raw inputs (or None).

    For images without a set size, ``pre.size`` becomes the size found, so that the bundle
    records what the student was made for.
    """
    index = index_folder(root, labelled=False)
    train_pos, val_pos = split_positions(len(index), val_fraction, seed)
    train = open_unlabelled(index, pre, train_pos, cache_mb, workers, pin_memory)
    if index.kind == "image" and pre.size is None:
        pre.size = tuple(train.sample_shape[1:])
    val = load_inputs(index, pre, val_pos).x if val_pos else None
    return train, val


def input_spec(pre: Preprocess, sample: torch.Tensor) -> dict:
    """Shape (without the batch) and dtype of the model input that ``sample`` (raw) becomes."""
    x = pre.prepare(sample[:1])
    return {"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch.")}


def spec_example(spec: dict, batch: int = 2) -> torch.Tensor:
    """An input matching an :func:`input_spec`: seeded normal floats, or zeros for integer inputs."""
    dtype = getattr(torch, spec["dtype"])
    if dtype.is_floating_point:
        return example_input(tuple(spec["shape"]), batch).to(dtype)
    return torch.zeros((batch, *spec["shape"]), dtype=dtype)


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
    keep = torch.rand(shape, generator=generator, device="cpu").to(x.device) >= p
    return x * keep


def flip(x: torch.Tensor, dims: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of an (N, C, H, W) batch horizontally ("h") and/or vertically ("v"), each
    with probability 1/2 per image."""
    if x.dim() != 4:
        return x
    for axis, dim in (("h", 3), ("v", 2)):
        if axis in dims:
            chosen = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
            x = torch.where(chosen.view(-1, 1, 1, 1), x.flip(dim), x)
    return x


def perturbation(zero: float = 0.0, flips: str = "", generator: torch.Generator | None = None):
    """The perturbation of S as one callable: flips, then pixels zeroed with probability ``zero``."""
    if zero <= 0 and not flips:
        return None

    def perturb(x: torch.Tensor) -> torch.Tensor:
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

