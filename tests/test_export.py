"""Exports are kept only after their parity check passes."""

import onnx
import pytest
import torch

from ddtool.errors import ExportError, OutputError
from ddtool.exporting import export


def test_onnx_export_has_dynamic_batch_and_matches(tmp_path, tiny_model):
    out = tmp_path / "m.onnx"
    result = export(tiny_model, out, "onnx", input_shape=(1, 8, 8))
    assert result.max_abs_diff <= 1e-4 and result.parity_batches == [1, 64]
    model = onnx.load(str(out))
    assert not list(tmp_path.glob("*.data"))  # weights inside the one file
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_torchscript_export_reloads_and_matches(tmp_path, tiny_model):
    out = tmp_path / "m.ts"
    export(tiny_model, out, "torchscript", input_shape=(1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(torch.jit.load(str(out))(x), tiny_model.eval()(x), atol=1e-5)


class BatchDependent(torch.nn.Module):
    """Branches on the batch size: tracing at batch 2 freezes the branch, so batch 1 differs."""

    def forward(self, x):
        return x.flatten(1) if x.shape[0] == 2 else -x.flatten(1)


def test_failed_parity_writes_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "m.ts"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="largest difference"):
        export(BatchDependent(), out, "torchscript", input_shape=(1, 2, 2), force=True)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.ts"]


def test_existing_output_needs_force(tmp_path, tiny_model):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"x")
    with pytest.raises(OutputError, match="--force"):
        export(tiny_model, out, "onnx", input_shape=(1, 8, 8))


def test_wrong_input_shape_is_an_export_error(tmp_path, tiny_model):
    with pytest.raises(ExportError):
        export(tiny_model, tmp_path / "m.ts", "torchscript", input_shape=(3, 8, 8))
    assert not list(tmp_path.iterdir())


def test_onnx_probabilities_output_and_metadata(tmp_path, tiny_model):
    import onnxruntime as ort

    from ddtool.exporting import read_metadata

    out = tmp_path / "p.onnx"
    meta = {"ddtool.classes": ["a", "b", "c"], "ddtool.preprocess": {"channels": 1}}
    result = export(tiny_model, out, "onnx", input_shape=(1, 8, 8), probabilities=True, metadata=meta)
    assert result.outputs == ["logits", "probabilities"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, probs = session.run(None, {"input": torch.randn(3, 1, 8, 8).numpy()})
    assert probs.shape == (3, 3) and abs(probs.sum(1) - 1).max() < 1e-5
    assert read_metadata(out) == meta


def test_onnx_opset_and_external_data(tmp_path, tiny_model):
    out = tmp_path / "ext.onnx"
    export(tiny_model, out, "onnx", input_shape=(1, 8, 8), opset=18, external_data=True)
    model = onnx.load(str(out), load_external_data=False)
    assert (tmp_path / "ext.onnx.data").is_file() and any(o.version == 18 for o in model.opset_import if o.domain == "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_scripted_torchscript_and_torch_export(tmp_path, tiny_model):
    from ddtool.exporting import read_metadata

    export(tiny_model, tmp_path / "s.ts", "torchscript", input_shape=(1, 8, 8), script=True, metadata={"ddtool.x": 1})
    assert read_metadata(tmp_path / "s.ts") == {"ddtool.x": 1}
    result = export(tiny_model, tmp_path / "m.pt2", "pt2", input_shape=(1, 8, 8), metadata={"ddtool.x": 2})
    assert result.max_abs_diff <= 1e-4 and read_metadata(tmp_path / "m.pt2") == {"ddtool.x": 2}
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(program(x), tiny_model.eval()(x), atol=1e-5)


def test_export_keeps_the_json_clean(tmp_path, tiny_model, capfd):
    export(tiny_model, tmp_path / "m.onnx", "onnx", input_shape=(1, 8, 8))
    captured = capfd.readouterr()
    assert "[torch.onnx]" not in captured.out and captured.out == ""
