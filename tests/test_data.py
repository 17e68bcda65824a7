"""Reading folders of inputs, preprocessing and perturbation."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from ddtool.data import Preprocess, read_folder, resolve_preprocess, zero_pixels
from ddtool.errors import DataError, UsageError


def test_unlabelled_folder_is_read_recursively(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "a" / "deeper", 2, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an input")
    inputs = read_folder(tmp_path / "a", Preprocess(), labelled=False)
    assert inputs.x.shape == (5, 1, 8, 8) and inputs.labels is None
    assert 0 <= inputs.x.min() and inputs.x.max() <= 1


def test_class_subfolders_are_labels(labelled):
    inputs = read_folder(labelled, Preprocess())
    assert inputs.classes == ["0_class", "1_class", "2_class"]
    assert inputs.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_pixel_values_survive(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(arr).save(tmp_path / "ramp.png")
    x = read_folder(tmp_path, Preprocess()).x
    assert torch.allclose(x[0, 0], torch.from_numpy(arr / 255.0).float())


def test_rgb_and_resize(tmp_path):
    write_images(tmp_path, 2, mode="RGB", size=10)
    x = read_folder(tmp_path, Preprocess(channels=3, size=(8, 6))).x
    assert x.shape == (2, 3, 8, 6)
    assert read_folder(tmp_path, Preprocess(channels=1)).x.shape == (2, 1, 10, 10)


def test_corrupt_files_are_skipped_with_a_warning(tmp_path, capsys):
    write_images(tmp_path, 20)
    (tmp_path / "zero.png").write_bytes(b"")
    inputs = read_folder(tmp_path, Preprocess())
    assert len(inputs) == 20 and inputs.skipped == 1
    assert "skipped 1 unreadable" in capsys.readouterr().err


def test_too_many_corrupt_files_is_an_error(tmp_path):
    write_images(tmp_path, 3)
    for i in range(2):
        (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="2 of 5 files"):
        read_folder(tmp_path, Preprocess())


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no readable inputs"),
    (lambda p: (p / "readme.md").write_text("hi"), "no readable inputs"),
    (lambda p: (p / "x.png").write_bytes(b"junk"), "all 1 files failed"),
])
def test_folders_without_inputs(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        read_folder(tmp_path, Preprocess())


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_folder(tmp_path / "nope", Preprocess())


def test_mixed_sizes_ask_for_size(tmp_path):
    write_images(tmp_path / "d", 2, size=8)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "d" / "big.png")
    with pytest.raises(DataError, match="--size"):
        read_folder(tmp_path / "d", Preprocess())
    assert read_folder(tmp_path / "d", Preprocess(size=(8, 8))).x.shape == (3, 1, 8, 8)


def test_normalize_per_channel():
    pre = Preprocess(channels=3, mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 2.0))
    x = torch.ones(1, 3, 2, 2)
    assert pre.normalize(x)[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_bad_preprocess_settings():
    with pytest.raises(UsageError, match="channels"):
        Preprocess(channels=2)
    with pytest.raises(UsageError, match="std"):
        Preprocess(std=(0.0,))
    with pytest.raises(UsageError, match="mean needs 1 or 3"):
        Preprocess(channels=3, mean=(0.1, 0.2))


def test_preprocess_defaults_from_model_and_bundle(tiny_model):
    assert resolve_preprocess(tiny_model).channels == 1
    recorded = Preprocess(channels=1, size=(8, 8), mean=(0.2,), std=(0.3,)).as_dict()
    pre = resolve_preprocess(tiny_model, recorded)
    assert pre.size == (8, 8) and pre.mean == (0.2,)
    assert resolve_preprocess(tiny_model, recorded, mean=(0.0,)).mean == (0.0,)


def test_zero_pixels_rate_and_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(64, 3, 16, 16)
    y = zero_pixels(x, 0.2, gen)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.01
    assert torch.equal(y[:, 0], y[:, 1])  # a pixel is zeroed in all its channels
    assert torch.equal(zero_pixels(x, 0.0, gen), x)
