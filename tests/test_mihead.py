"""The MI head (``distill --mi-head``): its target, what it learns, and where it goes (bundle,
exports, predict, evaluate); off by default, and the student the same with it or without."""

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tiny_arch
from conftest import ARCH, TESTS, save_tiny_teacher, write_images
from ddtool.checkpoint import load_model
from ddtool.cli import app
from ddtool.data import Preprocess
from ddtool.distillation import DistillConfig, distill
from ddtool.errors import UsageError
from ddtool.evaluation import pearson, spearman
from ddtool.mihead import WithMI, head_values, mc_mutual_information, mutual_information, valid_head_field, with_mi

runner = CliRunner()
PRE = Preprocess(channels=1)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def inputs(n: int, seed: int) -> torch.Tensor:
    """Random 8x8 images at random brightness: the teacher's MI varies from input to input."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=gen)
    return (torch.randint(0, 256, (n, 1, 8, 8), generator=gen).float() * scale).to(torch.uint8)


@pytest.fixture(scope="module")
def fitted():
    """The tiny teacher, and a one-epoch distillation of it with the head (module-scoped: ~5 s)."""
    torch.manual_seed(0)
    teacher = tiny_arch.tiny()
    return teacher, distill(teacher, inputs(300, 0), PRE, DistillConfig(epochs=1, mi_head=True))


# --------------------------------------------------------------------------- the target
def test_mutual_information_of_known_samples():
    certain_but_split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident masks that disagree
    assert mutual_information(certain_but_split).item() == pytest.approx(math.log(2))
    agreeing = torch.tensor([[[0.3, 0.7]], [[0.3, 0.7]]])  # uncertain, but every mask agrees: aleatoric only
    assert mutual_information(agreeing).item() == pytest.approx(0.0, abs=1e-7)
    assert mutual_information(certain_but_split, corrected=True).item() == pytest.approx(2 * math.log(2))


def test_the_correction_removes_the_small_k_bias():
    """E[MI_K] ~ (1 - 1/K) MI: with K = 4 the plug-in estimate is a quarter low, the corrected one is not."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.5, 0.0, -0.5]) + 0.4 * torch.randn(4000, 4, 3, generator=gen)  # 4000 sets of K = 4
    probs = logits.softmax(-1).transpose(0, 1)  # (K, sets, C)
    reference = mutual_information(logits.reshape(1, -1, 3).softmax(-1).transpose(0, 1)).item()  # K = 16,000
    plain, corrected = mutual_information(probs).mean().item(), mutual_information(probs, corrected=True).mean().item()
    assert abs(plain / reference - 0.75) < 0.05
    assert abs(corrected / reference - 1) < 0.05


# --------------------------------------------------------------------------- what the head learns
def test_the_head_predicts_mc_mutual_information_on_new_inputs(fitted):
    teacher, result = fitted
    x = PRE.prepare(inputs(200, 1))  # inputs the head never saw
    torch.manual_seed(5)
    mc = mc_mutual_information(teacher, x, 200)
    head = head_values(WithMI(result.student, result.mi_head.head, result.mi_head.feature), x)
    constant = result.mi_head.head.target_scale  # the mean training target
    assert ((head - mc) ** 2).mean() < 0.3 * ((constant - mc) ** 2).mean()
    assert pearson(head, mc) > 0.8 and spearman(head, mc) > 0.8
    assert result.mi_head.held_out_mse < result.mi_head.constant_mse


def test_the_student_is_the_same_with_the_head_or_without(fitted):
    teacher, with_head = fitted
    without = distill(teacher, inputs(300, 0), PRE, DistillConfig(epochs=1))
    assert without.mi_head is None and DistillConfig().mi_head is False
    a, b = with_head.student.state_dict(), without.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- refusals
def test_refused_where_it_does_not_apply():
    with pytest.raises(UsageError, match="classifiers"):
        DistillConfig(loss="mse", mi_head=True)
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UsageError, match="nn.Linear"):  # the prediction is a pooling's output: no feature point
        distill(pooled, inputs(16, 0), PRE, DistillConfig(epochs=1, mi_head=True))


def test_cli_refuses_outputs_with_several_positions(tmp_path, unlabelled):
    torch.manual_seed(0)
    torch.save(tiny_arch.tagger().state_dict(), tmp_path / "tagger.pt")
    result = run("distill", tmp_path / "tagger.pt", "--arch", f"{TESTS / 'tiny_arch.py'}:tagger", "--data", unlabelled,
                 "--out", tmp_path / "tags", "--epochs", 1, "--class-dim", 2, "--mi-head")
    assert result.exit_code == 2, result.output
    assert "(N, C) outputs" in result.output and not (tmp_path / "tags" / "model.pt").exists()


# --------------------------------------------------------------------------- bundle, exports, predict, evaluate
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A distillation with the head and every export (its folder, the images)."""
    root = tmp_path_factory.mktemp("mihead")
    save_tiny_teacher(root)
    write_images(root / "unlabelled", 48)
    out = root / "d"
    result = run("distill", root / "teacher.pt", "--arch", ARCH, "--data", root / "unlabelled", "--out", out,
                 "--epochs", 1, "--mi-head", "--export", "onnx,torchscript,pt2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mi_head"]["feature"] == "8"
    return root, out


def test_onnx_has_a_second_output_that_matches_pytorch(served):
    import onnxruntime as ort

    root, out = served
    loaded = load_model(out / "model.pt", arch=ARCH)
    both = with_mi(loaded.model, loaded.mi_head)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "mutual_information"]
    x = torch.randn(5, 1, 8, 8)
    logits, mi = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref_logits, ref_mi = both(x)
    assert mi.shape == (5,) and (mi >= 0).all()
    assert torch.allclose(torch.from_numpy(mi), ref_mi, atol=1e-5)
    assert torch.allclose(torch.from_numpy(logits), ref_logits, atol=1e-4)


@pytest.mark.parametrize("name", ["model.pt", "model.onnx", "model.ts", "model.pt2"])
def test_predict_reports_the_mutual_information(served, name):
    root, out = served
    result = run("predict", out / name, "--data", root / "unlabelled", "--json", "--top-k", 1)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["predictions"]
    reference = json.loads(run("predict", out / "model.pt", "--data", root / "unlabelled", "--json").stdout)["predictions"]
    assert all(r["mutual_information"] >= 0 for r in rows)
    assert [r["mutual_information"] for r in rows] == pytest.approx([r["mutual_information"] for r in reference], abs=1e-5)


def test_without_the_head_nothing_changes_in_predict(tmp_path, tiny_ckpt, unlabelled):
    out = tmp_path / "plain"
    assert run("distill", tiny_ckpt, "--arch", ARCH, "--data", unlabelled, "--out", out, "--epochs", 1).exit_code == 0
    rows = json.loads(run("predict", out, "--data", unlabelled, "--json").stdout)["predictions"]
    assert "mutual_information" not in rows[0] and load_model(out / "model.pt").mi_head is None


def test_evaluate_compares_the_head_with_mc(served, tmp_path):
    root, out = served
    write_images(tmp_path / "ood", 12, seed=7)
    result = run("evaluate", root / "teacher.pt", "--arch", ARCH, "--data", root / "unlabelled", "--distilled", out,
                 "--ood", tmp_path / "ood", "--mc-samples", 8, "--no-timing", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["mutual_information"]["d"]
    assert {"pearson", "spearman", "mean_head", "mean_mc", "auroc_ood_head", "auroc_ood_mc"} <= entry.keys()
    assert entry["mean_mc"] > 0 and 0 <= entry["auroc_ood_mc"] <= 1


def test_a_damaged_head_field_is_refused():
    good = {"feature": "8", "in_features": 16, "classes": 3, "hidden": 4, "output": None,
            "state_dict": {"w": torch.zeros(1)}}
    assert valid_head_field(good)
    assert not valid_head_field({**good, "in_features": "16"})
    assert not valid_head_field({**good, "state_dict": {"w": [0.0]}})
    assert not valid_head_field({**good, "program": torch.zeros(3)})  # a program is bytes (uint8)


def test_a_resumed_run_may_add_the_head(tmp_path, fitted):
    """The head is fitted after the run: --resume with --mi-head is the same run, and gives the same student."""
    teacher, _ = fitted
    state = tmp_path / "resume.pt"
    first = distill(teacher, inputs(64, 0), PRE, DistillConfig(epochs=1), checkpoint=state, keep_checkpoint=True)
    again = distill(teacher, inputs(64, 0), PRE, DistillConfig(epochs=1, mi_head=True), checkpoint=state, resume=True)
    assert first.mi_head is None and again.mi_head is not None
    a, b = first.student.state_dict(), again.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
