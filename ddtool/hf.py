"""Hugging Face transformers folders: every head, sentence-transformers pooling, the tokenizer.

A folder (config.json + weights) is loaded through the transformers class its config names
(never ``trust_remote_code``; a config naming an attention kernel on the Hub is refused) and
wrapped in :class:`HFModel`, a module of one tensor in and one tensor out, so that every stage
of ddtool (MC sampling, distillation, evaluation, export) sees what it sees for an image model.

Input. A text batch is one integer tensor (N, K, L): the K named inputs the model takes
(``input_ids``, ``attention_mask`` and, when its forward takes it, ``token_type_ids``) stacked
on axis 1, right-padded to a common length L. :class:`HFModel` unpacks it by name; a plain
(N, L) tensor is ``input_ids`` alone.

Output, by head:

  classifier heads       (a ``logits`` output)  the logits, distilled with KL as any classifier
  sentence-transformers  (modules.json)         what sentence-transformers computes: the pooling
                         1_Pooling/config.json names (mean over the attention mask, CLS, max,
                         mean / sqrt(length)), then the Normalize module when listed
  base encoders          (no logits)            the output named by ``--output``; by default
                         ``last_hidden_state`` with padded positions set to zero

``last_hidden_state`` is the default for a base encoder because every encoder has it and every
head reads it (a classifier's pooler, a pooling layer, a token tagger): a student that matches
it matches whatever is put on top. ``pooler_output`` is missing from many encoders (DistilBERT,
ELECTRA) and in BERT is the tanh layer of the next-sentence task. Padded positions are zeroed so
that they carry no loss.

Loss for embeddings. An embedding is not a distribution, so it is distilled with the squared
error, ``l(e, t) = ||e - t||^2``. It is the Bregman divergence of ``phi(t) = ||t||^2``:
``D_phi(t, e) = phi(t) - phi(e) - <grad phi(e), t - e> = ||t - e||^2``. Theorem 1(ii) of the
paper holds for any Bregman divergence taken with the teacher in the first argument, so the
expected loss against one masked teacher pass differs from the loss against the MC average
``E_sigma[f_sigma(x)]`` by a constant: the minimiser is the MC-average embedding, and averaging
K masked embeddings into the target (``--teacher-samples``) keeps it unbiased. The same holds
for the pooled, normalised embedding of a sentence-transformers model: the loss compares the
final output, whatever function of the masked network it is. (Cosine distance is not a Bregman
divergence; for unit-norm embeddings it equals half the squared error, but the MC average of
unit vectors is shorter than one, so MSE is the loss that targets that average exactly.)
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ModelError, first_line
from .limits import require_fits

#: The named inputs a text batch may stack, in this order.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: sentence-transformers pooling modes, as its 1_Pooling/config.json names them.
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
#: The output a base encoder is distilled on unless ``--output`` names another.
DEFAULT_OUTPUT = "last_hidden_state"


def pool(tokens: torch.Tensor, mask: torch.Tensor | None, modes: list[str]) -> torch.Tensor:
    """sentence-transformers' Pooling: the (N, L, H) token embeddings to (N, len(modes) * H),
    each mode over the real tokens only (``mask`` 1), concatenated in its order (cls, max,
    mean, mean_sqrt_len)."""
    mask = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device) if mask is None else mask
    m = mask.unsqueeze(-1).to(tokens.dtype)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(tokens[:, 0])
        elif mode == "max":
            parts.append(tokens.masked_fill(m == 0, -1e9).max(dim=1).values)
        else:
            total, count = (tokens * m).sum(dim=1), m.sum(dim=1).clamp_min(1e-9)
            parts.append(total / (count if mode == "mean" else count.sqrt()))
    return torch.cat(parts, dim=1)


class HFModel(nn.Module):
    """A transformers model as a module of one tensor in, one tensor out (see the module docstring).

    ``names``: the inputs stacked on axis 1 of a 3-D input; ``output``: the output returned
    (``None``: the logits); ``pooling``/``normalize``: a sentence-transformers head.
    """

    def __init__(self, model: nn.Module, names=TEXT_INPUTS[:2], output: str | None = None,
                 pooling: list[str] | None = None, normalize: bool = False):
        super().__init__()
        self.model, self.names, self.output = model, tuple(names), output
        self.pooling, self.normalize = list(pooling or []), normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if x.dim() == 2 else {n: x[:, i] for i, n in enumerate(self.names)}
        mask = inputs.get("attention_mask")
        out = self.model(**inputs)
        if self.pooling:
            tokens = pool(out["last_hidden_state"], mask, self.pooling)
            return F.normalize(tokens, p=2.0, dim=1) if self.normalize else tokens
        if self.output is None:
            return out["logits"]
        value = out[self.output]
        if self.output == "last_hidden_state" and mask is not None:
            value = value * mask.unsqueeze(-1).to(value.dtype)  # padded positions carry nothing
        return value

    @property
    def kind(self) -> str:
        """``logits``, ``embedding`` (one vector per input) or ``tokens`` (one per position)."""
        if self.pooling or self.output not in (None, "last_hidden_state"):
            return "embedding"
        return "logits" if self.output is None else "tokens"


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("this is a Hugging Face transformers folder; install ddtool[hf] to read it") from None
    transformers.utils.logging.disable_progress_bar()  # its bars would mix with ddtool's output
    return transformers


def check_config(config: dict, what: str) -> None:
    """A transformers config may name an attention kernel on the Hub (``org/repo``), which would
    be downloaded and run: refused, as ``trust_remote_code`` is."""
    for key in ("attn_implementation", "_attn_implementation"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, str) and "/" in value:
            raise CheckpointError(f"{what} asks for the attention kernel {value!r} from the Hub, which would run its "
                                  "code; ddtool never runs remote code")


def model_class(transformers, name: str):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{name!r} is not a transformers model class")
    return cls


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The text inputs the model's forward takes: input_ids, attention_mask, token_type_ids."""
    params = inspect.signature(model.forward).parameters
    return tuple(n for n in TEXT_INPUTS if n in params)


def head_of(ref: dict) -> dict:
    """The wrapper's settings a reference records (output, pooling, normalize, names)."""
    return {"names": ref.get("names", TEXT_INPUTS[:2]), "output": ref.get("output"),
            "pooling": ref.get("pooling"), "normalize": bool(ref.get("normalize", False))}


def from_config(ref: dict) -> HFModel:
    """Rebuild the (untrained) wrapped model a bundle's ``{"kind": "hf"}`` reference describes."""
    transformers = transformers_module()
    cls = model_class(transformers, ref["class"])
    config = json.loads(ref["config"])
    check_config(config, "the bundle's transformers config")

    def build():
        return HFModel(cls(cls.config_class.from_dict(config)), **head_of(ref))

    require_fits(build, f"the {ref['class']} its config describes")
    return build()


# --------------------------------------------------------------------------- a folder
def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{what} could not be read: {err}") from None


def sentence_head(folder: Path) -> tuple[list[str], bool] | None:
    """The pooling modes and the normalisation a sentence-transformers folder's modules.json
    lists, or None when the folder is not one."""
    if not (folder / "modules.json").is_file():
        return None
    modules = read_json(folder / "modules.json", f"{folder}/modules.json")
    if not isinstance(modules, list):
        raise CheckpointError(f"{folder}/modules.json is not a list of modules")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    known = {"Transformer", "Pooling", "Normalize"}
    if "Pooling" not in types or set(types) - known:
        raise CheckpointError(f"{folder}/modules.json lists {', '.join(types)}; ddtool reproduces Transformer, "
                              "Pooling and Normalize only")
    pooling_path = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling"))
    settings = read_json(folder / pooling_path / "config.json", f"{folder}/{pooling_path}/config.json")
    modes = [mode for key, mode in POOLING_KEYS.items() if settings.get(key)]
    other = [k for k, v in settings.items() if k.startswith("pooling_mode") and v and k not in POOLING_KEYS]
    if other or not modes:
        raise CheckpointError(f"{folder}/{pooling_path}/config.json asks for pooling {', '.join(other) or 'none'}; "
                              f"ddtool reproduces {', '.join(POOLING_KEYS.values())}")
    order = ["cls", "max", "mean", "mean_sqrt_len"]  # sentence-transformers concatenates in this order
    return sorted(modes, key=order.index), "Normalize" in types


def output_names(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The tensors the model returns on a short dummy input, by name."""
    ids = torch.ones((1, 4), dtype=torch.long)
    with torch.no_grad():
        out = model(**{n: ids if n != "token_type_ids" else torch.zeros_like(ids) for n in names})
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


def choose_output(model: nn.Module, names: tuple[str, ...], wanted: str | None, folder: Path) -> str | None:
    """The output to distill (None: the logits): ``wanted``, else the logits, else ``last_hidden_state``."""
    available = output_names(model, names)
    if wanted is None:
        if "logits" in available:
            return None
        if DEFAULT_OUTPUT in available:
            return DEFAULT_OUTPUT
        raise ModelError(f"{folder}: the model returns no logits and no {DEFAULT_OUTPUT}; choose an output with "
                         f"--output (it has {', '.join(available) or 'none'})")
    if wanted not in available:
        raise ModelError(f"{folder}: the model has no output {wanted!r}; it has {', '.join(available) or 'none'}")
    return None if wanted == "logits" else wanted


def load_folder(folder: Path, output: str | None = None) -> tuple[HFModel, dict]:
    """The folder's model wrapped (output chosen, sentence-transformers head reproduced) and
    its architecture reference."""
    transformers = transformers_module()
    config = read_json(folder / "config.json", f"{folder}/config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder}/config.json is not a JSON object")
    check_config(config, f"{folder}/config.json")
    classes = config.get("architectures") or []
    if not isinstance(classes, list) or not classes or not isinstance(classes[0], str):
        raise CheckpointError(f"{folder}/config.json names no architecture ('architectures' is empty)")
    cls = model_class(transformers, classes[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False).eval()
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"transformers could not load {folder}: {first_line(err)}") from None
    names = input_names(model)
    head = sentence_head(folder)
    if head is not None and output in (None, "sentence_embedding"):
        pooling, normalize, chosen = head[0], head[1], None
    else:
        pooling, normalize, chosen = None, False, choose_output(model, names, output, folder)
    wrapped = HFModel(model, names, chosen, pooling, normalize).eval()
    ref = {"kind": "hf", "class": cls.__name__, "config": model.config.to_json_string(), "names": list(names),
           "output": chosen, "pooling": pooling, "normalize": normalize}
    return wrapped, ref


def default_max_length(folder: Path, config: dict) -> int:
    """sentence-transformers' ``max_seq_length``, else the model's positions (at most 512)."""
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        value = read_json(path, str(path)).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    positions = config.get("max_position_embeddings")
    return min(positions, 512) if isinstance(positions, int) and positions > 2 else 512


def tokenizer_json(folder: Path) -> str | None:
    """The folder's tokenizer as tokenizer.json text: the file itself, else the fast tokenizer
    transformers' AutoTokenizer builds from the folder (vocab.txt, ...), else None."""
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} could not be read: {err}") from None
    transformers = transformers_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        return tok.backend_tokenizer.to_str()
    except Exception:  # noqa: BLE001 - no tokenizer files: the folder is used with arrays only
        return None
