"""Property-based tests: the checkpoint sniffer and the folder reader, fed random bytes and names,
either succeed or raise ddtool's own error, never anything else."""

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ARCH
from ddtool.checkpoint import load_model, sniff_format
from ddtool.data import ARRAY_EXTS, IMAGE_EXTS, Preprocess, read_folder
from ddtool.errors import DDToolError

PROFILE = settings(max_examples=int(__import__("os").environ.get("DDTOOL_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEADS = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x08", b"{", b"\x89PNG\r\n\x1a\n"])
NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"), min_size=1, max_size=30)


@PROFILE
@given(head=HEADS, body=st.binary(max_size=2048))
def test_sniffer_and_loader_never_crash(head, body):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        path.write_bytes(head + body)
        try:
            assert sniff_format(path) in {"torchscript", "torch-zip", "torch-legacy", "safetensors", "torch-export"}
        except DDToolError:
            pass
        try:
            load_model(path, arch=ARCH)
        except DDToolError:
            pass


@PROFILE
@given(files=st.lists(st.tuples(NAMES, st.sampled_from(IMAGE_EXTS + ARRAY_EXTS + (".txt", "")), HEADS,
                                st.binary(max_size=512)), max_size=8))
def test_folder_reader_never_crashes(files):
    tmp = Path(tempfile.mkdtemp())
    try:
        for name, ext, head, body in files:
            if name in (".", ".."):
                continue
            try:
                (tmp / (name + ext)).write_bytes(head + body)
            except OSError:  # a name the filesystem refuses (too long in bytes, say)
                continue
        try:
            inputs = read_folder(tmp, Preprocess())
            assert len(inputs) >= 1 and isinstance(inputs.x, torch.Tensor)
        except DDToolError:
            pass
    finally:
        shutil.rmtree(tmp)
