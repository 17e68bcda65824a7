"""``ddtool distill --check DIR``: a labelled folder decides between the distilled student and
standard dropout (the teacher's own weights). Both outcomes are made certain by labelling the
check folder with one model's own predictions, on inputs where the two models disagree: that
model's error is 0 and the other's is not (the run with --check repeats, seed for seed, a first
run without it, whose student gives the predictions). The tiny teacher's last bias is centred on
the pool so that it predicts every class there, with near ties that the student moves."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import ddtool
import tiny_arch
from conftest import ARCH, write_images
from ddtool.cli import app
from ddtool.evaluation import predict_probs

CLASSES = ["a", "b", "c"]
runner = CliRunner()


def _config() -> ddtool.DistillConfig:
    return ddtool.DistillConfig(epochs=3, batch_size=16, lr=0.1)


def _probabilities(model: torch.nn.Module, inputs: ddtool.Inputs) -> torch.Tensor:
    """``model``'s class probabilities on ``inputs``, run deterministically."""
    return predict_probs(model, inputs.x.float() / 255, 256)[0]


def _predictions(model: torch.nn.Module, inputs: ddtool.Inputs) -> torch.Tensor:
    return _probabilities(model, inputs).argmax(1)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The teacher, unlabelled inputs, a pool of other inputs where the student of a first run
    and standard dropout disagree on some, and both models' predictions there."""
    root = tmp_path_factory.mktemp("check")
    write_images(root / "unlabelled", 48)
    write_images(root / "pool", 96, seed=7)
    pool = ddtool.read_folder(root / "pool", ddtool.Preprocess(channels=1), labelled=False)
    torch.manual_seed(0)
    model = tiny_arch.tiny().eval()
    with torch.no_grad():
        model[-1].bias -= model(pool.x.float() / 255).mean(0)
    torch.save(model.state_dict(), root / "teacher.pt")
    teacher = root / "teacher.pt"
    ddtool.distill_to_folder(teacher, root / "unlabelled", root / "first", _config(), arch=ARCH, classes=CLASSES)
    standard = _predictions(ddtool.load_model(teacher, arch=ARCH).model, pool)
    student = _predictions(ddtool.load_model(root / "first").model, pool)
    disagree = (standard != student).nonzero().flatten().tolist()
    assert disagree, "the first run's student agrees with standard dropout on every pool input"
    return root, teacher, pool, standard, student, disagree


def _label(folder, pool: ddtool.Inputs, labels: torch.Tensor, rows: list[int]):
    """``pool``'s inputs ``rows`` copied into ``folder``/<class name>/, labelled ``labels``."""
    for i in rows:
        (folder / CLASSES[int(labels[i])]).mkdir(parents=True, exist_ok=True)
        shutil.copy(pool.paths[i], folder / CLASSES[int(labels[i])] / pool.paths[i].name)
    assert len({int(labels[i]) for i in rows}) >= 2, "a labelled folder needs two classes"
    return folder


def _rows(setting) -> list[int]:
    """The inputs of a check folder: every disagreement, and as many agreements (up to 8)."""
    _, _, pool, standard, student, disagree = setting
    agree = [i for i in range(len(pool)) if i not in disagree][:max(8, len(disagree))]
    return sorted(disagree + agree)


def test_labels_of_standard_dropout_keep_the_teachers_own_weights(setting, tmp_path):
    root, teacher, pool, standard, _, disagree = setting
    rows = _rows(setting)
    check = _label(tmp_path / "check", pool, standard, rows)
    result = ddtool.distill_to_folder(teacher, root / "unlabelled", tmp_path / "out", _config(), arch=ARCH,
                                      classes=CLASSES, check=check)
    expected = {"n": len(rows), "standard_error": 0.0, "distilled_error": pytest.approx(len(disagree) / len(rows)),
                "kept": "standard"}
    assert result.check.as_dict() == expected and result.as_dict()["check"] == expected
    saved = ddtool.load_model(tmp_path / "out")
    assert saved.provenance["check"] == expected
    assert torch.equal(_probabilities(saved.model, pool), _probabilities(ddtool.load_model(teacher, arch=ARCH).model, pool))


def test_labels_of_the_student_keep_the_student(setting, tmp_path):
    root, teacher, pool, _, student, disagree = setting
    rows = _rows(setting)
    check = _label(tmp_path / "check", pool, student, rows)
    result = ddtool.distill_to_folder(teacher, root / "unlabelled", tmp_path / "out", _config(), arch=ARCH,
                                      classes=CLASSES, check=check)
    assert result.check.as_dict() == {"n": len(rows), "standard_error": pytest.approx(len(disagree) / len(rows)),
                                      "distilled_error": 0.0, "kept": "distilled"}
    saved = ddtool.load_model(tmp_path / "out")
    assert saved.provenance["check"]["kept"] == "distilled"
    assert torch.equal(_probabilities(saved.model, pool), _probabilities(ddtool.load_model(root / "first").model, pool))


def test_a_tie_keeps_the_student(setting, tmp_path):
    """On inputs where both models predict alike, both errors are equal: the student stays."""
    root, teacher, pool, standard, _, disagree = setting
    rows = [i for i in range(len(pool)) if i not in disagree][:12]
    check = _label(tmp_path / "check", pool, (standard + 1) % 3, rows)  # both wrong everywhere
    result = ddtool.distill_to_folder(teacher, root / "unlabelled", tmp_path / "out", _config(), arch=ARCH,
                                      classes=CLASSES, check=check)
    assert result.check.as_dict() == {"n": 12, "standard_error": 1.0, "distilled_error": 1.0, "kept": "distilled"}


def test_the_command_says_which_was_kept_and_the_bundle_evaluates_as_standard_dropout(setting, tmp_path):
    root, teacher, pool, standard, _, disagree = setting
    rows = _rows(setting)
    check = _label(tmp_path / "check", pool, standard, rows)
    args = ["distill", teacher, "--arch", ARCH, "--data", root / "unlabelled", "--out", tmp_path / "out",
            "--epochs", 3, "--batch-size", 16, "--lr", 0.1, "--classes", ",".join(CLASSES), "--check", check]
    table = runner.invoke(app, [str(a) for a in args])
    assert table.exit_code == 0 and "--check kept standard dropout" in table.stdout, table.output
    result = runner.invoke(app, [str(a) for a in args + ["--json", "--force"]])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["check"]["kept"] == "standard" and doc["check"]["n"] == len(rows)
    said = [line for line in result.stderr.splitlines() if line.startswith("check on")]
    assert said == [f"check on {len(rows)} labelled inputs: standard 0.00% error, distilled "
                    f"{100 * len(disagree) / len(rows):.2f}%; the distilled student errs more: kept the teacher's "
                    "own weights (standard dropout)"]
    evaluated = runner.invoke(app, [str(a) for a in ["evaluate", teacher, "--arch", ARCH, "--data", check,
                                                     "--distilled", tmp_path / "out", "--no-timing", "--json"]])
    assert evaluated.exit_code == 0, evaluated.output
    by_method = {r["method"]: r for r in json.loads(evaluated.stdout)["results"]}
    assert by_method["out"]["error"] == by_method["standard"]["error"] == 0.0
    assert by_method["out"]["kl_to_mc"] == by_method["standard"]["kl_to_mc"]
