"""Smaller students (Bulo et al. 2016, Sec. 5.3): distillation and compression in one run.

Two ways to get a student smaller than the teacher, both initialised from the teacher:

* ``--student-arch file.py:factory`` builds the user's own smaller network; every tensor whose
  name and shape match the teacher's is copied from it, the rest keeps the factory's init.
* ``--shrink NAME=FRACTION`` keeps the strongest ``FRACTION`` of the output units of a Linear or
  Conv layer and slices the layer after it (and any BatchNorm in between) to match. The
  strength of unit i is ||W_in[i]|| * ||W_next[:, i]||: the product of the norms of the weights
  feeding it and of the weights it feeds, so a unit that is either silent or ignored goes first.

A shrunk student is recorded in the bundle as its teacher's architecture plus the kept unit
counts: it rebuilds from the teacher's ``--arch`` named again (the bundle's program, which needs
no code, serves without it).
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import build_arch, factory_ref, load_state_dict_into
from .errors import UsageError
from .model import clone_model

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def parse_shrink(items: list[str] | None) -> dict[str, float]:
    """``["classifier.1=0.5", ...]`` -> ``{"classifier.1": 0.5}``."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not name or not 0 < fraction <= 1:
            raise UsageError(f"--shrink {item!r} must look like LAYER=FRACTION with 0 < FRACTION <= 1")
        out[name] = fraction
    return out


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"--shrink {name}: the model has no layer of that name") from None
    if not isinstance(layer, _LAYERS):
        raise UsageError(f"--shrink {name} is a {type(layer).__name__}; only Linear and Conv layers shrink")
    return layer


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _following(model: nn.Module, name: str):
    """The BatchNorms and the next weight layer after ``name``, in registration order."""
    names = [n for n, _ in model.named_modules()]
    units = _units(model.get_submodule(name))
    norms = []
    for other in names[names.index(name) + 1:]:
        module = model.get_submodule(other)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == units:
            norms.append(other)
        elif isinstance(module, _LAYERS):
            width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if width % units == 0:
                return norms, other, width // units  # >1: a conv flattened into a Linear
            raise UsageError(f"--shrink {name}: the next layer {other} takes {width} inputs, not a multiple of {units}")
    raise UsageError(f"--shrink {name}: no Linear or Conv layer follows it to slice")


def _slice_layer(layer: nn.Module, keep: torch.Tensor | None, keep_in: torch.Tensor | None) -> nn.Module:
    """A copy of ``layer`` with output units ``keep`` and input units ``keep_in`` (None = all)."""
    w = layer.weight.detach()
    if keep is not None:
        w = w[keep]
    if keep_in is not None:
        w = w[:, keep_in]
    if isinstance(layer, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    else:
        groups = getattr(layer, "groups", 1)
        if groups != 1:
            raise UsageError("--shrink does not slice grouped convolutions")
        new = type(layer)(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, 1, layer.bias is not None, layer.padding_mode)
    new.weight.data.copy_(w)
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.detach()[keep] if keep is not None else layer.bias.detach())
    return new.train(layer.training)


def _slice_norm(norm: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    new = type(norm)(len(keep), norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    state = {k: (v[keep] if v.dim() == 1 else v) for k, v in norm.state_dict().items()}
    new.load_state_dict(state)
    return new.train(norm.training)


def shrink(model: nn.Module, keep: dict[str, int], by_strength: bool = True) -> nn.Module:
    """Keep ``keep[name]`` output units of each named layer (the strongest ones), in place."""
    for name, k in keep.items():
        layer = _layer(model, name)
        units = _units(layer)
        if not isinstance(k, int) or not 0 < k <= units:
            raise UsageError(f"--shrink {name}: cannot keep {k!r} of its {units} units")
        norms, next_name, spatial = _following(model, name)
        nxt = model.get_submodule(next_name)
        if by_strength:
            w_in = layer.weight.detach().flatten(1).norm(dim=1)
            w_out = nxt.weight.detach().transpose(0, 1).reshape(units, spatial, -1).flatten(1).norm(dim=1) \
                if isinstance(nxt, nn.Linear) else nxt.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
            kept = torch.sort(torch.topk(w_in * w_out, k).indices).values
        else:
            kept = torch.arange(k)
        # a conv flattened (channel-major, as nn.Flatten does) into a Linear: each kept channel
        # keeps its block of `spatial` input features
        kept_in = (kept[:, None] * spatial + torch.arange(spatial)).flatten() if spatial > 1 else kept
        parent, child = _parent(model, name)
        setattr(parent, child, _slice_layer(layer, kept, None))
        for norm_name in norms:
            parent, child = _parent(model, norm_name)
            setattr(parent, child, _slice_norm(model.get_submodule(norm_name), kept))
        parent, child = _parent(model, next_name)
        setattr(parent, child, _slice_layer(nxt, None, kept_in))
    return model


def shrunk_student(teacher: nn.Module, teacher_ref: dict, fractions: dict[str, float]) -> tuple[nn.Module, dict]:
    """A copy of ``teacher`` with the given layers shrunk, and its architecture reference."""
    student = clone_model(teacher)
    keep = {name: max(1, round(_units(_layer(student, name)) * fraction)) for name, fraction in fractions.items()}
    shrink(student, keep)
    return student, {"kind": "shrink", "base": teacher_ref, "keep": keep}


def rebuild_shrunk(base: nn.Module, ref: dict) -> nn.Module:
    """The (untrained) module of a shrink reference, from the module its base reference builds:
    the first ``keep`` units of each layer, whose weights the bundle then loads."""
    return shrink(base, ref["keep"], by_strength=False)


def student_from_arch(teacher: nn.Module, spec: str, args: dict | None = None) -> tuple[nn.Module, dict, int]:
    """The user's student network, with every teacher tensor of the same name and shape copied in.

    Returns the student, its architecture reference, and how many tensors came from the teacher.
    """
    student = build_arch(spec, args)
    own, theirs = student.state_dict(), teacher.state_dict()
    copied = {k: theirs[k] for k in own if k in theirs and theirs[k].shape == own[k].shape}
    load_state_dict_into(student, {**own, **copied}, spec)
    return student, factory_ref(spec, args), len(copied)
