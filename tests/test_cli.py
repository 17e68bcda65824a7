"""Every command through typer's CliRunner: success, --json, and the user errors most likely to happen."""

import json
import re

import pytest
from typer.testing import CliRunner

from conftest import ARCH, NO_DROPOUT_ARCH, TESTS, write_images
from ddtool import __version__
from ddtool.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_version_and_help():
    assert run("--version").stdout.strip() == f"ddtool {__version__}"
    assert run("--help").exit_code == 0


@pytest.mark.parametrize("command", ["inspect", "distill", "evaluate", "export"])
def test_every_option_has_a_help_line(command):
    import typer.main

    click_cmd = typer.main.get_command(app).commands[command]
    assert click_cmd.help
    for param in click_cmd.params:
        assert getattr(param, "help", None), f"{command} {param.name} has no help"
    assert run(command, "--help").exit_code == 0


def test_inspect_table_and_json(tiny_ckpt):
    result = run("inspect", tiny_ckpt, "--arch", ARCH)
    assert result.exit_code == 0 and "Dropout" in result.stdout and "0.5" in result.stdout
    doc = json.loads(run("inspect", tiny_ckpt, "--arch", ARCH, "--json").stdout)
    assert doc["format"] == "state-dict" and [d["name"] for d in doc["dropout"]] == ["2", "7"]


def test_inspect_missing_checkpoint(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "missing.pt"), 3, "checkpoint not found")


def test_inspect_state_dict_needs_arch(tiny_ckpt):
    assert_one_line_error(run("inspect", tiny_ckpt), 3, "--arch")


def test_inspect_model_without_dropout(no_dropout_ckpt):
    assert_one_line_error(run("inspect", no_dropout_ckpt, "--arch", NO_DROPOUT_ARCH), 4, "no active dropout")


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "missing.pt")])
    assert result.exit_code != 0 and result.exception is not None


@pytest.mark.slow
def test_distill_evaluate_export_end_to_end(tmp_path, tiny_ckpt, unlabelled, labelled):
    before = tiny_ckpt.read_bytes()
    out = tmp_path / "distilled"
    result = run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", out,
                 "--epochs", 2, "--lr-drop-epoch", 1, "--batch-size", 16, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["inputs"] == 48 and len(doc["history"]) == 2 and doc["history"][1]["lr"] == pytest.approx(0.001)
    assert (out / "model.pt").is_file() and (out / "history.json").is_file()
    assert tiny_ckpt.read_bytes() == before  # the input checkpoint is never written to

    # the bundle needs no --arch from here on
    result = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--distilled", out, "--mc-samples", 5, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["method"] for r in report["results"]] == ["standard", "mc-5", "distilled"]
    assert report["labelled"] and report["inputs"] == 30
    table = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--distilled", out, "--mc-samples", 5)
    assert table.exit_code == 0 and "error %" in table.stdout and "distilled" in table.stdout

    result = run("export", out, "--format", "onnx", "--out", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing but the document on stdout
    assert doc["input_shape"] == [1, 8, 8] and doc["max_abs_diff"] <= 1e-4
    result = run("export", out, "--format", "torchscript", "--out", tmp_path / "m.ts")
    assert result.exit_code == 0 and "parity" in result.stdout


def test_distill_refuses_to_overwrite(tmp_path, tiny_ckpt, unlabelled):
    out = tmp_path / "d"
    args = ("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", out, "--epochs", 1)
    assert run(*args).exit_code == 0
    stamp = (out / "model.pt").read_bytes()
    assert_one_line_error(run(*args), 6, "--force")
    assert (out / "model.pt").read_bytes() == stamp
    assert run(*args, "--force").exit_code == 0


def test_distill_folder_without_inputs(tmp_path, tiny_ckpt):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing to see")
    result = run("distill", tiny_ckpt, "--arch", ARCH, "--data", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(result, 5, "no readable inputs")
    assert not (tmp_path / "o" / "model.pt").exists()


def test_distill_model_without_dropout(tmp_path, no_dropout_ckpt, unlabelled):
    result = run("distill", no_dropout_ckpt, "--arch", NO_DROPOUT_ARCH, "--data", unlabelled, "--out", tmp_path / "o")
    assert_one_line_error(result, 4, "no active dropout")


def test_distill_inputs_of_the_wrong_size(tmp_path, tiny_ckpt):
    write_images(tmp_path / "big", 4, size=12)
    result = run("distill", tiny_ckpt, "--arch", ARCH, "--data", tmp_path / "big", "--out", tmp_path / "o")
    assert_one_line_error(result, 8, "failed on inputs of shape")
    assert run("distill", tiny_ckpt, "--arch", ARCH, "--data", tmp_path / "big", "--out", tmp_path / "o",
               "--size", "8,8", "--epochs", 1).exit_code == 0


def test_evaluate_unlabelled_folder(tiny_ckpt, unlabelled):
    result = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--mc-samples", 3, "--json", "--no-timing")
    report = json.loads(result.stdout)
    standard, mc = report["results"]
    assert not report["labelled"] and report["inputs"] == 48
    assert standard["error"] is None and standard["nll"] is None and standard["kl_to_mc"] is not None
    assert mc["kl_to_mc"] is None and mc["agreement"] is None  # MC is the reference, not compared with itself
    table = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--mc-samples", 3, "--no-timing").stdout
    assert "KL to MC" in table and "error %" not in table and "ms / input" not in table


def test_evaluate_with_ood_reports_both_aurocs_and_refuses_a_mismatched_folder(tmp_path, tiny_ckpt, labelled, unlabelled):
    result = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--ood", unlabelled, "--mc-samples", 3,
                 "--json", "--no-timing")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ood_inputs"] == 48 and report["inputs"] == 30
    for row in report["results"]:  # standard and MC: both AUROCs, each a probability
        assert 0 <= row["auroc_ood"] <= 1 and 0 <= row["auroc_error"] <= 1
    table = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--ood", unlabelled, "--mc-samples", 3,
                "--no-timing").stdout
    assert "AUROC OOD" in table and "AUROC err" in table
    plain = run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--mc-samples", 3, "--no-timing").stdout
    assert "AUROC OOD" not in plain and "AUROC err" in plain
    write_images(tmp_path / "big", 4, size=12)
    assert_one_line_error(run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--ood", tmp_path / "big",
                              "--mc-samples", 3, "--no-timing"), 5, "OOD inputs have shape")
    assert_one_line_error(run("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--ood", tmp_path / "none",
                              "--mc-samples", 3), 2, "--ood")


def test_export_of_a_state_dict_needs_a_shape(tmp_path, tiny_ckpt):
    assert_one_line_error(run("export", tiny_ckpt, "--arch", ARCH, "--out", tmp_path / "m.onnx"), 2, "--input-shape")
    result = run("export", tiny_ckpt, "--arch", ARCH, "--out", tmp_path / "m.ts", "--format", "torchscript",
                 "--input-shape", "1,8,8")
    assert result.exit_code == 0


def test_export_unknown_format(tmp_path, tiny_ckpt):
    assert_one_line_error(run("export", tiny_ckpt, "--arch", ARCH, "--out", tmp_path / "m.x", "--format", "tflite"), 2, "--format")


def test_inspect_reports_how_and_how_often(tmp_path):
    import torch

    from dropout_zoo import Reused

    torch.manual_seed(0)
    path = tmp_path / "reused.pt"
    torch.jit.script(Reused().eval()).save(str(path))  # TorchScript: no --arch needed
    doc = json.loads(run("inspect", path, "--json").stdout)
    assert doc["format"] == "torchscript" and doc["dropout"][0]["name"] == "drop"

    torch.save(Reused().state_dict(), tmp_path / "reused_sd.pt")
    arch = f"{tmp_path.parent}/zoo_arch.py:make"
    (tmp_path.parent / "zoo_arch.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom dropout_zoo import Reused\n\ndef make():\n    return Reused()\n" % str(TESTS))
    doc = json.loads(run("inspect", tmp_path / "reused_sd.pt", "--arch", arch, "--input-shape", "8", "--json").stdout)
    assert doc["ran_model"] and doc["dropout"] == [
        {"name": "drop", "kind": "Dropout", "p": 0.3, "found_by": "module", "calls": 2, "sampled": True}]


@pytest.mark.slow
def test_inspect_bert_lists_attention_and_hidden_dropout(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                     attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1)
    transformers.BertForSequenceClassification(config).save_pretrained(str(tmp_path / "bert"))
    result = run("inspect", tmp_path / "bert", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "hf" and doc["ran_model"]
    attention = [(d["name"], d["kind"], d["p"]) for d in doc["dropout"] if d["found_by"] == "attention"]
    assert sorted(attention) == [(f"model.bert.encoder.layer.{i}.attention.self", "scaled_dot_product_attention",
                                  pytest.approx(0.2)) for i in range(2)]  # attention probabilities, one per layer
    hidden = [d for d in doc["dropout"] if d["name"].endswith("output.dropout")]
    assert len(hidden) == 4 and all(d["p"] == pytest.approx(0.1) and d["calls"] == 1 for d in hidden)
    table = run("inspect", tmp_path / "bert").stdout
    for i in range(2):
        assert re.search(rf"layer\.{i}\.attention\.self\s+│\s+scaled_dot_product_attention\s+│\s+0\.2\s+│\s+attention", table)


def test_distill_options_shrink_validation_and_plain_progress(tmp_path, tiny_ckpt, unlabelled):
    out = tmp_path / "small"
    result = run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", out, "--epochs", 3,
                 "--shrink", "5=0.5", "--val-fraction", 0.25, "--patience", 2, "--teacher-samples", 2, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["held_out"] == 12 and doc["inputs"] == 36 and doc["student_parameters"] < doc["teacher_parameters"]
    assert all("fidelity" in r for r in doc["history"])
    assert "epoch 1/3: loss" in result.stderr  # stderr is not a terminal: one plain line per epoch
    assert not (out / "resume.pt").exists()
    # the shrunk bundle evaluates and exports with no architecture flags
    assert run("export", out, "--format", "torchscript", "--out", tmp_path / "s.ts").exit_code == 0


def test_distill_refuses_to_clobber_an_interrupted_run(tmp_path, tiny_ckpt, unlabelled):
    out = tmp_path / "d"
    out.mkdir()
    (out / "resume.pt").write_bytes(b"state of an interrupted run")
    args = ("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", out, "--epochs", 1)
    assert_one_line_error(run(*args), 6, "--resume")
    assert_one_line_error(run(*args, "--resume"), 3, "not a ddtool resumable checkpoint")


def test_distill_bad_option_values(tmp_path, tiny_ckpt, unlabelled):
    base = ("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", tmp_path / "o")
    assert_one_line_error(run(*base, "--loss", "hinge"), 2, "loss")
    assert_one_line_error(run(*base, "--device", "cuda:3"), 2, "--device")
    assert_one_line_error(run(*base, "--shrink", "5=2"), 2, "--shrink")


# --------------------------------------------------------------------------- options end to end
TINY_ARCH = TESTS / "tiny_arch.py"


def test_student_arch_from_the_command_line(tmp_path, tiny_ckpt, unlabelled):
    out = tmp_path / "narrow"
    result = run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", out, "--epochs", 1,
                 "--student-arch", f"{TINY_ARCH}:narrow", "--student-arch-args", '{"classes": 3}', "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["student_parameters"] < doc["teacher_parameters"] and 0 < doc["tensors_from_teacher"] < 8
    import ddtool

    student = ddtool.load_model(out, arch=f"{TINY_ARCH}:narrow").model  # named again: the bundle's args rebuild it
    assert student[5].out_features == 4
    without = ddtool.load_model(out)  # not named: the bundle's code-free program, none of the factory's code
    assert without.arch == "torch-export" and without.provenance["student_parameters"] == doc["student_parameters"]
    assert_one_line_error(run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", tmp_path / "x",
                              "--student-arch", f"{TINY_ARCH}:narrow", "--shrink", "5=0.5"), 2, "choose one")


def test_evaluate_plot_from_the_command_line(tmp_path, tiny_ckpt, labelled):
    png = tmp_path / "eval.png"
    args = ("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled, "--mc-samples", 3, "--no-timing", "--plot", png)
    assert run(*args).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run(*args), 6, "--force")
    assert run(*args, "--force").exit_code == 0


def test_inspect_data_runs_the_model_and_finds_functional_dropout(tmp_path, unlabelled):
    import tiny_arch
    import torch

    torch.save(tiny_arch.functional().state_dict(), tmp_path / "f.pt")
    arch = f"{TINY_ARCH}:functional"
    without = run("inspect", tmp_path / "f.pt", "--arch", arch)
    assert_one_line_error(without, 4, "functional dropout is found only by running the model")
    assert "pass --input-shape or --data" not in without.stderr  # no site at all: nothing to note
    doc = json.loads(run("inspect", tmp_path / "f.pt", "--arch", arch, "--data", unlabelled, "--json").stdout)
    assert doc["ran_model"] and doc["dropout"] == [
        {"name": "<root>", "kind": "F.dropout", "p": 0.5, "found_by": "functional", "calls": 1, "sampled": True}]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_and_momentum_reach_the_optimizer(tmp_path, tiny_ckpt, unlabelled, monkeypatch, optimizer):
    import torch

    made = []

    def recording(cls):
        class Recording(cls):
            def __init__(self, params, **kwargs):
                made.append((cls.__name__, kwargs))
                super().__init__(params, **kwargs)
        return Recording

    for name in ("SGD", "Adam"):
        monkeypatch.setattr(torch.optim, name, recording(getattr(torch.optim, name)))
    result = run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", tmp_path / "o", "--epochs", 1,
                 "--optimizer", optimizer, "--lr", 0.02, "--weight-decay", 0.125, "--momentum", 0.5)
    assert result.exit_code == 0, result.output
    if optimizer == "sgd":
        assert made == [("SGD", {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.125})]
    else:
        assert made == [("Adam", {"lr": 0.02, "weight_decay": 0.125})]


def test_per_position_outputs_distil_and_evaluate_along_their_class_axis(tmp_path, unlabelled):
    import tiny_arch
    import torch

    torch.manual_seed(0)
    torch.save(tiny_arch.tagger().state_dict(), tmp_path / "tagger.pt")
    arch, out = f"{TINY_ARCH}:tagger", tmp_path / "tags"
    result = run("distill", tmp_path / "tagger.pt", "--arch", arch, "--data", unlabelled, "--out", out, "--epochs", 1,
                 "--class-dim", 2, "--json")
    assert result.exit_code == 0, result.output
    # the bundle's class axis is evaluate's default; 8 row predictions per image are compared with MC
    report = json.loads(run("evaluate", tmp_path / "tagger.pt", "--arch", arch, "--data", unlabelled, "--distilled", out,
                            "--mc-samples", 4, "--no-timing", "--json").stdout)
    assert report["positions"] == 8 and [r["method"] for r in report["results"]] == ["standard", "mc-4", "tags"]
    along_rows = json.loads(run("evaluate", tmp_path / "tagger.pt", "--arch", arch, "--data", unlabelled,
                                "--class-dim", 1, "--mc-samples", 4, "--no-timing", "--json").stdout)
    assert along_rows["positions"] == 3  # the 8 rows taken as classes: 3 positions per image


@pytest.mark.slow
def test_compile_on_a_tiny_model(tmp_path, tiny_ckpt, unlabelled):
    """--compile runs the student through torch.compile (about 10 s to compile on 2 cores) and
    gives the weights eager mode gives."""
    import torch

    base = ("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--epochs", 1, "--batch-size", 16)
    assert run(*base, "--out", tmp_path / "eager").exit_code == 0
    result = run(*base, "--out", tmp_path / "compiled", "--compile")
    assert result.exit_code == 0, result.output
    eager, compiled = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in ("eager", "compiled"))
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)


def test_a_bundle_distills_again_through_its_program(tmp_path, tiny_ckpt, unlabelled):
    """Without --arch a bundle is its code-free program, whose weights were saved frozen: it still
    teaches, and its student is trainable."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", first, "--epochs", 1).exit_code == 0
    result = run("distill", first, "--data", unlabelled, "--out", second, "--epochs", 1, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(run("inspect", second, "--json").stdout)
    assert doc["arch"] == "torch-export" and len(doc["dropout"]) == 2
