"""Loading checkpoints: state dicts with --arch, bundles, TorchScript, and the errors on the way."""

import os

import pytest
import torch

import tiny_arch
from conftest import ARCH, TESTS
from ddtool.checkpoint import load_model, parse_arch_args, save_bundle
from ddtool.errors import CheckpointError


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_state_dict_with_file_arch(tiny_ckpt, tiny_model):
    loaded = load_model(tiny_ckpt, arch=ARCH)
    assert loaded.format == "state-dict" and not loaded.model.training
    assert _same_weights(loaded.model, tiny_model)
    assert len(loaded.sha256) == 64


def test_state_dict_with_module_arch(tiny_ckpt, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    assert load_model(tiny_ckpt, arch="tiny_arch:tiny").format == "state-dict"


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": {"state_dict": sd}, "epoch": 3},
    lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
])
def test_nested_and_prefixed_state_dicts(tmp_path, tiny_model, wrap):
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(tiny_model.state_dict()), path)
    assert _same_weights(load_model(path, arch=ARCH).model, tiny_model)


def test_state_dict_without_arch_says_what_to_pass(tiny_ckpt):
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(tiny_ckpt)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["5.weight"] = torch.zeros(16, 5)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, arch=ARCH)
    msg = str(info.value)
    assert "missing 1 (0.bias)" in msg and "unexpected 1 (extra.weight)" in msg and "5.weight (16, 5) vs (16, 96)" in msg


def test_arch_args_are_passed(tmp_path):
    model = tiny_arch.tiny(classes=5)
    path = tmp_path / "five.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch=ARCH, arch_args=parse_arch_args('{"classes": 5}'))
    assert loaded.model[-1].out_features == 5


@pytest.mark.parametrize("spec, message", [
    ("nowhere.py:tiny", "file not found"),
    (f"{TESTS / 'tiny_arch.py'}:missing", "no callable named 'missing'"),
    (f"{TESTS / 'tiny_arch.py'}:broken", "factory raised ValueError: unknown width 7"),
    ("tiny_arch", "must look like"),
    ("no_such_package_xyz.mod:fn", "failed to import"),
])
def test_arch_errors(tiny_ckpt, spec, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(tiny_ckpt, arch=spec)


def test_bad_arch_args():
    with pytest.raises(CheckpointError, match="JSON"):
        parse_arch_args("{classes: 5}")
    with pytest.raises(CheckpointError, match="object"):
        parse_arch_args("[1, 2]")


def test_bundle_round_trip_needs_no_arch(tmp_path, tiny_model):
    path = save_bundle(tmp_path / "b" / "model.pt", tiny_model, arch=ARCH,
                       preprocess={"channels": 1, "size": [8, 8], "mean": [0.0], "std": [1.0]},
                       provenance={"teacher_sha256": "ab" * 32})
    loaded = load_model(path.parent)  # the folder works as well as the file
    assert loaded.format == "ddtool-bundle" and _same_weights(loaded.model, tiny_model)
    assert loaded.preprocess["size"] == [8, 8]
    assert loaded.provenance["teacher_sha256"] == "ab" * 32 and "ddtool_version" in loaded.provenance


def test_bundle_refuses_to_overwrite_without_force(tmp_path, tiny_model):
    path = save_bundle(tmp_path / "model.pt", tiny_model, arch=ARCH)
    with pytest.raises(Exception, match="already exists"):
        save_bundle(path, tiny_model, arch=ARCH)
    save_bundle(path, tiny_model, arch=ARCH, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_torchscript_needs_no_arch(tmp_path, tiny_model):
    path = tmp_path / "scripted.bin"
    torch.jit.script(tiny_model).save(str(path))
    loaded = load_model(path)
    assert loaded.format == "torchscript"
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(loaded.model(x), tiny_model.eval()(x))


class Evil:
    def __reduce__(self):
        return (os.makedirs, ("PWNED_DIR",))


def test_pickled_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"weights": Evil()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_model(path, arch=ARCH)
    assert not (tmp_path / "PWNED_DIR").exists()


def test_full_module_pickle_is_refused_with_the_remedy(tmp_path, tiny_model):
    path = tmp_path / "full.pt"
    torch.save(tiny_model, path)
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules.*state_dict\(\)"):
        load_model(path)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"hello, I am a text file\n", "not a format ddtool reads"),
    (b"PK\x03\x04garbage", "damaged or truncated"),
])
def test_unreadable_checkpoints(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, arch=ARCH)


def test_truncated_checkpoint(tmp_path, tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(path, arch=ARCH)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_legacy_pickle_format_is_read(tmp_path, tiny_model):
    path = tmp_path / "legacy.pt"
    torch.save(tiny_model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert load_model(path, arch=ARCH).format == "state-dict"
