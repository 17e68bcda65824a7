"""Which tensor of a model's output is its prediction.

Models return a tensor, a tuple/list, a dict, or a ``ModelOutput``-style object (a dict subclass
with attributes, as Hugging Face's). ``select`` picks the prediction by name or index; by default
it is the ``logits`` entry if there is one, else the first tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import DataError, ModelError, UsageError


def parse_select(text: str | None) -> str | int | None:
    """``--output`` as given on the command line: an index if it is an integer, else a name."""
    if text is None or text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def select_output(out, select: str | int | None = None) -> torch.Tensor:
    """The prediction tensor in ``out``; raise :class:`ModelError` if there is none."""
    if isinstance(out, torch.Tensor) and select is None:
        return out
    if isinstance(out, Mapping):
        keys = list(out.keys())
        if select is None:
            key = "logits" if "logits" in out else next((k for k in keys if isinstance(out[k], torch.Tensor)), None)
        elif isinstance(select, int):
            key = keys[select] if -len(keys) <= select < len(keys) else None
        else:
            key = select if select in out else None
        if key is None or not isinstance(out[key], torch.Tensor):
            raise ModelError(f"the model's output has no tensor {select!r}; it has {', '.join(map(str, keys))}")
        return out[key]
    if isinstance(out, (tuple, list)):
        if isinstance(select, str):
            if hasattr(out, "_fields") and select in out._fields:  # a namedtuple
                return select_output(getattr(out, select))
            raise ModelError(f"the model returns a {type(out).__name__}; choose its output by index, not {select!r}")
        index = 0 if select is None else select
        if not -len(out) <= index < len(out):
            raise ModelError(f"the model returns {len(out)} outputs; index {index} is out of range")
        return select_output(out[index])
    if isinstance(out, torch.Tensor):
        raise ModelError(f"the model returns a single tensor; there is no output {select!r} to choose")
    raise ModelError(f"the model returned {type(out).__name__}, not a tensor, tuple, dict or ModelOutput")


def check_classes(classes: list[str] | None, outputs: int) -> None:
    """Class names must name every output of the model, no more and no fewer."""
    if classes and len(classes) != outputs:
        raise DataError(f"{len(classes)} class name(s) ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}) "
                        f"for a model with {outputs} outputs")


def check_class_dim(out: torch.Tensor, class_dim: int) -> None:
    """The class axis ``class_dim`` must be an axis of the prediction ``out`` other than its batch axis 0."""
    if not (-out.dim() <= class_dim < out.dim() and class_dim % out.dim()):
        raise UsageError(f"--class-dim {class_dim}: the model's output has shape {tuple(out.shape)}, so the class axis "
                         f"is one of 1..{out.dim() - 1} (axis 0 is the batch)")
