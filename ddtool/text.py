"""Folders of text -> token tensors, with the checkpoint's own tokenizer.

A text folder holds

  .txt     one input per non-empty line
  .jsonl   one JSON object per line: ``text``, and ``text_pair`` when present (a sentence pair);
           a ``label`` (a class index, or a class name) makes the line labelled
  class subfolders of .txt files: every line of ``pos/*.txt`` is labelled ``pos``

Texts are tokenized with the tokenizer the checkpoint ships (its tokenizer.json read by the
``tokenizers`` package, or the fast tokenizer transformers' AutoTokenizer builds from the
folder), its special tokens added, truncated to ``--max-length`` tokens. Every input is one
integer tensor (K, L): the model's named inputs (input_ids, attention_mask, token_type_ids)
stacked, right-padded (see :mod:`ddtool.hf`). Batches are cut to their longest input
(:func:`trim`: dynamic padding), and distillation draws batches of similar lengths
(:func:`buckets`), so padding costs little.

The token perturbation (``--perturb-tokens P``, off by default) replaces each real token that is
not a special one ([CLS], [SEP], padding) with the tokenizer's mask token (its unknown token when
it has none) with probability P: the text counterpart of the paper's zeroed pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .errors import DataError, UsageError

TEXT_EXTS = (".txt", ".jsonl")
#: Batches of this many times the batch size are sorted by length before being cut (bucketing).
BUCKET_BATCHES = 50
#: Above this share of unreadable lines or files a folder is refused rather than read partially.
MAX_BAD_SHARE = 0.1


# --------------------------------------------------------------------------- the tokenizer
def _token_id(tok, *names: str) -> int | None:
    return next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)


def text_settings(tokenizer: str, names, max_length: int, kind: str, pad_id: int | None = None) -> dict:
    """What a bundle and an exported file record to read text as the model does: the tokenizer
    (tokenizer.json text), the named inputs, the length limit, the ids the perturbation needs,
    and the kind of output (logits, embedding, tokens)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tokenizer)
    except Exception as err:  # noqa: BLE001 - a damaged tokenizer.json
        raise DataError(f"the checkpoint's tokenizer could not be read: {err}") from None
    doc = json.loads(tokenizer)
    special = sorted({t["id"] for t in doc.get("added_tokens") or [] if t.get("special")})
    padding = doc.get("padding") or {}
    pad = padding.get("pad_id", _token_id(tok, "[PAD]", "<pad>"))
    unk = (doc.get("model") or {}).get("unk_token")
    return {"tokenizer": tokenizer, "names": list(names), "max_length": int(max_length), "kind": kind,
            "pad_id": int(pad if pad is not None else (pad_id or 0)), "special_ids": special,
            "mask_id": _token_id(tok, "[MASK]", "<mask>"), "unk_id": tok.token_to_id(unk) if unk else None}


def tokenizer(settings: dict):
    """The ``tokenizers.Tokenizer`` of ``settings``, truncating at its max length, not padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(settings["tokenizer"])
    tok.no_padding()
    tok.enable_truncation(settings["max_length"])
    return tok


def encode(settings: dict, texts: list[str], pairs: list[str | None] | None = None) -> torch.Tensor:
    """Texts (and optional second texts) as one (N, K, L) tensor, right-padded to the longest."""
    tok = tokenizer(settings)
    if pairs is not None and any(p is not None for p in pairs):
        encodings = [tok.encode(t, p) if p is not None else tok.encode(t) for t, p in zip(texts, pairs)]
    else:
        encodings = tok.encode_batch(texts)
    length = max((len(e.ids) for e in encodings), default=1)
    x = torch.zeros((len(encodings), len(settings["names"]), max(length, 1)), dtype=torch.long)
    x[:, 0] = settings["pad_id"]
    for i, e in enumerate(encodings):
        rows = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        for k, name in enumerate(settings["names"]):
            x[i, k, :len(e.ids)] = torch.tensor(rows[name], dtype=torch.long)
    return x


def trim(x: torch.Tensor) -> torch.Tensor:
    """A text batch cut to its longest input (dynamic padding); other tensors as they are."""
    if x.dim() != 3 or x.is_floating_point() or x.shape[1] < 2 or x.shape[0] == 0:
        return x
    length = int(x[:, 1].sum(dim=1).max())
    return x[:, :, :max(length, 1)]


def buckets(order: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Batches of the positions in ``order`` with similar lengths: each run of
    ``BUCKET_BATCHES * batch_size`` positions is sorted by length and cut into batches, and the
    batches are shuffled (seeded by ``order``, so the same order gives the same batches)."""
    out = []
    for chunk in order.split(BUCKET_BATCHES * batch_size):
        ranked = chunk[torch.argsort(lengths[chunk], stable=True)]
        out += list(ranked.split(batch_size))
    gen = torch.Generator().manual_seed(int(order[:8].sum()) if len(order) else 0)
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def token_noise(settings: dict | None, share: float, generator: torch.Generator | None = None):
    """The token perturbation (see the module docstring) as a callable on (N, K, L) batches, or None."""
    if not settings or share <= 0:
        return None
    replace = settings.get("mask_id") if settings.get("mask_id") is not None else settings.get("unk_id")
    if replace is None:
        raise UsageError("--perturb-tokens: the tokenizer has neither a mask nor an unknown token to put in")
    special = torch.tensor(settings.get("special_ids") or [], dtype=torch.long)

    def perturb(x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0]
        real = x[:, 1].bool() if x.shape[1] > 1 else torch.ones_like(ids, dtype=torch.bool)
        eligible = real & ~torch.isin(ids, special.to(ids.device))
        drawn = torch.rand(ids.shape, generator=generator, device=generator.device if generator is not None else "cpu")
        hit = (drawn.to(ids.device) < share) & eligible  # (drawn where the generator lives: the GPU's on CUDA)
        out = x.clone()
        out[:, 0] = torch.where(hit, torch.full_like(ids, replace), ids)
        return out

    return perturb


def parity_batches(settings: dict, shapes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """Seeded text batches of the given (batch, length) shapes, as a tokenizer gives them: the
    first input full length, the others shorter and right-padded; ids drawn from the vocabulary."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(settings["tokenizer"]).get_vocab_size()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        lengths = torch.randint(2, length + 1, (batch,), generator=gen)
        lengths[0] = length
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        rows = {"input_ids": torch.where(mask.bool(), ids, settings["pad_id"]), "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids)}
        out.append(torch.stack([rows[n] for n in settings["names"]], dim=1))
    return out


# --------------------------------------------------------------------------- folders
def _lines(path: Path) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        return [(n, line.rstrip("\n\r")) for n, line in enumerate(f, 1) if line.strip()]


def _record(path: Path, n: int, line: str):
    """One input of a file: (text, pair, label), or raises ValueError with the reason."""
    if path.suffix.lower() == ".txt":
        return line.strip(), None, None
    doc = json.loads(line)
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError(f"line {n} has no 'text' string")
    pair = doc.get("text_pair")
    label = doc.get("label")
    if (pair is not None and not isinstance(pair, str)) or not (label is None or isinstance(label, (int, str))) \
            or isinstance(label, bool):
        raise ValueError(f"line {n}: 'text_pair' must be a string and 'label' a class index or name")
    return doc["text"], pair, label


def _read_files(root: Path, paths: list[Path]):
    """Every input of the files: (where, text, pair, label, class folder), and the bad ones."""
    records, bad = [], []
    for path in paths:
        folder = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None
        try:
            lines = _lines(path)
        except (OSError, UnicodeDecodeError) as err:
            bad.append((path, f"{type(err).__name__}: {err}"[:160]))
            continue
        for n, line in lines:
            try:
                text, pair, label = _record(path, n, line)
            except ValueError as err:  # (json.JSONDecodeError is one)
                bad.append((path, f"line {n}: {err}"[:160]))
                continue
            records.append((Path(f"{path}:{n}"), text, pair, label, folder))
    return records, bad


def _labels(records, labelled: bool | None, root: Path):
    """Labels and class names: class subfolders, else the jsonl ``label`` fields (indices,
    or names sorted into classes), else none."""
    folders = {r[4] for r in records}
    by_folder = None not in folders and len(folders) >= 2 and not any(r[3] is not None for r in records)
    given = [r[3] for r in records]
    if labelled is False or not (by_folder or any(v is not None for v in given)):
        if labelled:
            raise DataError(f"{root} holds no labels (class subfolders of .txt, or .jsonl lines with a 'label')")
        return None, None
    if by_folder:
        classes = sorted(folders)
        return torch.tensor([classes.index(r[4]) for r in records]), classes
    if any(v is None for v in given):
        raise DataError(f"{root}: some .jsonl lines have a 'label' and others do not")
    if all(isinstance(v, int) for v in given):
        return torch.tensor(given), None
    if any(isinstance(v, int) for v in given):
        raise DataError(f"{root}: 'label' fields mix class indices and class names")
    classes = sorted(set(given))
    return torch.tensor([classes.index(v) for v in given]), classes


def read_texts(root: Path, paths: list[Path], settings: dict, labelled: bool | None = None, limit: int | None = None):
    """The texts of the files ``paths`` under ``root`` tokenized (see :func:`encode`): the
    tensor, one path per input (``file:line``), the labels and class names (or None), the
    unreadable lines and files (path, reason), and a sentence saying how they were read.
    More than ``MAX_BAD_SHARE`` unreadable is a :class:`DataError`."""
    records, bad = _read_files(root, paths)
    total = len(records) + len(bad)
    if not records:
        raise DataError(f"no readable texts in {root} (looked for {', '.join(TEXT_EXTS)})"
                        + (f"; e.g. {bad[0][0].name}: {bad[0][1]}" if bad else ""))
    if len(bad) > MAX_BAD_SHARE * total:
        raise DataError(f"{len(bad)} of {total} lines or files in {root} are unreadable (more than "
                        f"{MAX_BAD_SHARE:.0%}), e.g. {bad[0][0].name}: {bad[0][1]}")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable line(s) or file(s) of {total} in {root}, e.g. "
              f"{bad[0][0].name}: {bad[0][1]}", file=sys.stderr)
    records = records[:limit] if limit else records
    labels, classes = _labels(records, labelled, root)
    x = encode(settings, [r[1] for r in records], [r[2] for r in records])
    reading = (f"{len(records)} texts from {len(paths)} file(s) (.txt: a line each; .jsonl: 'text'"
               f"{' + text_pair' if any(r[2] is not None for r in records) else ''}), tokenized with the "
               f"checkpoint's tokenizer to at most {settings['max_length']} tokens "
               f"({', '.join(settings['names'])} passed by name)")
    return x, [r[0] for r in records], labels, classes, bad, reading
