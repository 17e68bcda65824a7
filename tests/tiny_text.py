"""Tiny transformers folders built in tmp_path (random weights from a config, nothing downloaded),
with a word-level tokenizer.json made with the ``tokenizers`` package, and text folders."""

import json
import random
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a one red blue green small big cat dog bird fish tree house car road river hill sees likes finds "
         "runs sleeps eats near under over and with quickly slowly today").split()


def tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path))


def bert_config(**extra) -> "object":
    from transformers import BertConfig

    return BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.2,
                      attention_probs_dropout_prob=0.1, pad_token_id=0, **extra)


def classifier_folder(root: Path, labels: int = 3, seed: int = 0) -> Path:
    """A BertForSequenceClassification folder with a tokenizer."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(num_labels=labels))
    model.save_pretrained(str(root))
    tokenizer_json(root / "tokenizer.json")
    return root


def sentence_folder(root: Path, seed: int = 0, pooling: str = "mean", normalize: bool = True) -> Path:
    """A BertModel with a sentence-transformers head (modules.json, 1_Pooling/config.json)."""
    from transformers import BertModel

    torch.manual_seed(seed)
    BertModel(bert_config()).save_pretrained(str(root))
    tokenizer_json(root / "tokenizer.json")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m == {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens"}[pooling]
             for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    return root


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n)]


def text_folder(root: Path, n: int = 48, seed: int = 0) -> Path:
    """Unlabelled text: a .txt of one sentence a line and a .jsonl of records (some with a pair)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = sentences(n, seed)
    half = n // 2
    (root / "a.txt").write_text("\n".join(lines[:half]) + "\n\n")
    records = [{"text": t, **({"text_pair": lines[0]} if i % 4 == 0 else {})} for i, t in enumerate(lines[half:])]
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def labelled_jsonl(root: Path, labels: int = 3, n: int = 30, seed: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = sentences(n, seed)
    (root / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": i % labels}) + "\n"
                                             for i, t in enumerate(lines)))
    return root
