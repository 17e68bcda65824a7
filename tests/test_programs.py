"""torch.export programs exported in train mode, TorchScript archives and timm-like models:
every random op found and switched, the input channels the file records, a statistical
dropout-activity check, and a TorchScript trace that fixed the batch size."""

from __future__ import annotations


import pytest
import torch
from typer.testing import CliRunner

import timm_like
from conftest import TESTS, write_images
from ddtool.checkpoint import load_model
from ddtool.cli import app
from ddtool.data import model_channels, resolve_preprocess
from ddtool.dropout import ACTIVITY_PAIRS, check_dropout, deterministic, find_dropout, mc_mode
from ddtool.errors import CheckpointError, ExportError, NoDropoutError
from ddtool.exporting import export
from ddtool.pipeline import distill_to_folder, export_checkpoint, inspect_checkpoint
from ddtool.distillation import DistillConfig

TIMM = f"{TESTS / 'timm_like.py'}"


def _trained_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Running statistics that are not the initial ones, so that using them shows."""
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, 16, 16) * 2 + 1)
    return model


def _export_train_mode(model, path, decompose: bool = False):
    program = torch.export.export(model.train(), (torch.randn(2, 3, 16, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program.run_decompositions() if decompose else program, str(path))
    return path


# --------------------------------------------------------------------------- .pt2 in train mode
@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "core-aten"])
def test_train_mode_program_switches_every_random_op(tmp_path, decompose, capfd):
    torch.manual_seed(0)
    model = _trained_stats(timm_like.vit(batch_norm=True, old_drop_path=True))
    stats = model.stem_norm.running_mean.clone()
    loaded = load_model(_export_train_mode(model, tmp_path / "vit.pt2", decompose))
    assert "1 batch norm(s) run on their running statistics" in capfd.readouterr().err
    program = loaded.model
    sites = {(s.name, s.kind): s for s in find_dropout(program, loaded.example)}
    attention = "native_dropout" if decompose else "scaled_dot_product_attention"  # SDPA is decomposed in core ATen
    assert sites[("program.blocks.0.attn", attention)].p == pytest.approx(0.1)
    assert sites[("program.blocks.0.drop_path", "DropPath")].p == pytest.approx(0.05)
    assert not sites[("program.blocks.0.drop_path", "DropPath")].sampled  # drop paths: only on request
    old = sites[("program.blocks.1.drop_path", "rand")]  # floor(keep + rand), in a module not named DropPath
    assert old.p == pytest.approx(0.1) and old.found_by == "functional" and old.sampled
    assert sites[("program.head_drop", "dropout" if not decompose else "native_dropout")].p == pytest.approx(0.1)
    assert program.batch_norms_turned == 1
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model.eval()(x)
        with deterministic(program):  # eval mode: no op draws, batch norm on running statistics
            assert torch.allclose(program(x), expected, atol=1e-5)
            assert torch.allclose(program(x[:1]), expected[:1], atol=1e-5)  # batch-independent
        with mc_mode(program):
            assert not torch.equal(program(x), program(x))
        with mc_mode(program, sample_drop_path=True):
            assert not torch.equal(program(x), program(x))
        assert torch.allclose(program(x), expected, atol=1e-5)  # and back
    assert torch.equal(program.program.stem_norm.running_mean, stats)  # never updated
    check_dropout(program, loaded.example)


def test_only_drop_paths_are_sampled_when_asked(tmp_path):
    torch.manual_seed(0)
    model = timm_like.vit(drop=0.0, drop_path_rate=0.5)  # no dropout but the drop paths
    loaded = load_model(_export_train_mode(model, tmp_path / "vit.pt2"))
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad(), mc_mode(loaded.model):
        assert torch.equal(loaded.model(x), loaded.model(x))
    with torch.no_grad(), mc_mode(loaded.model, sample_drop_path=True):
        assert not torch.equal(loaded.model(x), loaded.model(x))
    with pytest.raises(NoDropoutError, match="--sample-drop-path"):
        check_dropout(loaded.model, loaded.example)
    check_dropout(loaded.model, loaded.example, sample_drop_path=True)


class Noisy(torch.nn.Module):
    """Gaussian noise in training: a random op that has no deterministic switch."""

    def __init__(self):
        super().__init__()
        self.fc, self.drop = torch.nn.Linear(8, 3), torch.nn.Dropout(0.2)

    def forward(self, x):
        return self.fc(self.drop(x + torch.randn_like(x) * 0.1 if self.training else x))


class HandWritten(torch.nn.Module):
    """Dropout written by hand with ``torch.bernoulli`` of a probability tensor."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        if self.training:
            x = x * torch.bernoulli(torch.full_like(x, 0.75)) / 0.75
        return self.fc(x)


def test_program_with_bernoulli_of_probabilities_is_switched(tmp_path):
    torch.manual_seed(0)
    model = HandWritten()
    program = torch.export.export(model.train(), (torch.randn(2, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "hand.pt2"))
    loaded = load_model(tmp_path / "hand.pt2")
    assert [(s.kind, s.p) for s in find_dropout(loaded.model)] == [("bernoulli", 0.25)]
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-6)
        with mc_mode(loaded.model):
            assert not torch.equal(loaded.model(x), loaded.model(x))


def test_program_with_a_random_op_that_cannot_be_switched_is_refused(tmp_path):
    program = torch.export.export(Noisy().train(), (torch.randn(2, 8),))
    torch.export.save(program, str(tmp_path / "noisy.pt2"))
    with pytest.raises(CheckpointError, match="randn_like.*--arch"):
        load_model(tmp_path / "noisy.pt2")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "noisy.pt2")])
    assert result.exit_code == 3 and result.output.strip().splitlines()[-1].startswith("error:")
    assert "randn_like (in the top-level module)" in result.output


def test_program_channels_come_from_its_example_input(tmp_path):
    torch.manual_seed(0)
    model = timm_like.vit()
    path = _export_train_mode(model, tmp_path / "vit.pt2")
    loaded = load_model(path)
    assert resolve_preprocess(loaded.model).channels == 3
    assert loaded.input_spec == {"shape": [3, 16, 16], "dtype": "float32"}
    result = export_checkpoint(path, tmp_path / "vit.onnx", "onnx")  # no --input-shape needed
    assert result.input_shape == [3, 16, 16] and result.max_abs_diff < 1e-4


@pytest.mark.slow
def test_train_mode_program_distills_and_exports(tmp_path):
    """From the .pt2 to an ONNX file that matches the deterministic student."""
    torch.manual_seed(0)
    path = _export_train_mode(_trained_stats(timm_like.vit(batch_norm=True)), tmp_path / "vit.pt2")
    write_images(tmp_path / "data", 12, size=16, mode="RGB")
    result = distill_to_folder(path, tmp_path / "data", tmp_path / "out", DistillConfig(epochs=1, batch_size=6),
                               export=["onnx"])
    assert result.exports[0].max_abs_diff < 1e-4


# --------------------------------------------------------------------------- TorchScript
def _archive(module: torch.nn.Module, path) -> torch.nn.Module:
    torch.jit.save(module, str(path))
    return load_model(path).model


@pytest.mark.parametrize("name", ["resnet", "efficientnet", "mobilenetv3"])
def test_scripted_functional_dropout_is_found_from_the_graph(tmp_path, name):
    torch.manual_seed(0)
    model = _archive(torch.jit.script(getattr(timm_like, name)().eval()), tmp_path / "m.ts")
    sites = find_dropout(model, torch.randn(2, 3, 16, 16))
    assert ("<root>", "F.dropout", "functional") in [(s.name, s.kind, s.found_by) for s in sites]
    assert next(s.p for s in sites if s.kind == "F.dropout") == pytest.approx(0.3 if name == "resnet" else 0.2)
    check_dropout(model, torch.randn(2, 3, 16, 16))
    assert resolve_preprocess(model).channels == 3  # from its first convolution


def test_scripted_vit_attention_and_drop_paths_are_found(tmp_path):
    torch.manual_seed(0)
    model = _archive(torch.jit.script(timm_like.vit().eval()), tmp_path / "vit.ts")
    found = {(s.name, s.kind, s.p, s.sampled) for s in find_dropout(model)}
    assert ("blocks.0.attn", "scaled_dot_product_attention", 0.1, True) in found  # p of ``p if self.training else 0.``
    assert ("blocks.1.drop_path", "DropPath", 0.1, False) in found


def test_scripted_archive_without_dropout_says_what_to_pass(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3))
    torch.jit.save(torch.jit.script(model), str(tmp_path / "plain.ts"))
    found = inspect_checkpoint(tmp_path / "plain.ts")
    assert "--arch" in found.no_dropout and "--input-shape" not in found.no_dropout
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "plain.ts")])
    assert result.exit_code == 4 and "--input-shape" not in result.output


def test_traced_archive_channels_count_grouped_convolutions(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Dropout(0.5))
    traced = _archive(torch.jit.trace(model.eval(), torch.randn(1, 4, 6, 6)), tmp_path / "t.ts")
    assert model_channels(traced) == 4


# --------------------------------------------------------------------------- the activity check
@pytest.mark.parametrize("rows", [1, 2])
def test_a_single_drop_path_of_rate_0_05_is_detected_whatever_the_masks_drawn(monkeypatch, rows):
    """With one DropPath of rate 0.05 as the only sampled site, two passes over a batch of 2
    agree with probability 0.905^2 = 0.82; the check compares 256 pairs, and must see the
    variation for every seed of its random stream (it seeds itself: each seed is another draw)."""
    torch.manual_seed(0)
    model = _trained_stats(timm_like.single_drop_path(rate=0.05)).eval()
    x = torch.randn(rows, 3, 16, 16)
    real_seed = torch.manual_seed
    for seed in range(20):
        monkeypatch.setattr(torch, "manual_seed", lambda _s, seed=seed: real_seed(1000 + seed))
        check_dropout(model, x, sample_drop_path=True)
    monkeypatch.setattr(torch, "manual_seed", real_seed)
    with pytest.raises(NoDropoutError, match="--sample-drop-path"):
        check_dropout(model, x)


def test_outputs_that_never_vary_are_refused_after_all_pairs():
    torch.manual_seed(0)
    model = timm_like.single_drop_path(rate=0.05).eval()
    torch.nn.init.zeros_(model.body[1].pw[1].weight)  # the branch is zero: dropping it changes nothing
    torch.nn.init.zeros_(model.body[1].pw[1].bias)
    calls = []
    model.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    with pytest.raises(NoDropoutError, match=f"{ACTIVITY_PAIRS} inputs compared"):
        check_dropout(model, torch.randn(2, 3, 16, 16), sample_drop_path=True)
    assert sum(calls[2:]) // 2 >= ACTIVITY_PAIRS  # (after the two discovery passes)


def test_convnext_with_drop_path_rate_0_1_distills_with_sample_drop_path(tmp_path):
    torch.manual_seed(0)
    torch.save(timm_like.convnext(drop_path_rate=0.1).state_dict(), tmp_path / "convnext.pt")
    write_images(tmp_path / "data", 8, size=16, mode="RGB")
    args = ["distill", str(tmp_path / "convnext.pt"), "--arch", f"{TIMM}:convnext", "--data", str(tmp_path / "data"),
            "--epochs", "1", "--batch-size", "4"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 4 and "--sample-drop-path" in refused.output
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--sample-drop-path"])
    assert done.exit_code == 0, done.output


# --------------------------------------------------------------------------- a trace that fixes the batch
def test_torchscript_export_of_a_trace_that_fixes_the_batch_is_scripted(tmp_path, capfd):
    torch.manual_seed(0)
    model = timm_like.vit(fixed_batch=True).eval()
    result = export(model, tmp_path / "vit.ts", "torchscript", (3, 16, 16))
    assert "scripted instead" in capfd.readouterr().err
    reloaded = torch.jit.load(str(tmp_path / "vit.ts"))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x), atol=1e-5) and result.max_abs_diff < 1e-4


def test_a_trace_that_fixes_the_batch_and_cannot_be_scripted_is_export_error(tmp_path):
    torch.manual_seed(0)
    torch.save(timm_like.vit(fixed_batch=True).state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ExportError, match="fixed the batch size at 2"):
        export_checkpoint(tmp_path / "vit.pt", tmp_path / "vit.ts", "torchscript", arch=f"{TIMM}:vit",
                          arch_args={"fixed_batch": True}, input_shape=(3, 16, 16), probabilities=True)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "vit.pt"), "--arch", f"{TIMM}:vit", "--arch-args",
                                      '{"fixed_batch": true}', "--input-shape", "3,16,16", "--format", "torchscript",
                                      "--probabilities", "--out", str(tmp_path / "vit.ts")])
    assert result.exit_code == 7 and "fixed the batch size" in result.output
    assert not (tmp_path / "vit.ts").exists()


# --------------------------------------------------------------------------- timm state dicts end to end
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "resnet", "efficientnet", "mobilenetv3"])
def test_timm_like_state_dicts_from_inspect_to_export(tmp_path, name):
    torch.manual_seed(0)
    torch.save(_trained_stats(getattr(timm_like, name)()).state_dict(), tmp_path / "model.pt")
    arch = f"{TIMM}:{name}"
    found = inspect_checkpoint(tmp_path / "model.pt", arch, input_shape=(3, 16, 16))
    assert found.no_dropout is None and any(s.found_by in ("functional", "attention") for s in found.sites)
    write_images(tmp_path / "data", 8, size=16, mode="RGB")
    result = distill_to_folder(tmp_path / "model.pt", tmp_path / "data", tmp_path / "out",
                               DistillConfig(epochs=1, batch_size=4), arch=arch, export=["onnx", "torchscript"])
    assert [e.format for e in result.exports] == ["onnx", "torchscript"]
    assert all(e.max_abs_diff < 1e-4 for e in result.exports)
    program = load_model(tmp_path / "out")  # the bundle's code-free program
    assert program.arch_ref["kind"] == "torch-export"
    with torch.no_grad(), deterministic(program.model):
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(program.model(x), program.model(x))


class Unscriptable(torch.nn.Module):
    """Fixes the batch as an int when traced, and uses Python TorchScript cannot compile."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1)) * len(type(self).__name__)


def test_a_trace_that_fixes_the_batch_of_a_model_that_does_not_script_is_export_error(tmp_path):
    with pytest.raises(ExportError, match="fixed the batch size at 2.*scripting failed too"):
        export(Unscriptable(), tmp_path / "m.ts", "torchscript", (3, 4))
    assert not (tmp_path / "m.ts").exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["resnet", "tiny"])
def test_archive_traced_in_train_mode_is_refused(tmp_path, name):
    """Traced in train mode, dropout is recorded as always on: no deterministic model exists."""
    import tiny_arch

    torch.manual_seed(0)
    model, x = (timm_like.resnet(), torch.randn(2, 3, 16, 16)) if name == "resnet" else (tiny_arch.tiny(), torch.randn(2, 1, 8, 8))
    archive = _archive(torch.jit.trace(model.train(), x, check_trace=False), tmp_path / "t.ts")
    with pytest.raises(CheckpointError, match="always drops units"):
        check_dropout(archive, x)
