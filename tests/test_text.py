"""Text and transformers end to end: tiny BertForSequenceClassification and sentence-transformers
folders built from configs (nothing downloaded), text folders, named-array inputs, token
perturbation, text ONNX exports and stale buffers in a state dict."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny_text as tt
from ddtool.checkpoint import load_model
from ddtool.cli import app
from ddtool.data import Preprocess, perturbation, read_folder
from ddtool.text import encode

pytest.importorskip("transformers")
runner = CliRunner()


def cli(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output)
    return result


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"clf": tt.classifier_folder(root / "clf"), "st": tt.sentence_folder(root / "st"),
            "data": tt.text_folder(root / "data"), "val": tt.labelled_jsonl(root / "val"), "root": root}


DISTILL = ("--epochs", 2, "--batch-size", 8, "--optimizer", "adam", "--lr", "1e-4", "--teacher-samples", 2)


def test_classifier_folder_end_to_end(folders, tmp_path):
    found = json.loads(cli("inspect", folders["clf"], "--data", folders["data"], "--json").stdout)
    assert found["output"] == "logits" and "tokenized with the checkpoint's tokenizer" in found["reading"]
    assert any(s["kind"] == "attention" or "attention" in s["name"] for s in found["dropout"])
    out = tmp_path / "d"
    done = json.loads(cli("distill", folders["clf"], "--data", folders["data"], "--out", out, "--export", "onnx",
                          *DISTILL, "--json").stdout)
    assert done["inputs"] == 48 and done["exports"][0]["max_abs_diff"] < 1e-4 and "48 texts" in done["reading"]
    report = json.loads(cli("evaluate", folders["clf"], "--data", folders["val"], "--distilled", out, "--mc-samples", 8,
                            "--no-timing", "--json").stdout)
    assert report["labelled"] and report["inputs"] == 30
    assert {r["method"] for r in report["results"]} == {"standard", "mc-8", "d"}
    assert all(r["error"] is not None and r["kl_to_mc"] is not None for r in report["results"] if r["method"] != "mc-8")
    bundle = json.loads(cli("predict", out, "--data", folders["val"], "--json").stdout)["predictions"]
    onnx = json.loads(cli("predict", out / "model.onnx", "--data", folders["val"], "--json").stdout)["predictions"]
    assert len(bundle) == 30 and [r["top"][0]["index"] for r in bundle] == [r["top"][0]["index"] for r in onnx]
    assert max(abs(a["top"][0]["probability"] - b["top"][0]["probability"]) for a, b in zip(bundle, onnx)) < 1e-4


def test_sentence_folder_reproduces_sentence_transformers_pooling(folders):
    loaded = load_model(folders["st"])
    settings = loaded.preprocess["text"]
    x = encode(settings, ["the red cat sees a dog", "a bird"])
    with torch.no_grad():
        got = loaded.model(x)
        tokens = loaded.model.model(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).last_hidden_state
    mask = x[:, 1].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=1)
    assert got.shape == (2, 32) and torch.allclose(got, expected, atol=1e-6)
    assert settings["max_length"] == 24 and loaded.model.kind == "embedding"


def test_sentence_folder_onnx_padding_invariant_at_unseen_lengths(folders, tmp_path):
    out = tmp_path / "d"
    done = json.loads(cli("distill", folders["st"], "--data", folders["data"], "--out", out, "--export", "onnx,pt2",
                          *DISTILL, "--json").stdout)
    assert done["history"][-1]["loss"] < 1  # MSE on unit-norm embeddings
    assert done["exports"][0]["parity_lengths"] == [5, 23] and done["exports"][1]["parity_lengths"] == [5, 23]
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    settings = load_model(out).preprocess["text"]
    short = "a cat"
    long = "the big red dog sees the small blue bird near the green tree today and the cat sleeps"
    alone = encode(settings, [short])
    batch = encode(settings, [short, long])
    assert alone.shape[-1] not in (5, 8, 23) and batch.shape[-1] not in (5, 8, 23)  # lengths not seen at export
    run = lambda x: session.run(None, {n: x[:, i].numpy() for i, n in enumerate(names)})[0]  # noqa: E731
    assert np.abs(run(alone)[0] - run(batch)[0]).max() < 1e-4
    rows = json.loads(cli("predict", out / "model.onnx", "--data", folders["val"], "--json").stdout)["predictions"]
    same = json.loads(cli("predict", out, "--data", folders["val"], "--json").stdout)["predictions"]
    assert len(rows[0]["output"]) == 32 and np.abs(np.array(rows[0]["output"]) - np.array(same[0]["output"])).max() < 1e-4
    program = json.loads(cli("predict", out / "model.pt2", "--data", folders["val"], "--json").stdout)["predictions"]
    assert np.abs(np.array(program[-1]["output"]) - np.array(same[-1]["output"])).max() < 1e-4
    report = json.loads(cli("evaluate", folders["st"], "--data", folders["data"], "--distilled", out, "--mc-samples", 8,
                            "--no-timing", "--json").stdout)
    distilled = next(r for r in report["results"] if r["method"] == "d")
    assert distilled["cosine_to_mc"] > 0.9 and distilled["mse_to_mc"] is not None and distilled["kl_to_mc"] is None


def test_base_encoder_output_choice_and_the_outputs_it_lists(folders, tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tt.bert_config()).save_pretrained(str(tmp_path / "enc"))
    tt.tokenizer_json(tmp_path / "enc" / "tokenizer.json")
    default = json.loads(cli("inspect", tmp_path / "enc", "--json").stdout)
    assert default["output"] == "last_hidden_state (tokens)"
    pooled = json.loads(cli("inspect", tmp_path / "enc", "--output", "pooler_output", "--json").stdout)
    assert pooled["output"] == "pooler_output (embedding)"
    bad = cli("inspect", tmp_path / "enc", "--output", "logits_x", code=8)
    assert "last_hidden_state" in bad.output and "pooler_output" in bad.output
    loaded = load_model(tmp_path / "enc")
    x = encode(loaded.preprocess["text"], ["a cat", "the big red dog sees the bird"])
    with torch.no_grad():
        out = loaded.model(x)
    assert out.shape[:2] == x[:, 0].shape and float(out[0, x[0, 1] == 0].abs().max()) == 0  # padding zeroed


def test_named_arrays_are_one_input_passed_by_name(folders, tmp_path):
    """Item 3: an .npz of input_ids + attention_mask is one input, not two."""
    loaded = load_model(folders["clf"])
    pre = Preprocess.from_dict(loaded.preprocess)
    x = encode(pre.text, tt.sentences(4, seed=5))
    (tmp_path / "arrays").mkdir()
    for i in range(4):
        np.savez(tmp_path / "arrays" / f"{i}.npz", input_ids=x[i, 0].numpy(), attention_mask=x[i, 1].numpy())
    inputs = read_folder(tmp_path / "arrays", pre, labelled=False)
    assert inputs.x.shape == (4, 3, x.shape[-1]) and "passed to the model by name" in inputs.reading
    assert torch.equal(inputs.x[:, :2], x[:, :2]) and not inputs.x[:, 2].any()  # token_type_ids absent: zeros
    with torch.no_grad():
        assert torch.allclose(loaded.model(inputs.x), loaded.model(x), atol=1e-5)
    found = json.loads(cli("inspect", folders["clf"], "--data", tmp_path / "arrays", "--json").stdout)
    assert "4 file(s) of named arrays" in found["reading"]
    other = Preprocess()  # a model without named inputs: each array of an .npz is its own input
    assert len(read_folder(tmp_path / "arrays", other, labelled=False)) == 8
    np.savez(tmp_path / "arrays" / "4.npz", input_ids=x[:1, 0].numpy(), attention_mask=x[:1, 1].numpy())
    batched = read_folder(tmp_path / "arrays", pre, labelled=False)  # return_tensors="np": a batch of one
    assert len(batched) == 5 and torch.equal(batched.x[4], batched.x[0])
    np.savez(tmp_path / "arrays" / "5.npz", input_ids=x[:2, 0].numpy(), attention_mask=x[:2, 1].numpy())
    two = cli("predict", folders["clf"], "--data", tmp_path / "arrays", code=5)  # a file of two inputs: unreadable
    assert "5.npz: named arrays of shape (2, " in two.output and "a file holds one input" in two.output


def test_pixel_perturbation_never_touches_token_ids_and_token_noise_spares_specials(folders):
    """Item 4: zeroing is for pixels; the token perturbation replaces real, non-special tokens."""
    settings = load_model(folders["clf"]).preprocess["text"]
    x = encode(settings, tt.sentences(64, seed=3))
    pixels = perturbation(0.9, "hv", torch.Generator().manual_seed(0))
    assert torch.equal(Preprocess(text=settings).prepare(x, pixels), x)
    words = perturbation(0.9, "", torch.Generator().manual_seed(0), settings, tokens=0.3)
    noisy = Preprocess(text=settings).prepare(x, words)
    changed = noisy[:, 0] != x[:, 0]
    assert torch.equal(noisy[:, 1:], x[:, 1:])  # masks and segments as they were
    special = torch.isin(x[:, 0], torch.tensor(settings["special_ids"])) | (x[:, 1] == 0)
    assert not changed[special].any() and (noisy[:, 0][changed] == settings["mask_id"]).all()
    share = changed.sum() / (~special).sum()
    assert abs(float(share) - 0.3) < 0.05


def test_state_dict_with_stale_position_ids_loads_and_says_so(tmp_path, capfd):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tt.bert_config(num_labels=2))
    state = dict(model.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]  # as older transformers saved it
    torch.save(state, tmp_path / "bert.pt")
    (tmp_path / "arch.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nimport tiny_text\n"
        "def build():\n    from transformers import BertForSequenceClassification\n"
        "    return BertForSequenceClassification(tiny_text.bert_config(num_labels=2))\n" % str(tt.__file__.rsplit("/", 1)[0]))
    loaded = load_model(tmp_path / "bert.pt", arch=f"{tmp_path / 'arch.py'}:build")
    err = capfd.readouterr().err
    assert "ignored 1 key" in err and "bert.embeddings.position_ids" in err
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_labelled_text_sets_and_max_length(folders, tmp_path):
    """Labels from class subfolders of .txt, or from .jsonl names; --max-length cuts the tokens."""
    settings = load_model(folders["clf"]).preprocess["text"]
    pre = Preprocess(text=settings)
    for name, lines in (("neg", ["the cat sleeps", "a dog runs"]), ("pos", ["the bird sees a fish"])):
        (tmp_path / "sub" / name).mkdir(parents=True)
        (tmp_path / "sub" / name / "x.txt").write_text("\n".join(lines) + "\n")
    inputs = read_folder(tmp_path / "sub", pre)
    assert inputs.classes == ["neg", "pos"] and inputs.labels.tolist() == [0, 0, 1]
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "a.jsonl").write_text('{"text": "a cat", "label": "pos"}\n{"text": "a dog", "label": "neg"}\n')
    named = read_folder(tmp_path / "named", pre)
    assert named.classes == ["neg", "pos"] and named.labels.tolist() == [1, 0]
    long = " ".join(tt.WORDS)
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "a.txt").write_text(long + "\n")
    assert read_folder(tmp_path / "long", Preprocess(text={**settings, "max_length": 9})).x.shape[-1] == 9
    found = json.loads(cli("inspect", folders["clf"], "--data", tmp_path / "long", "--max-length", 9, "--json").stdout)
    assert "at most 9 tokens" in found["reading"]


def test_max_length_is_refused_for_a_model_that_reads_no_text(tmp_path):
    from ddtool.pipeline import inspect_checkpoint
    from ddtool.errors import UsageError

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(UsageError, match="--max-length applies to text models"):
        inspect_checkpoint(tmp_path / "m.pt", trust=True, input_shape=(4,), max_length=9)


def test_unreadable_jsonl_lines_are_counted_and_too_many_refused(folders, tmp_path):
    from ddtool.errors import DataError

    pre = Preprocess(text=load_model(folders["clf"]).preprocess["text"])
    (tmp_path / "d").mkdir()
    good = "".join(json.dumps({"text": t}) + "\n" for t in tt.sentences(19))
    (tmp_path / "d" / "a.jsonl").write_text(good + "{broken\n")
    inputs = read_folder(tmp_path / "d", pre, labelled=False)
    assert len(inputs) == 19 and inputs.skipped == 1
    (tmp_path / "d" / "b.jsonl").write_text('{"no_text": 1}\n' * 5)
    with pytest.raises(DataError, match="unreadable"):
        read_folder(tmp_path / "d", pre, labelled=False)


def test_a_labelled_jsonl_folder_checks_a_text_student(folders, tmp_path):
    """``distill --check`` reads labelled .jsonl records as ``evaluate --data`` does."""
    result = cli("distill", folders["clf"], "--data", folders["data"], "--out", tmp_path / "d", *DISTILL,
                 "--check", folders["val"], "--json")
    check = json.loads(result.stdout)["check"]
    assert check["n"] == 30 and check["kept"] == ("standard" if check["distilled_error"] > check["standard_error"]
                                                  else "distilled")
    assert f"check on 30 labelled inputs: standard {100 * check['standard_error']:.2f}% error" in result.stderr
    assert load_model(tmp_path / "d").provenance["check"] == check
