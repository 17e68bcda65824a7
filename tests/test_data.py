"""Reading folders of inputs, preprocessing and perturbation."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from ddtool.data import (Preprocess, flip, index_folder, open_distill_data, read_folder, resolve_preprocess,
                         split_positions, zero_pixels)
from ddtool.errors import DataError, UsageError


def test_unlabelled_folder_is_read_recursively(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "a" / "deeper", 2, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an input")
    inputs = read_folder(tmp_path / "a", Preprocess(), labelled=False)
    assert inputs.x.shape == (5, 1, 8, 8) and inputs.x.dtype == torch.uint8 and inputs.labels is None
    x = Preprocess().prepare(inputs.x)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_class_subfolders_are_labels(labelled):
    inputs = read_folder(labelled, Preprocess())
    assert inputs.classes == ["0_class", "1_class", "2_class"]
    assert inputs.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_pixel_values_survive(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(arr).save(tmp_path / "ramp.png")
    x = read_folder(tmp_path, Preprocess()).x
    assert torch.equal(x[0, 0], torch.from_numpy(arr))
    assert torch.allclose(Preprocess().prepare(x)[0, 0], torch.from_numpy(arr / 255.0).float())


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
    with pytest.raises(DataError, match="different shapes"):
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


def test_arrays_npy_npz_and_pt(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4), np.float64))
    np.savez(tmp_path / "b.npz", first=np.zeros((3, 4), np.float32), second=np.full((3, 4), 2.0))
    torch.save(torch.full((3, 4), 3.0), tmp_path / "c.pt")
    inputs = read_folder(tmp_path, Preprocess())
    assert inputs.x.dtype == torch.float32 and inputs.x.shape == (4, 3, 4)
    assert inputs.x[:, 0, 0].tolist() == [1.0, 0.0, 2.0, 3.0]
    assert torch.equal(Preprocess().prepare(inputs.x), inputs.x)  # arrays are used as they are


def test_integer_arrays_stay_integers(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(6, dtype=np.int32))
    x = read_folder(tmp_path, Preprocess()).x
    assert x.dtype == torch.int64 and Preprocess().prepare(x).dtype == torch.int64


def test_nan_arrays_are_an_error(tmp_path):
    np.save(tmp_path / "ok.npy", np.zeros(4))
    np.save(tmp_path / "bad.npy", np.array([0.0, np.nan, 1.0, np.inf]))
    with pytest.raises(DataError, match="NaN or infinite"):
        read_folder(tmp_path, Preprocess())


def test_pickled_arrays_are_not_loaded(tmp_path):
    for i in range(10):
        np.save(tmp_path / f"ok{i}.npy", np.zeros(4))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    inputs = read_folder(tmp_path, Preprocess())
    assert len(inputs) == 10 and inputs.skipped == 1


def test_images_and_arrays_do_not_mix(tmp_path):
    write_images(tmp_path, 2)
    np.save(tmp_path / "a.npy", np.zeros(4))
    with pytest.raises(DataError, match="mixes images and arrays"):
        index_folder(tmp_path)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    write_images(tmp_path, 2)
    write_images(tmp_path / ".cache", 3)
    (tmp_path / ".img.png").write_bytes(b"junk")
    assert len(index_folder(tmp_path)) == 2


def test_flips_mirror_whole_images():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    y = flip(x, "h", torch.Generator().manual_seed(0))
    flipped = (y != x).flatten(1).any(1)
    assert torch.equal(y[flipped], x[flipped].flip(3)) and 0.3 < flipped.float().mean() < 0.7


def test_split_is_seeded_and_disjoint():
    train, val = split_positions(100, 0.2, seed=1)
    assert len(val) == 20 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_positions(100, 0.2, seed=1) == (train, val) and split_positions(100, 0.2, seed=2) != (train, val)
    with pytest.raises(DataError, match="leaves no inputs"):
        split_positions(3, 0.2, seed=0)


def test_distill_data_records_the_image_size(tmp_path):
    write_images(tmp_path, 10, size=6)
    pre = Preprocess()
    train, val = open_distill_data(tmp_path, pre, val_fraction=0.2)
    assert pre.size == (6, 6) and len(train) == 8 and val.shape == (2, 1, 6, 6)
