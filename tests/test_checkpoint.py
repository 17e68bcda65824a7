"""Loading checkpoints: state dicts with --arch, bundles, TorchScript, and the errors on the way."""

import os
import pickle

import pytest
import torch

import tiny_arch
from conftest import ARCH, TESTS
from ddtool.arch import factory_ref, parse_arch_args
from ddtool.checkpoint import load_model, pickle_globals, save_bundle
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
    from ddtool.errors import UsageError

    with pytest.raises(UsageError, match="JSON"):
        parse_arch_args("{classes: 5}")
    with pytest.raises(UsageError, match="object"):
        parse_arch_args("[1, 2]")


def test_bundle_round_trip_needs_no_arch(tmp_path, tiny_model):
    path = save_bundle(tmp_path / "b" / "model.pt", tiny_model, arch_ref=factory_ref(ARCH),
                       preprocess={"channels": 1, "size": [8, 8], "mean": [0.0], "std": [1.0]},
                       input_spec={"shape": [1, 8, 8], "dtype": "float32"}, provenance={"teacher_sha256": "ab" * 32})
    loaded = load_model(path.parent)  # the folder works as well as the file; the program needs no code
    assert loaded.format == "ddtool-bundle" and loaded.arch_ref["kind"] == "torch-export"
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), tiny_model.eval()(x), atol=1e-6)
    assert loaded.preprocess["size"] == [8, 8]
    assert loaded.provenance["teacher_sha256"] == "ab" * 32 and "ddtool_version" in loaded.provenance
    with_arch = load_model(path, arch=ARCH)  # the same factory named: the module itself
    assert with_arch.arch_ref["kind"] == "factory" and _same_weights(with_arch.model, tiny_model)


def test_bundle_refuses_to_overwrite_without_force(tmp_path, tiny_model):
    path = save_bundle(tmp_path / "model.pt", tiny_model, arch_ref=factory_ref(ARCH))
    with pytest.raises(Exception, match="already exists"):
        save_bundle(path, tiny_model, arch_ref=factory_ref(ARCH))
    save_bundle(path, tiny_model, arch_ref=factory_ref(ARCH), force=True)
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


# --------------------------------------------------------------------------- more formats
def test_safetensors_with_arch(tmp_path, tiny_model):
    from safetensors.torch import save_file

    path = tmp_path / "weights.bin"  # the extension says nothing: the content does
    save_file({f"module.{k}": v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    loaded = load_model(path, arch=ARCH)
    assert loaded.format == "safetensors" and _same_weights(loaded.model, tiny_model)
    with pytest.raises(CheckpointError, match="safetensors; pass its architecture"):
        load_model(path)


def test_truncated_safetensors(tmp_path, tiny_model):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(tiny_model.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="safetensors file .* could not be read"):
        load_model(path, arch=ARCH)


def test_pickled_module_names_its_classes_and_loads_only_when_trusted(tmp_path, tiny_model):
    path = tmp_path / "full.pt"
    torch.save(tiny_model, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert "torch.nn.modules.container.Sequential" in str(info.value) and "--trust-checkpoint" in str(info.value)
    loaded = load_model(path, trust=True)
    assert loaded.format == "pickled-module" and _same_weights(loaded.model, tiny_model)


def test_pickle_globals_reads_without_unpickling(tmp_path):
    data = pickle.dumps({"x": Evil()}, protocol=4)
    assert "posix.makedirs" in pickle_globals(data) or "os.makedirs" in pickle_globals(data)
    assert pickle_globals(pickle.dumps({"a": 1}, protocol=2)) == []


def _bundle_via_distill(tmp_path, teacher, inputs=None, **kw):
    """Distil ``teacher`` (a path, or a model loaded already) for one epoch, save the student as a
    bundle with the teacher's architecture reference, and load the bundle back."""
    import ddtool

    loaded = teacher if isinstance(teacher, ddtool.LoadedModel) else load_model(teacher, **kw)
    pre = ddtool.Preprocess(size=(8, 8))
    inputs = torch.rand(8, 1, 8, 8) if inputs is None else inputs
    result = ddtool.distill(loaded.model, inputs, pre, ddtool.DistillConfig(epochs=1, batch_size=4))
    assert not _same_weights(result.student, loaded.model)  # it did distil
    save_bundle(tmp_path / "out" / "model.pt", result.student, arch_ref=loaded.arch_ref, preprocess=pre.as_dict())
    again = load_model(tmp_path / "out", trust=kw.get("trust", False))
    assert again.format == "ddtool-bundle" and _same_weights(again.model, result.student)
    return again


@pytest.mark.slow
def test_torchscript_teacher_gives_a_self_contained_bundle(tmp_path, tiny_model):
    path = tmp_path / "scripted.pt"
    torch.jit.script(tiny_model.eval()).save(str(path))
    _bundle_via_distill(tmp_path, path)
    path.unlink()  # the bundle carries the architecture: the teacher file is no longer needed
    assert load_model(tmp_path / "out").format == "ddtool-bundle"


def test_pickled_teacher_bundle_needs_trust_again(tmp_path, tiny_model):
    path = tmp_path / "full.pt"
    torch.save(tiny_model, path)
    _bundle_via_distill(tmp_path, path, trust=True)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(tmp_path / "out")


def _export(model, path, example):
    from torch.export import Dim, export, save

    save(export(model.eval(), (example,), dynamic_shapes=({0: Dim("batch")},)), str(path))


def test_torch_export_program_samples_dropout(tmp_path):
    from ddtool.dropout import find_dropout, mc_mode, require_dropout

    torch.manual_seed(0)
    model = tiny_arch.tiny()
    path = tmp_path / "program.pt2"
    _export(model, path, torch.randn(2, 1, 8, 8))
    loaded = load_model(path)
    assert loaded.format == "torch-export" and loaded.example.shape == (2, 1, 8, 8)
    sites = find_dropout(loaded.model, loaded.example)
    assert [(s.name, s.kind, s.p) for s in sites] == [("program.2", "dropout", 0.5), ("program.7", "dropout", 0.5)]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-6)
        with mc_mode(loaded.model):
            assert not torch.equal(loaded.model(x), loaded.model(x))
    require_dropout(loaded.model, loaded.example)
    again = _bundle_via_distill(tmp_path, path)
    assert again.arch_ref["kind"] == "torch-export"


def test_torch_export_program_without_dropout_is_refused(tmp_path):
    path = tmp_path / "plain.pt2"
    _export(tiny_arch.no_dropout(), path, torch.randn(2, 1, 8, 8))
    with pytest.raises(CheckpointError, match="no dropout op left"):
        load_model(path)


def _bert_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    transformers.BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_transformers_folder(tmp_path):
    from ddtool.dropout import find_dropout, require_dropout

    loaded = load_model(_bert_folder(tmp_path))
    assert loaded.format == "hf" and loaded.arch == "BertForSequenceClassification"
    sites = find_dropout(loaded.model, loaded.example)
    hidden = {s.name for s in sites if s.kind == "Dropout" and s.calls}
    assert "model.bert.embeddings.dropout" in hidden and "model.bert.encoder.layer.1.output.dropout" in hidden
    attention = sorted((s.name, s.kind) for s in sites if s.found_by == "attention")  # attention probabilities
    assert attention == [(f"model.bert.encoder.layer.{i}.attention.self", "scaled_dot_product_attention") for i in range(2)]
    require_dropout(loaded.model, loaded.example)
    logits = loaded.model(loaded.example)
    assert logits.shape == (loaded.example.shape[0], 3)
    again = _bundle_via_distill(tmp_path, loaded, inputs=loaded.example.repeat(3, 1, 1))  # token ids and mask, as they are
    assert again.arch_ref["kind"] == "hf"


def test_transformers_folder_without_the_extra(tmp_path, monkeypatch):
    folder = _bert_folder(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(CheckpointError, match=r"ddtool\[hf\]"):
        load_model(folder)


def test_folder_that_is_no_model(tmp_path):
    with pytest.raises(CheckpointError, match="neither a ddtool model.pt nor a transformers config.json"):
        load_model(tmp_path)


def test_damaged_torchscript_archive(tmp_path, tiny_model):
    import zipfile

    path = tmp_path / "scripted.pt"
    torch.jit.script(tiny_model.eval()).save(str(path))
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("constants.pkl"):
                dst.writestr(item, src.read(item.filename).replace(b"forward", b"forwerd") if "/code/" in item.filename else src.read(item.filename))
        dst.writestr("scripted/constants.pkl", b"")
    with pytest.raises(CheckpointError, match="could not be loaded as TorchScript"):
        load_model(broken)


def test_bundle_without_program_needs_the_same_factory(tmp_path, tiny_model):
    arch_file = tmp_path / "net.py"
    arch_file.write_text((TESTS / "tiny_arch.py").read_text())
    save_bundle(tmp_path / "b" / "model.pt", tiny_model, arch_ref=factory_ref(f"{arch_file}:tiny"), program=False)
    with pytest.raises(CheckpointError, match=f"pass --arch {arch_file}:tiny"):
        load_model(tmp_path / "b")
    with pytest.raises(CheckpointError, match="another factory"):
        load_model(tmp_path / "b", arch=f"{TESTS / 'tiny_arch.py'}:narrow")
    assert load_model(tmp_path / "b", arch=f"{arch_file}:tiny").format == "ddtool-bundle"
    arch_file.unlink()  # moved away: a file with the same content (SHA-256) is the same factory
    assert load_model(tmp_path / "b", arch=ARCH).format == "ddtool-bundle"
    (tmp_path / "other.py").write_text((TESTS / "tiny_arch.py").read_text() + "\n# changed\n")
    with pytest.raises(CheckpointError, match="another factory"):
        load_model(tmp_path / "b", arch=f"{tmp_path / 'other.py'}:tiny")


def test_torch_export_program_with_a_pickled_payload_runs_no_code(tmp_path, monkeypatch):
    import io
    import zipfile

    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pt2"
    _export(tiny_arch.tiny(), good, torch.randn(2, 1, 8, 8))
    evil = tmp_path / "evil.pt2"
    payload = io.BytesIO()
    torch.save((Evil(),), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = payload.getvalue() if "/sample_inputs/" in item.filename else src.read(item.filename)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_model(evil)
    assert not (tmp_path / "PWNED_DIR").exists()
