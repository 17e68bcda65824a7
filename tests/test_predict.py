"""The serving path: predict with an exported ONNX file, a TorchScript file, and a bundle."""

import csv
import json

import pytest
from typer.testing import CliRunner

from conftest import ARCH, save_tiny_teacher, write_images
from ddtool.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One distillation with every export, shared by the tests here: (its folder, the images)."""
    root = tmp_path_factory.mktemp("served")
    save_tiny_teacher(root)
    write_images(root / "unlabelled", 48)
    out = root / "d"
    result = run("distill", root / "teacher.pt", "--arch", ARCH, "--data", root / "unlabelled", "--out", out,
                 "--epochs", 1, "--classes", "cat,dog,eel", "--export", "onnx,torchscript,pt2", "--mean", "0.5",
                 "--std", "0.25")
    assert result.exit_code == 0, result.output
    return out, root / "unlabelled"


@pytest.fixture
def distilled(served):
    return served[0]


@pytest.fixture
def unlabelled(served):
    return served[1]


def test_one_command_distills_exports_and_verifies(distilled):
    assert {p.name for p in distilled.iterdir()} == {"model.pt", "history.json", "model.onnx", "model.ts", "model.pt2"}


@pytest.mark.parametrize("name", ["model.onnx", "model.ts", "model.pt2", "model.pt"])
def test_every_model_kind_predicts_the_same(distilled, unlabelled, name):
    result = run("predict", distilled / name, "--data", unlabelled, "--json", "--top-k", 2)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["runtime"] == ("onnxruntime" if name.endswith("onnx") else "pytorch")
    rows = doc["predictions"]
    assert len(rows) == 48 and all(len(r["top"]) == 2 for r in rows)
    assert {t["class"] for r in rows for t in r["top"]} <= {"cat", "dog", "eel"}  # names came with the model
    reference = json.loads(run("predict", distilled / "model.pt", "--data", unlabelled, "--json", "--top-k", 2).stdout)
    for a, b in zip(rows, reference["predictions"]):
        assert a["top"][0]["index"] == b["top"][0]["index"]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-4)


def test_predictions_to_csv_and_json(tmp_path, distilled, unlabelled):
    result = run("predict", distilled / "model.onnx", "--data", unlabelled, "--out", tmp_path / "p.csv", "--top-k", 3)
    assert result.exit_code == 0, result.output
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert len(rows) == 49
    assert run("predict", distilled / "model.onnx", "--data", unlabelled, "--out", tmp_path / "p.json").exit_code == 0
    assert len(json.loads((tmp_path / "p.json").read_text())) == 48
    again = run("predict", distilled / "model.onnx", "--data", unlabelled, "--out", tmp_path / "p.json")
    assert again.exit_code == 6 and "--force" in again.stderr


def test_predict_errors(tmp_path, distilled, unlabelled):
    bad = run("predict", distilled / "model.onnx", "--data", unlabelled, "--out", tmp_path / "p.txt")
    assert bad.exit_code == 2 and ".csv or .json" in bad.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    bad = run("predict", junk, "--data", unlabelled)
    assert bad.exit_code == 3 and "onnxruntime could not open" in bad.stderr


def test_top_k_above_the_class_count_reports_every_class_once(distilled, unlabelled):
    doc = json.loads(run("predict", distilled / "model.onnx", "--data", unlabelled, "--json", "--top-k", 10).stdout)
    for row in doc["predictions"]:
        assert sorted(t["class"] for t in row["top"]) == ["cat", "dog", "eel"]
        probabilities = [t["probability"] for t in row["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert run("predict", distilled / "model.onnx", "--data", unlabelled, "--top-k", 0).exit_code == 2
