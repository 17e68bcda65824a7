"""Smaller students: --shrink and --student-arch, both initialised from the teacher."""

import copy

import pytest
import torch
from torch import nn

from conftest import ARCH, TESTS
from ddtool.arch import factory_ref
from ddtool.checkpoint import load_model, save_bundle
from ddtool.compress import parse_shrink, shrink, shrunk_student, student_from_arch
from ddtool.errors import UsageError


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_parse_shrink():
    assert parse_shrink(["classifier.1=0.5", "a=1"]) == {"classifier.1": 0.5, "a": 1.0}
    for bad in ["x", "x=0", "x=1.5", "=0.5", "x=half"]:
        with pytest.raises(UsageError):
            parse_shrink([bad])


def test_shrinking_a_linear_keeps_its_strongest_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[0].weight[[1, 4]] *= 10  # units 1 and 4 are by far the strongest
    x = torch.randn(5, 4)
    small = shrink(copy.deepcopy(model), {"0": 2})
    assert small[0].out_features == 2 and small[2].in_features == 2
    assert torch.equal(small[0].weight, model[0].weight[[1, 4]])
    assert torch.equal(small[2].weight, model[2].weight[:, [1, 4]])
    assert small(x).shape == (5, 2)


def test_shrinking_a_conv_slices_batchnorm_and_a_flattening_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    model[1].running_mean.uniform_()
    x = torch.randn(2, 1, 8, 8)
    student, ref = shrunk_student(model, {"kind": "factory"}, {"0": 0.5})
    assert student[0].out_channels == 2 and student[1].num_features == 2 and student[5].in_features == 72
    assert ref == {"kind": "shrink", "base": {"kind": "factory"}, "keep": {"0": 2}}
    # with the dropped channels' contribution removed, the kept ones compute exactly what they did
    kept = [i for i in range(4) if any(torch.equal(student[0].weight[j], model[0].weight[i]) for j in range(2))]
    with torch.no_grad():
        full = model[:5](x).view(2, 4, 36)[:, kept].flatten(1) @ model[5].weight.view(3, 4, 36)[:, kept].flatten(1).T
    assert torch.allclose(student(x), full + model[5].bias, atol=1e-5)


def test_shrink_errors(tiny_model):
    with pytest.raises(UsageError, match="no layer of that name"):
        shrunk_student(tiny_model, {}, {"nope": 0.5})
    with pytest.raises(UsageError, match="only Linear and Conv"):
        shrunk_student(tiny_model, {}, {"1": 0.5})
    with pytest.raises(UsageError, match="no Linear or Conv layer follows"):
        shrunk_student(tiny_model, {}, {"8": 0.5})


def test_shrunk_bundle_rebuilds_from_the_teachers_arch_or_its_program(tmp_path, tiny_model):
    student, ref = shrunk_student(tiny_model, factory_ref(ARCH), {"5": 0.25})
    assert _count(student) < _count(tiny_model)
    save_bundle(tmp_path / "model.pt", student, arch_ref=ref, input_spec={"shape": [1, 8, 8], "dtype": "float32"})
    loaded = load_model(tmp_path / "model.pt", arch=ARCH)  # the teacher's factory, shrunk as recorded
    assert loaded.model[5].out_features == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), student.state_dict().values()))
    program = load_model(tmp_path / "model.pt")  # no flags: the code-free program
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert program.arch_ref["kind"] == "torch-export" and torch.allclose(program.model(x), student.eval()(x), atol=1e-6)


def test_student_arch_copies_matching_tensors(tiny_model):
    student, ref, copied = student_from_arch(tiny_model, ARCH, {"classes": 3})
    assert copied == len(tiny_model.state_dict()) and ref["args"] == {"classes": 3}
    narrow, _, copied = student_from_arch(tiny_model, f"{TESTS / 'tiny_arch.py'}:narrow")
    assert 0 < copied < len(tiny_model.state_dict())
    assert torch.equal(narrow[0].weight, tiny_model[0].weight)
