"""ddtool: distill a network trained with dropout into a deterministic one that predicts like
its Monte-Carlo-dropout ensemble (Bulo, Porzi & Kontschieder, "Dropout distillation", ICML 2016).

The Python API, one function per stage of the data path::

    import ddtool
    teacher = ddtool.load_model("model.pt", arch="net.py:build")    # checkpoint -> module
    ddtool.find_dropout(teacher.model)                               # dropout sites
    pre = ddtool.resolve_preprocess(teacher.model)
    data = ddtool.read_folder("unlabelled/", pre)                    # folder -> tensors
    result = ddtool.distill(teacher.model, data.x, pre)              # Algorithm 2
    report = ddtool.evaluate(teacher.model, ddtool.read_folder("test/", pre), pre,
                             distilled={"distilled": result.student})
    ddtool.export(result.student, "model.onnx", "onnx", input_shape=(1, 28, 28))

and one call per command, from files to files (``ddtool distill``, ``evaluate``, ``export``,
``predict``, ``inspect``)::

    ddtool.distill_to_folder("model.pt", "unlabelled/", "distilled/", ddtool.DistillConfig(epochs=30),
                             arch="net.py:build", export=["onnx"])
    ddtool.predict_folder("distilled/model.onnx", "new/", "predictions.csv")
"""

from .checkpoint import LoadedModel, load_model, save_bundle
from .data import Inputs, Preprocess, read_folder, resolve_preprocess
from .distillation import DistillConfig, DistillResult, distill, kl_loss
from .dropout import DropoutSite, find_dropout, mc_mode
from .errors import DDToolError
from .evaluation import EvalReport, evaluate
from .exporting import ExportResult, export
from .mc import MCSampler, mc_average
from .pipeline import (FolderResult, Inspection, Predictions, distill_to_folder, evaluate_folder, export_checkpoint,
                       inspect_checkpoint, predict_folder)
from .version import __version__

__all__ = [
    "DDToolError", "DistillConfig", "DistillResult", "DropoutSite", "EvalReport", "ExportResult", "FolderResult",
    "Inputs", "Inspection", "LoadedModel", "MCSampler", "Predictions", "Preprocess", "__version__", "distill",
    "distill_to_folder", "evaluate", "evaluate_folder", "export", "export_checkpoint", "find_dropout",
    "inspect_checkpoint", "kl_loss", "load_model", "mc_average", "mc_mode", "predict_folder", "read_folder",
    "resolve_preprocess", "save_bundle",
]
