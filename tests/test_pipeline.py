"""The API's one call per command does what the command does: the CLI only parses and prints."""

import json

import pytest
from typer.testing import CliRunner

import ddtool
from conftest import ARCH
from ddtool.cli import app

runner = CliRunner()


def _without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in history]


def test_distill_to_folder_writes_what_the_command_writes(tmp_path, tiny_ckpt, unlabelled):
    config = ddtool.DistillConfig(epochs=2, batch_size=16, val_fraction=0.25, seed=2)
    events = []
    result = ddtool.distill_to_folder(tiny_ckpt, unlabelled, tmp_path / "api", config, arch=ARCH, shrink={"5": 0.5},
                                      classes=["a", "b", "c"], export=["torchscript"], progress=events.append)
    assert {p.name for p in (tmp_path / "api").iterdir()} == {"model.pt", "history.json", "model.ts"}
    cli = runner.invoke(app, [str(a) for a in ("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out",
                              tmp_path / "cli", "--epochs", 2, "--batch-size", 16, "--val-fraction", 0.25, "--seed", 2,
                              "--shrink", "5=0.5", "--classes", "a,b,c", "--export", "torchscript", "--json")])
    assert cli.exit_code == 0, cli.output
    doc, ours = json.loads(cli.stdout), result.as_dict()
    assert _without_timing(doc.pop("history")) == _without_timing(ours.pop("history"))
    assert [e["max_abs_diff"] for e in doc.pop("exports")] == [e["max_abs_diff"] for e in ours.pop("exports")]
    assert {**doc, "bundle": None} == {**ours, "bundle": None}
    assert ddtool.load_model(tmp_path / "api").classes == ["a", "b", "c"]
    assert [e["event"] for e in events].count("epoch") == 2


def test_outputs_are_checked_before_any_work(tmp_path, tiny_ckpt, unlabelled):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "history.json").write_text("[]")
    with pytest.raises(ddtool.DDToolError, match="history.json already exists"):
        ddtool.distill_to_folder(tiny_ckpt, tmp_path / "no such folder", tmp_path / "o", arch=ARCH)


def test_evaluate_folder_reports_what_the_command_prints(tmp_path, tiny_ckpt, labelled):
    report = ddtool.evaluate_folder(tiny_ckpt, labelled, arch=ARCH, mc_samples=5, timing=False, seed=3)
    cli = runner.invoke(app, [str(a) for a in ("evaluate", tiny_ckpt, "--arch", ARCH, "--data", labelled,
                                               "--mc-samples", 5, "--no-timing", "--seed", 3, "--json")])
    metrics = ("method", "error", "nll", "ece", "kl_to_mc", "agreement", "parameters", "forward_passes")
    ours = [{k: r[k] for k in metrics} for r in report.as_dict()["results"]]
    assert ours == [{k: r[k] for k in metrics} for r in json.loads(cli.stdout)["results"]]


def test_inspect_checkpoint(tiny_ckpt):
    found = ddtool.inspect_checkpoint(tiny_ckpt, ARCH, input_shape=(1, 8, 8))
    assert found.format == "state-dict" and found.ran_model and found.no_dropout is None
    assert [(s.name, s.calls) for s in found.sites] == [("2", 1), ("7", 1)]
    found.require_dropout()


def test_export_and_predict_calls_protect_their_inputs_for_their_own_run(tmp_path, tiny_ckpt, unlabelled):
    with pytest.raises(ddtool.DDToolError, match="would overwrite or write into the input"):
        ddtool.export_checkpoint(tiny_ckpt, tiny_ckpt, "torchscript", arch=ARCH, input_shape=(1, 8, 8), force=True)
    with pytest.raises(ddtool.DDToolError, match="would overwrite or write into the input"):
        ddtool.predict_folder(tiny_ckpt, unlabelled, unlabelled / "p.csv", arch=ARCH, force=True)
    exported = ddtool.export_checkpoint(tiny_ckpt, tmp_path / "m.ts", "torchscript", arch=ARCH, input_shape=(1, 8, 8))
    assert exported.path == str(tmp_path / "m.ts")
    found = ddtool.predict_folder(tmp_path / "m.ts", unlabelled, top_k=2)
    cli = runner.invoke(app, [str(a) for a in ("predict", tmp_path / "m.ts", "--data", unlabelled, "--top-k", 2, "--json")])
    assert cli.exit_code == 0 and json.loads(cli.stdout) == found.as_dict() and len(found.rows) == 48
    # the protection is the call's own: once it returns, the checkpoint it read is a path like any other
    ddtool.export_checkpoint(tmp_path / "m.ts", tiny_ckpt, "torchscript", input_shape=(1, 8, 8), force=True)
    assert ddtool.load_model(tiny_ckpt).format == "torchscript"
