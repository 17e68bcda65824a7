"""Folders of inputs -> tensors: reading, preprocessing, and the perturbations of the paper.

A folder is *labelled* when its inputs sit in one subfolder per class and none lie at its top;
the label of a subfolder is its position in the sorted list of subfolder names (the
torchvision ``ImageFolder`` convention, so ``0_tshirt, 1_trouser, ...`` map to 0, 1, ...).
Any other folder is read recursively as unlabelled inputs.

Images are scaled to [0, 1], converted to the model's channel count, resized if a size is set,
and normalised with ``(x - mean) / std`` per channel. The perturbation of the unlabelled set S in
Bulo et al. (2016, Sec. 5.1) zeroes each pixel independently with probability p = 0.2; it acts on
the [0, 1] image, before normalisation, so "zero" means a black pixel.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from .errors import DataError, UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Above this share of unreadable files a folder is refused rather than read partially.
MAX_BAD_SHARE = 0.1


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
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


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


@dataclass
class Inputs:
    """A folder read into memory: images in [0, 1] (not yet normalised), and labels if any."""

    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    paths: list[Path]
    labels: torch.Tensor | None = None  # (N,) int64
    classes: list[str] | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)


def _is_input(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def list_inputs(root: Path) -> list[Path]:
    """Every input file under ``root``, recursively, in a stable order."""
    return sorted(p for p in root.rglob("*") if _is_input(p))


def _class_dirs(root: Path) -> list[Path] | None:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs or any(_is_input(p) for p in root.iterdir()):
        return None
    with_inputs = [d for d in subdirs if any(_is_input(p) for p in d.rglob("*"))]
    return with_inputs if len(with_inputs) >= 2 else None


def read_image(path: Path, pre: Preprocess) -> torch.Tensor:
    """One image as a (C, H, W) float tensor in [0, 1]. Raises OSError/ValueError if unreadable."""
    with Image.open(path) as img:
        img.load()
        img = img.convert("L" if pre.channels == 1 else "RGB")
        if pre.size is not None and img.size != (pre.size[1], pre.size[0]):
            img = img.resize((pre.size[1], pre.size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_folder(root: str | os.PathLike, pre: Preprocess, labelled: bool | None = None, limit: int | None = None) -> Inputs:
    """Read every input of ``root``; detect class subfolders unless ``labelled`` says otherwise.

    ``limit`` reads only the first that many files (an example input, say).

    Unreadable files are skipped with one warning; more than ``MAX_BAD_SHARE`` of them, or none
    readable at all, is a :class:`DataError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    class_dirs = _class_dirs(root) if labelled is not False else None
    if labelled and class_dirs is None:
        raise DataError(f"{root} has no class subfolders (one subfolder of inputs per class)")
    if class_dirs:
        files = [(p, i) for i, d in enumerate(class_dirs) for p in list_inputs(d)]
    else:
        files = [(p, None) for p in list_inputs(root)]
    if not files:
        raise DataError(f"no readable inputs in {root} (looked for {', '.join(IMAGE_EXTS)})")
    files = files[:limit] if limit else files

    tensors, paths, labels, bad = [], [], [], []
    for path, label in files:
        try:
            tensors.append(read_image(path, pre))
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError):
            bad.append(path)
            continue
        paths.append(path)
        labels.append(label)
    if not tensors:
        raise DataError(f"no readable inputs in {root}: all {len(files)} files failed to decode")
    if len(bad) > MAX_BAD_SHARE * len(files):
        raise DataError(f"{len(bad)} of {len(files)} files in {root} are unreadable (more than {MAX_BAD_SHARE:.0%}), e.g. {bad[0]}")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable file(s) in {root}, e.g. {bad[0].name}", file=sys.stderr)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(f"inputs in {root} have different sizes ({a[1]}x{a[2]} and {b[1]}x{b[2]}); set a size with --size H,W")
    return Inputs(
        x=torch.stack(tensors),
        paths=paths,
        labels=torch.tensor(labels) if class_dirs else None,
        classes=[d.name for d in class_dirs] if class_dirs else None,
        skipped=len(bad),
    )


def example_input(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch of ``shape`` (without the batch axis), to run a model once."""
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def zero_pixels(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Set each pixel (all its channels) of an (N, C, H, W) batch to zero with probability ``p``."""
    if p <= 0:
        return x
    keep = torch.rand((x.shape[0], 1, *x.shape[2:]), generator=generator, device=x.device) >= p
    return x * keep
