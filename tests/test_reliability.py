"""The bad-input matrix: every case drives the CLI and must end in one clear line on stderr, a
non-zero exit code from the README's table, no traceback, unchanged inputs, and no partial output.

Sections follow the README's Reliability table: checkpoints, code that must never run, data,
outputs (inputs are never outputs; a real full disk), interruption and resume, nothing silent
(non-finite values, streaming = caching, classes by name, every input counted, images by bit
depth, option ranges), and the smaller ones. Permission cases run the CLI as an unprivileged
user when the tests run as root (root reads and writes through any mode bits); the full-disk
cases mount a small tmpfs, which needs root. Interruption cases run the CLI as a separate
process and signal it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tiny_arch
from conftest import ARCH, NO_DROPOUT_ARCH, TESTS, write_images
from ddtool.arch import factory_ref
from ddtool.checkpoint import save_bundle
from ddtool.cli import app
from ddtool.data import Preprocess

ROOT = TESTS.parent
README_CODES = {int(c) for c in re.findall(r"^\| (\d+) \|", (ROOT / "README.md").read_text(), re.M)}
DDTOOL = [sys.executable, "-m", "ddtool"]
runner = CliRunner()
SPEC = {"shape": [1, 8, 8], "dtype": "float32"}


def _hashes(folder: Path) -> dict[str, str]:
    """Every regular file under ``folder`` (not through symlinks; paths too long to open skipped)."""
    found = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if stat.S_ISREG(path.lstat().st_mode):
                    found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _check_failure(code: int, stderr: str, output: str, expected_code: int, fragment: str) -> None:
    assert code == expected_code, f"exit {code}, expected {expected_code}: {stderr}"
    assert code in README_CODES, f"exit code {code} is not in the README's table"
    lines = [line for line in stderr.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, the last thing said; progress lines of work done before it may precede it
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in output + stderr
    assert "\x1b" not in stderr, "terminal control codes in an error"


class World:
    """A tmp folder with inputs (in/) and outputs (out/), and a hash of the inputs."""

    def __init__(self, root: Path):
        self.root, self.inp, self.out = root, root / "in", root / "out"
        self.inp.mkdir()
        self.mark = root / "PWNED"  # what a payload would create
        torch.manual_seed(0)
        self.ckpt = self.inp / "teacher.pt"
        torch.save(tiny_arch.tiny().state_dict(), self.ckpt)
        write_images(self.inp / "images", 24)

    def run(self, *args):
        before = _hashes(self.inp)
        result = runner.invoke(app, [str(a) for a in args])
        assert _hashes(self.inp) == before, "an input was modified"
        assert not self.mark.exists(), "code from an input ran"
        return result

    def expect_failure(self, args, code, fragment):
        result = self.run(*args)
        _check_failure(result.exit_code, result.stderr, result.output, code, fragment)
        leftovers = [p for p in self.out.rglob("*") if p.is_file()] if self.out.exists() else []
        assert not leftovers, f"partial output left behind: {leftovers}"
        return result

    def expect_success(self, *args):
        result = self.run(*args)
        assert result.exit_code == 0, result.output
        return result

    def labelled(self, names=("0_a", "1_b", "2_c")) -> Path:
        folder = self.root / "labelled"
        if not folder.exists():
            for i, name in enumerate(names):
                write_images(folder / name, 4, seed=10 + i)
        return folder

    def bundle(self, ref: dict, name: str = "bundle", program: bool = False, classes=None, model=None) -> Path:
        folder = self.inp / name
        save_bundle(folder / "model.pt", model or tiny_arch.tiny(), arch_ref=ref, input_spec=SPEC, classes=classes,
                    preprocess=Preprocess(size=(8, 8)).as_dict(), program=program)
        return folder


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    monkeypatch.chdir(tmp_path)
    return World(tmp_path)


def distill_args(w: World, ckpt=None, data=None, arch=ARCH, *extra):
    return ["distill", ckpt or w.ckpt, "--arch", arch, "--data", data or w.inp / "images", "--out", w.out,
            "--epochs", 1, *extra]


def _subprocess(cmd: list[str], cwd: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


# --------------------------------------------------------------------------- checkpoints
def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


class Evil:
    def __reduce__(self):
        return (os.makedirs, (str(Path.cwd() / "PWNED"),))


def _fifo(w: World) -> Path:
    os.mkfifo(w.inp / "pipe.pt")
    return w.inp / "pipe.pt"


CHECKPOINT_CASES = {
    "missing": (lambda w: w.inp / "nope.pt", 3, "checkpoint not found"),
    "empty": (lambda w: _write(w.inp / "empty.pt", b""), 3, "is empty"),
    "truncated": (lambda w: _write(w.inp / "cut.pt", w.ckpt.read_bytes()[:300]), 3, "damaged or truncated"),
    "text file": (lambda w: _write(w.inp / "notes.pt", b"these are my notes\n"), 3, "not a format ddtool reads"),
    "random bytes": (lambda w: _write(w.inp / "noise.pt", np.random.default_rng(0).bytes(4096)), 3, "not a format ddtool reads"),
    "state dict not fitting --arch": (
        lambda w: (torch.save(tiny_arch.tiny(classes=5).state_dict(), w.inp / "five.pt"), w.inp / "five.pt")[1],
        3, "does not fit --arch"),
    "pickled module without --trust-checkpoint": (
        lambda w: (torch.save(tiny_arch.tiny(), w.inp / "full.pt"), w.inp / "full.pt")[1], 3, "--trust-checkpoint"),
    "a FIFO (would block forever)": (_fifo, 3, "not a regular file"),
    "NaN weights": (lambda w: (torch.save({k: v.fill_(float("nan")) if k == "5.weight" else v
                                           for k, v in tiny_arch.tiny().state_dict().items()}, w.inp / "nan.pt"),
                               w.inp / "nan.pt")[1], 3, "NaN or infinite weights"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoints(world, case):
    make, code, fragment = CHECKPOINT_CASES[case]
    world.expect_failure(distill_args(world, make(world)), code, fragment)


def test_malicious_pickle_runs_nothing(world):
    path = world.inp / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weights": Evil()}, f, protocol=2)
    world.expect_failure(distill_args(world, path), 3, "pickled Python objects")
    torch.save({"weights": Evil()}, world.inp / "evil_zip.pt")
    world.expect_failure(distill_args(world, world.inp / "evil_zip.pt"), 3, "pickled Python objects")


def test_model_without_dropout(world):
    torch.save(tiny_arch.no_dropout().state_dict(), world.inp / "plain.pt")
    world.expect_failure(distill_args(world, world.inp / "plain.pt", None, NO_DROPOUT_ARCH), 4, "no active dropout")


ARCH_FILES = {
    "raises SystemExit on import": ("raise SystemExit(0)\n", "build", "SystemExit"),
    "raises KeyboardInterrupt on import": ("raise KeyboardInterrupt\n", "build", "KeyboardInterrupt"),
    "factory raises SystemExit": ("def build(**kw):\n    raise SystemExit(0)\n", "build", "SystemExit"),
    "factory raises KeyboardInterrupt": ("def build(**kw):\n    raise KeyboardInterrupt\n", "build", "KeyboardInterrupt"),
}


@pytest.mark.parametrize("arch, fragment", [
    ("nowhere/net.py:build", "--arch file not found"),
    (f"{TESTS / 'tiny_arch.py'}:missing", "no callable named 'missing'"),
    (f"{TESTS / 'tiny_arch.py'}:broken", "the factory raised ValueError"),
    *[(name, name) for name in sorted(ARCH_FILES)],
])
def test_bad_arch(world, arch, fragment):
    if arch in ARCH_FILES:  # user code that tries to end the process: a clear error, never exit 0
        source, name, fragment = ARCH_FILES[arch]
        (world.root / "user_arch.py").write_text(source)
        arch = f"{world.root / 'user_arch.py'}:{name}"
    world.expect_failure(distill_args(world, None, None, arch), 3, fragment)


# --------------------------------------------------------------------------- code that must never run
def _evil_refs(w: World) -> dict[str, dict]:
    (w.inp / "evil_arch.py").write_text(f"open({str(w.mark)!r}, 'w').close()\n\ndef build(**kw):\n    pass\n")
    run = {"kind": "factory", "spec": "subprocess:run", "abs": "subprocess:run", "args": {"args": ["touch", str(w.mark)]}}
    return {
        "module callable (subprocess:run)": run,
        "file that runs on import": factory_ref(f"{w.inp / 'evil_arch.py'}:build"),
        "shrink of os:system": {"kind": "shrink", "keep": {"5": 4},
                                "base": {"kind": "factory", "spec": "os:system", "abs": "os:system",
                                         "args": {"command": f"touch {w.mark}"}}},
    }


BUNDLE_COMMANDS = {
    "inspect": lambda w, b: ["inspect", b],
    "predict": lambda w, b: ["predict", b, "--data", w.inp / "images"],
    "export": lambda w, b: ["export", b, "--format", "torchscript", "--out", w.out / "m.ts"],
    "evaluate --distilled": lambda w, b: ["evaluate", w.ckpt, "--arch", ARCH, "--data", w.labelled(), "--distilled", b,
                                          "--mc-samples", 2, "--no-timing"],
}


@pytest.mark.parametrize("command", sorted(BUNDLE_COMMANDS))
@pytest.mark.parametrize("ref", ["module callable (subprocess:run)", "file that runs on import", "shrink of os:system"])
def test_a_bundle_runs_no_code_it_names(world, ref, command):
    bundle = world.bundle(_evil_refs(world)[ref])
    world.expect_failure(BUNDLE_COMMANDS[command](world, bundle), 3, "pass --arch")


@pytest.mark.slow
@pytest.mark.parametrize("ref, fragment", [
    ({"kind": "factory", "spec": ARCH, "args": {"classes": 10**11}}, "memory"),
    ({"kind": "shrink", "base": {"kind": "factory", "spec": ARCH, "args": {}}, "keep": {"5": 10**9}}, "cannot keep"),
    ({"kind": "torchscript", "archive": "not bytes"}, "damaged ddtool bundle"),
    ({"kind": "nonsense"}, "unknown architecture reference"),
])
def test_a_bundle_of_hostile_data_is_a_checkpoint_error(world, ref, fragment):
    """A bundle's recorded arguments are data for the user's own factory: huge ones are refused
    before anything is allocated, malformed ones are a damaged bundle."""
    world.expect_failure(["inspect", world.bundle({**ref, "abs": ARCH}), "--arch", ARCH], 3, fragment)


def test_a_bundle_with_a_program_works_without_its_code(world):
    bundle = world.bundle(_evil_refs(world)["module callable (subprocess:run)"], program=True)
    doc = json.loads(world.expect_success("inspect", bundle, "--json").stdout)
    assert doc["format"] == "ddtool-bundle" and [d["p"] for d in doc["dropout"]] == [0.5, 0.5]
    world.expect_success("predict", bundle, "--data", world.inp / "images", "--json")


def _pt2(w: World) -> Path:
    from torch.export import Dim, export, save

    path = w.root / "good.pt2"
    save(export(tiny_arch.tiny().eval(), (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: Dim("batch")},)), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            b.writestr(item, edit(item.filename, a.read(item.filename)))
        prefix = a.namelist()[0].split("/")[0]
        for name, data in (extra or {}).items():
            b.writestr(f"{prefix}/{name}", data)
    return dst


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _evil_pt2(w: World, how: str) -> Path:
    good, dst = _pt2(w), w.inp / "evil.pt2"
    payload = _pickled((Evil(),))
    if how == "legacy data/weights/model.pt":
        return _rewrite(good, dst, lambda n, d: d, {"data/weights/model.pt": payload})
    if how == "sample inputs":
        return _rewrite(good, dst, lambda n, d: payload if "/sample_inputs/" in n else d)
    if how == "a pickled constant":
        config = json.dumps({"config": {"c": {"path_name": "c0", "is_param": False, "use_pickle": True,
                                              "tensor_meta": None}}}).encode()
        return _rewrite(good, dst, lambda n, d: config if n.endswith("model_constants_config.json") else d,
                        {"data/constants/c0": payload})
    if how == "a scripted object":
        config = json.dumps({"config": {"c": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True,
                                              "tensor_meta": None}}}).encode()
        return _rewrite(good, dst, lambda n, d: config if n.endswith("model_constants_config.json") else d,
                        {"data/constants/custom_obj_0": pickle.dumps(Evil())})
    if how == "a symbolic expression (sympy evaluates Python)":
        code = f"__import__('os').makedirs({str(w.mark)!r})".replace("'", "\\u0027").encode()
        return _rewrite(good, dst, lambda n, d: re.sub(rb"Symbol\('s\d+'[^\"]*\)", lambda _: code, d) if n.endswith("model.json") else d)
    if how == "a call target outside torch's operators":
        return _rewrite(good, dst, lambda n, d: d.replace(b"torch.ops.aten.relu.default", b"torch.os.system")
                        if n.endswith("model.json") else d)
    raise ValueError(how)


PT2_CASES = ["legacy data/weights/model.pt", "sample inputs", "a pickled constant", "a scripted object",
             "a symbolic expression (sympy evaluates Python)", "a call target outside torch's operators"]


@pytest.mark.parametrize("how", PT2_CASES)
def test_a_hostile_pt2_runs_nothing(world, how):
    world.expect_failure(["inspect", _evil_pt2(world, how)], 3, "refused" if "target" in how or "symbolic" in how else "pickled")


@pytest.mark.parametrize("how", ["legacy data/weights/model.pt", "a symbolic expression (sympy evaluates Python)"])
def test_the_load_guard_alone_stops_a_payload(world, how):
    """Defence in depth: even without the member checks, loading under the guard runs nothing."""
    from ddtool.checkpoint import code_free_loading

    path = _evil_pt2(world, how)
    with pytest.raises(Exception), code_free_loading():
        torch.export.load(str(path))
    assert not world.mark.exists()


def test_no_torch_load_without_weights_only():
    """Every torch.load in ddtool/ passes weights_only=True, except the one --trust-checkpoint path."""
    import ast

    allowed = {("checkpoint.py", "_load_pickled_module")}
    found = []
    for path in sorted((ROOT / "ddtool").glob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                owner = node
                while owner in parents and not isinstance(owner, ast.FunctionDef):
                    owner = parents[owner]
                found.append((path.name, getattr(owner, "name", "<module>"), node.lineno, safe))
    unsafe = [(f, fn, line) for f, fn, line, safe in found if not safe and (f, fn) not in allowed]
    assert found and not unsafe, f"torch.load without weights_only=True: {unsafe}"
    assert sum(1 for f, fn, _, safe in found if not safe) == 1  # the trusted path exists, once
    text = "\n".join(path.read_text() for path in (ROOT / "ddtool").glob("*.py"))
    assert len(re.findall(r"\btorch\.load\(", text)) == len(found)  # the grep sees what the parser sees
    assert not re.search(r"serialization\.load\(|pickle\.loads?\(|Unpickler\(|from torch(\.serialization)? import .*\bload\b", text)


# --------------------------------------------------------------------------- data
def _folder(w: World, name: str) -> Path:
    (w.inp / name).mkdir()
    return w.inp / name


def _mixed_bad(w: World, bad: int, good: int = 20, first: bool = False) -> Path:
    folder = _folder(w, "mixed")
    write_images(folder, good)
    ok = (folder / "img000.png").read_bytes()
    makers = [lambda p: p.write_bytes(b""), lambda p: p.write_bytes(ok[: len(ok) // 2]),
              lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))]
    for i in range(bad):  # "0bad" sorts before "img": the unreadable files come first
        makers[i % 3](folder / (f"0bad{i}.png" if first else f"bad{i}.png"))
    return folder


def _sizes(w: World) -> Path:
    folder = _folder(w, "sizes")
    write_images(folder, 3, size=8)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(folder / "big.png")
    return folder


def _nan(w: World, n: int = 1) -> Path:
    folder = _folder(w, "arrays")
    for i in range(n):
        np.save(folder / f"a{i}.npy", np.zeros((1, 8, 8), np.float32))
    np.save(folder / "b.npy", np.full((1, 8, 8), np.nan, np.float32))
    return folder


DATA_CASES = {
    "empty folder": (lambda w: _folder(w, "empty"), 5, "no readable inputs"),
    "only non-input files": (lambda w: (_folder(w, "docs"), (w.inp / "docs" / "a.txt").write_text("x"))[0], 5, "no readable inputs"),
    "too many corrupt images": (lambda w: _mixed_bad(w, 6), 5, "are unreadable (more than 10%)"),
    "30 of 31 images corrupt": (lambda w: _mixed_bad(w, 30, good=1), 5, "are unreadable (more than 10%)"),
    "images of different sizes": (_sizes, 5, "--size"),
    "npy holding NaN": (lambda w: _nan(w, 1), 5, "NaN or infinite"),
    "missing folder": (lambda w: w.inp / "nowhere", 5, "data folder not found"),
}
#: --cache-mb 0 streams the folder through a DataLoader worker; the default caches it.
PATHS = {"cached": [], "streamed": ["--cache-mb", 0, "--workers", 1]}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(world, case, path):
    make, code, fragment = DATA_CASES[case]
    world.expect_failure(distill_args(world, None, make(world), ARCH, *PATHS[path]), code, fragment)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_few_corrupt_images_are_skipped_and_counted_per_epoch(world, path):
    folder = _mixed_bad(world, 2, first=True)  # two unreadable files come first
    result = world.expect_success(*distill_args(world, None, folder, ARCH, *PATHS[path]), "--epochs", 2, "--json")
    assert "warning: skipped 2 unreadable file(s) of 22" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["inputs"] == 20 and [h["skipped_files"] for h in doc["history"]] == [2, 2]  # per epoch, not summed
    assert sorted(u["path"].rsplit("/", 1)[-1] for u in doc["unused"]) == ["0bad0.png", "0bad1.png"]


def test_a_dying_worker_is_one_line(world, monkeypatch):
    import ddtool.data

    real_read = ddtool.data.read_image

    def die(*args):
        if torch.utils.data.get_worker_info() is None:
            return real_read(*args)
        os._exit(3)  # what a decoder crash or the OOM killer does to a DataLoader worker

    folder = _folder(world, "crash")
    write_images(folder, 8)
    monkeypatch.setattr(ddtool.data, "read_image", die)
    world.expect_failure(distill_args(world, None, folder, ARCH, *PATHS["streamed"]), 5, "reading the inputs failed")


@pytest.mark.parametrize("mode, channels", [("L", 3), ("RGB", 1)])
def test_grayscale_and_rgb_are_converted_to_what_the_model_takes(world, mode, channels):
    folder = _folder(world, mode)
    write_images(folder, 8, mode=mode)
    torch.save(tiny_arch.tiny(channels=channels).state_dict(), world.inp / "c.pt")
    world.expect_success(*distill_args(world, world.inp / "c.pt", folder, ARCH, "--arch-args", f'{{"channels": {channels}}}'))
    assert (world.out / "model.pt").is_file()


# --------------------------------------------------------------------------- every input counted
def _entries(w: World) -> Path:
    data = _folder(w, "data")
    write_images(data, 8)
    write_images(w.root / "store", 6, seed=3)  # outside the data folder
    (data / "linked").symlink_to(w.root / "store")
    (data / "loop").symlink_to(data)
    (data / "broken.png").symlink_to(w.root / "nowhere.png")
    (data / "readme.txt").write_text("not an input")
    os.mkfifo(data / "pipe.png")
    deep = os.open(data, os.O_RDONLY)
    try:  # a path longer than PATH_MAX: made one folder at a time, relative to the last
        for _ in range(22):
            os.mkdir("d" * 200, dir_fd=deep)
            deep, old = os.open("d" * 200, os.O_RDONLY, dir_fd=deep), deep
            os.close(old)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(f"/proc/self/fd/{deep}/deep.png")
    finally:
        os.close(deep)
    return data


def test_every_input_is_counted_and_every_other_entry_reported(world):
    data = _entries(world)
    result = world.expect_success("predict", world.ckpt, "--arch", ARCH, "--data", data, "--json")
    doc = json.loads(result.stdout)
    assert len(doc["predictions"]) == 8
    reasons = {Path(u["path"]).name[:20]: u["reason"] for u in doc["unused"]}
    assert "leads outside" in reasons["linked"] and "--follow-outside" in reasons["linked"]
    assert "already searched" in reasons["loop"] and reasons["broken.png"] == "broken symlink"
    assert reasons["readme.txt"] == "not an input type" and "not a regular file" in reasons["pipe.png"]
    assert any("too long" in u["reason"] for u in doc["unused"])
    assert "note: " in result.stderr and "not used" in result.stderr
    followed = world.expect_success("predict", world.ckpt, "--arch", ARCH, "--data", data, "--json", "--follow-outside")
    assert len(json.loads(followed.stdout)["predictions"]) == 14
    inspected = json.loads(world.expect_success("inspect", world.ckpt, "--arch", ARCH, "--data", data, "--json").stdout)
    assert {Path(u["path"]).name[:20]: u["reason"] for u in inspected["unused"]} == reasons  # inspect lists them too


@pytest.mark.slow
def test_an_unreadable_subfolder_is_reported(world):
    data = _folder(world, "data")
    write_images(data / "open", 4)
    write_images(data / "locked", 4)
    (data / "locked").chmod(0o000)
    try:
        result = _without_root_powers([*DDTOOL, "predict", str(world.ckpt), "--arch", ARCH, "--data", str(data), "--json"],
                                      world.root)
    finally:
        (data / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc["predictions"]) == 4 and any("permission denied" in u["reason"] for u in doc["unused"])


# --------------------------------------------------------------------------- images mean what they show
def test_images_are_scaled_by_their_bit_depth_and_orientation(tmp_path):
    from ddtool.data import read_folder

    ramp = np.linspace(0, 1, 64, dtype=np.float64).reshape(8, 8)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "b_float.tif")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "c8.png")
    x = read_folder(tmp_path, Preprocess()).x.float()
    assert torch.allclose(x[0], x[2], atol=1) and torch.allclose(x[1], x[2], atol=1)  # 16-bit, float, 8-bit alike

    turned = tmp_path / "turned"
    turned.mkdir()
    arr = np.zeros((8, 8), np.uint8)
    arr[0, :] = 255  # a white top row, stored rotated with an EXIF tag saying so
    img = Image.fromarray(np.rot90(arr).copy())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    img.save(turned / "r.jpg", exif=exif, quality=100)
    shown = read_folder(turned, Preprocess()).x[0, 0].float()
    assert shown[0].mean() > 200 and shown[-1].mean() < 50


def test_an_animation_gives_its_first_frame_and_says_so(world):
    folder = _folder(world, "anim")
    write_images(folder, 3)
    frames = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(folder / "moving.png", save_all=True, append_images=frames[1:])
    result = world.expect_success("predict", world.ckpt, "--arch", ARCH, "--data", folder, "--json")
    doc = json.loads(result.stdout)
    assert len(doc["predictions"]) == 4 and "first frame" in result.stderr
    assert doc["notes"][0]["path"].endswith("moving.png") and "first" in doc["notes"][0]["reason"]


def test_out_of_range_float_images_are_refused_not_clipped(world):
    folder = _folder(world, "floats")
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(folder / "f.tif")
    world.expect_failure(["predict", world.ckpt, "--arch", ARCH, "--data", folder], 5, "outside [0, 1]")


# --------------------------------------------------------------------------- classes by name
LINEAR = f"{TESTS / 'tiny_arch.py'}:linear"


def _by_region(w: World, names: list[str], extra: list[str] = ()) -> tuple[Path, Path]:
    """A linear model whose class is the bright third of the image, and a folder of such images in
    one subfolder per class, named ``names`` in the model's class order."""
    weight = torch.zeros(3, 64)
    for c in range(3):
        weight[c, c * 21:(c + 1) * 21] = 1.0
    torch.save({"2.weight": weight, "2.bias": torch.zeros(3)}, w.inp / "linear.pt")
    folder = w.root / "by_name"
    for c, name in enumerate([*names, *extra]):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.zeros(64, np.uint8)
            pixels[(c % 3) * 21:(c % 3 + 1) * 21] = 100 + 50 * i
            Image.fromarray(pixels.reshape(8, 8)).save(folder / name / f"{i}.png")
    return w.inp / "linear.pt", folder


def test_evaluate_maps_class_folders_by_name(world):
    names = ["zeta", "alpha", "mid"]  # sorted, the folders would read alpha, mid, zeta: all wrong
    ckpt, folder = _by_region(world, names)
    result = world.expect_success("evaluate", ckpt, "--arch", LINEAR, "--data", folder, "--classes", ",".join(names),
                                  "--mc-samples", 2, "--no-timing", "--json")
    assert json.loads(result.stdout)["results"][0]["error"] == 0.0


@pytest.mark.parametrize("classes, extra, fragment", [
    (None, ["zz_extra"], "class folders in the data, but the model has 3 outputs"),
    ("zeta,alpha,mid", ["stranger"], "name no class of the model"),
    ("zeta,alpha", [], "2 class names for a model with 3 outputs"),
])
def test_evaluate_refuses_class_folders_that_do_not_fit(world, classes, extra, fragment):
    ckpt, folder = _by_region(world, ["zeta", "alpha", "mid"], extra)
    args = ["evaluate", ckpt, "--arch", LINEAR, "--data", folder, "--mc-samples", 2, "--no-timing"]
    world.expect_failure(args + (["--classes", classes] if classes else []), 5, fragment)


@pytest.mark.parametrize("command", ["distill", "export", "predict"])
def test_class_names_must_name_every_output(world, command):
    args = {"distill": distill_args(world),
            "export": _export_args(world),
            "predict": ["predict", world.ckpt, "--arch", ARCH, "--data", world.inp / "images"]}[command]
    world.expect_failure([*args, "--classes", "a,b"], 5, "2 class name(s) (a, b) for a model with 3 outputs")


# --------------------------------------------------------------------------- outputs: never an input
def _inputs_as_outputs(w: World) -> dict:
    bundle = w.inp / "bundle"
    bundle.mkdir()
    shutil.copy(w.ckpt, bundle / "model.pt")  # (any file named model.pt makes a bundle folder an input)
    links = w.root / "links"
    links.mkdir()
    (links / "link.ts").symlink_to(w.ckpt)
    os.link(w.ckpt, links / "hard.ts")
    ckdir = _folder(w, "ck")
    shutil.copy(w.ckpt, ckdir / "model.pt")
    return {
        "distill --out the checkpoint's folder": (distill_args(w, ckdir / "model.pt")[:-4] + ["--out", ckdir, "--force"]),
        "distill --out the data folder": (distill_args(w)[:-4] + ["--out", w.inp / "images", "--force"]),
        "export --out the input bundle": ["export", bundle, "--arch", ARCH, "--input-shape", "1,8,8", "--format",
                                          "torchscript", "--out", bundle / "model.pt", "--force"],
        "export --out a symlink to the input": ["export", w.ckpt, "--arch", ARCH, "--input-shape", "1,8,8", "--format",
                                                "torchscript", "--out", links / "link.ts", "--force"],
        "export --out a hard link to the input": ["export", w.ckpt, "--arch", ARCH, "--input-shape", "1,8,8", "--format",
                                                  "torchscript", "--out", links / "hard.ts", "--force"],
        "predict --out inside the data folder": ["predict", w.ckpt, "--arch", ARCH, "--data", w.inp / "images", "--out",
                                                 w.inp / "images" / "p.csv", "--force"],
        "evaluate --plot over the checkpoint": ["evaluate", w.ckpt, "--arch", ARCH, "--data", w.labelled(), "--plot",
                                                w.ckpt, "--force", "--mc-samples", 2, "--no-timing"],
        "export --out the --arch file": ["export", w.ckpt, "--arch", f"{w.inp / 'arch.py'}:tiny", "--input-shape", "1,8,8",
                                         "--format", "torchscript", "--out", w.inp / "arch.py", "--force"],
    }


OUTPUT_CASES = ["distill --out the checkpoint's folder", "distill --out the data folder", "export --out the input bundle",
                "export --out a symlink to the input", "export --out a hard link to the input",
                "predict --out inside the data folder", "evaluate --plot over the checkpoint", "export --out the --arch file"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_no_output_is_an_input_whatever_force_says(world, case):
    shutil.copy(TESTS / "tiny_arch.py", world.inp / "arch.py")
    world.expect_failure(_inputs_as_outputs(world)[case], 6, "input")


def test_a_plot_may_go_beside_the_bundle_it_evaluates(world):
    """The README's CI job writes evaluate's plot into the distill --out folder: that folder's
    bundle is an input, the folder itself is not."""
    world.expect_success(*distill_args(world))
    world.expect_success("evaluate", world.ckpt, "--arch", ARCH, "--data", world.labelled(), "--distilled", world.out,
                         "--plot", world.out / "eval.png", "--mc-samples", 2, "--no-timing")
    assert sorted(p.name for p in world.out.iterdir()) == ["eval.png", "history.json", "model.pt"]


def test_existing_output_needs_force(world):
    world.out.mkdir()
    (world.out / "model.pt").write_bytes(b"previous result")
    result = world.run(*distill_args(world))
    _check_failure(result.exit_code, result.stderr, result.output, 6, "--force")
    assert (world.out / "model.pt").read_bytes() == b"previous result"


def test_outputs_respect_the_umask_and_long_names(world):
    old = os.umask(0o022)
    name = "p" * 246 + ".csv"  # 250 characters: the staging name must still fit NAME_MAX
    try:
        world.expect_success(*distill_args(world))
        world.expect_success("predict", world.out, "--data", world.inp / "images", "--out", world.root / "preds" / name)
    finally:
        os.umask(old)
    for path in (world.out / "model.pt", world.out / "history.json", world.root / "preds" / name):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert sorted(p.name for p in world.out.iterdir()) == ["history.json", "model.pt"]
    assert [p.name for p in (world.root / "preds").iterdir()] == [name]


def test_predict_csv_with_a_file_name_that_is_not_utf8(world):
    folder = _folder(world, "latin1")
    write_images(folder, 2)
    os.rename(folder / "img000.png", os.fsencode(folder) + b"/caf\xe9.png")
    world.expect_success("predict", world.ckpt, "--arch", ARCH, "--data", folder, "--out", world.out / "p.csv")
    text = (world.out / "p.csv").read_text(encoding="utf-8")
    assert "caf\\xe9.png" in text and "img001.png" in text


def _without_root_powers(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` so that file mode bits apply: as root, without the capabilities that let root
    read and write through them (root's own files stay usable through their owner bits)."""
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without util-linux setpriv: mode bits cannot be enforced")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return _subprocess(cmd, cwd)


@pytest.mark.slow
def test_unreadable_checkpoint(world):
    before = _hashes(world.inp)
    world.ckpt.chmod(0o000)
    try:
        result = _without_root_powers([*DDTOOL, *map(str, distill_args(world))], world.root)
    finally:
        world.ckpt.chmod(0o644)
    _check_failure(result.returncode, result.stderr, result.stdout, 3, "not readable (permission denied)")
    assert _hashes(world.inp) == before and not world.out.exists()


@pytest.mark.slow
def test_unwritable_output_folder(world):
    locked = world.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = [*map(str, distill_args(world)[:-4]), "--out", str(locked / "out"), "--epochs", "1"]
        result = _without_root_powers([*DDTOOL, *args], world.root)
    finally:
        locked.chmod(0o755)
    _check_failure(result.returncode, result.stderr, result.stdout, 6, "locked")
    assert not any(locked.iterdir())


# --------------------------------------------------------------------------- a real full disk
@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    """A 2 MB tmpfs: a file system that really fills up (mounting needs root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk is a small tmpfs, and mounting one needs root (CI runs as root)")
    mount = tmp_path_factory.mktemp("tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@contextlib.contextmanager
def full(mount: Path, leave: int = 0):
    """The tmpfs filled up, but for ``leave`` bytes (whole pages); yields a folder on it."""
    for entry in mount.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (mount / "case").mkdir()
    with open(mount / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    size = (mount / "filler").stat().st_size
    os.truncate(mount / "filler", max(0, size - -(-leave // 4096) * 4096))
    try:
        yield mount / "case"
    finally:
        (mount / "filler").unlink(missing_ok=True)


def _only_the_filler(mount: Path, before: set[str]) -> None:
    left = {str(p.relative_to(mount)) for p in mount.rglob("*")}
    assert left == before, f"left on the full disk: {sorted(left - before)}"


FULL_DISK_WRITERS = {
    "ONNX export": lambda w, d: ["export", w.ckpt, "--arch", ARCH, "--input-shape", "1,8,8", "--out", d / "m.onnx"],
    "TorchScript export (aborted the process before)": lambda w, d: [
        "export", w.ckpt, "--arch", ARCH, "--input-shape", "1,8,8", "--format", "torchscript", "--out", d / "m.ts"],
    ".pt2 export (aborted the process before)": lambda w, d: [
        "export", w.ckpt, "--arch", ARCH, "--input-shape", "1,8,8", "--format", "pt2", "--out", d / "m.pt2"],
    "predictions CSV": lambda w, d: ["predict", w.ckpt, "--arch", ARCH, "--data", w.inp / "images", "--out", d / "p.csv"],
    "predictions JSON": lambda w, d: ["predict", w.ckpt, "--arch", ARCH, "--data", w.inp / "images", "--out", d / "p.json"],
    "evaluate --plot PNG": lambda w, d: ["evaluate", w.ckpt, "--arch", ARCH, "--data", w.labelled(), "--plot", d / "e.png",
                                         "--mc-samples", 2, "--no-timing"],
    "distill: resume state and bundle": lambda w, d: distill_args(w)[:-4] + ["--out", d / "distilled", "--epochs", 1],
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", sorted(FULL_DISK_WRITERS))
def test_a_full_disk_is_exit_6_with_nothing_left(world, tmpfs, writer):
    with full(tmpfs) as folder:
        before = {str(p.relative_to(tmpfs)) for p in tmpfs.rglob("*")}
        world.expect_failure(FULL_DISK_WRITERS[writer](world, folder), 6, "No space left on device")
        _only_the_filler(tmpfs, before)


def test_a_full_disk_at_the_bundle_keeps_the_resumable_state(world, tmpfs, monkeypatch):
    state = _kept_state(world, monkeypatch).stat().st_size  # the size of the resumable state
    shutil.rmtree(world.out)
    with full(tmpfs, leave=state + 8192) as folder:
        args = distill_args(world)[:-4] + ["--out", folder / "d", "--epochs", 1]
        result = world.run(*args)
        _check_failure(result.exit_code, result.stderr, result.output, 6, "No space left on device")
        assert sorted(p.name for p in (folder / "d").iterdir()) == ["resume.pt"]  # every epoch kept
    world.expect_success(*args, "--resume")  # space again: the run finishes from its state
    assert sorted(p.name for p in (folder / "d").iterdir()) == ["history.json", "model.pt"]


# --------------------------------------------------------------------------- interruption and resume
def _start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*DDTOOL, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> str:
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"never saw {text!r}: {seen}")


@pytest.mark.slow
def test_sigint_writes_a_resumable_checkpoint_a_second_run_is_refused_and_resume_finishes(world):
    args = distill_args(world)[:-2] + ["--epochs", 200, "--batch-size", 4]
    proc = _start(args, world.root)
    _wait_for(proc, "epoch 1/200")
    second = world.run(*distill_args(world), "--force")  # the same --out, while the first runs
    _check_failure(second.exit_code, second.stderr, second.output, 6, "in use by another ddtool run")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    _check_failure(proc.returncode, stderr, "", 130, "--resume")
    assert (world.out / "resume.pt").is_file() and not (world.out / "model.pt").exists()
    state = torch.load(world.out / "resume.pt", weights_only=True)
    assert state["epoch"] >= 1
    resume = [*args[:-4], "--epochs", state["epoch"] + 1, "--batch-size", 4, "--resume"]
    done = _subprocess([*DDTOOL, *map(str, resume)], world.root)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in world.out.iterdir()) == ["history.json", "model.pt"]


SLOW_WRITER = """
import sys, time
import ddtool.files as files
real_write = files._write_file
def slow_write(path, data):
    real_write(path, data)
    if path.name == "model.pt":
        print("writing the bundle", file=sys.stderr, flush=True)
        time.sleep(60)   # the window in which the test kills us
files._write_file = slow_write
from ddtool.cli import main
sys.argv = ["ddtool"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_sigkill_during_the_final_write_loses_nothing(world):
    script = world.root / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    args = distill_args(world)[:-2] + ["--epochs", 2, "--batch-size", 4]
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=world.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _wait_for(proc, "writing the bundle")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert torch.load(world.out / "resume.pt", weights_only=True)["epoch"] == 2  # every epoch survives
    assert not (world.out / "model.pt").exists() and list(world.out.glob(".ddtool-*.tmp"))
    world.expect_success(*args, "--resume")  # finishes at once, and clears what the killed writer left
    assert sorted(p.name for p in world.out.iterdir()) == ["history.json", "model.pt"]


def _kept_state(w: World, monkeypatch) -> Path:
    """A finished run whose final write failed: its resumable state stays."""
    import ddtool.files
    from ddtool.errors import OutputError

    real_commit = ddtool.files.Outputs.commit

    def failing_commit(self):  # the final write (the bundle) fails; resumable states are written
        if not any(dest.name == "model.pt" for dest in self.staged):
            return real_commit(self)
        self.discard()
        raise OutputError("could not write: No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ddtool.files.Outputs, "commit", failing_commit)
        assert w.run(*distill_args(w)).exit_code == 6
    assert (w.out / "resume.pt").is_file()
    return w.out / "resume.pt"


def _other_teacher(w: World) -> list:
    torch.manual_seed(1)
    torch.save(tiny_arch.tiny().state_dict(), w.inp / "other.pt")
    return distill_args(w, w.inp / "other.pt")


def _other_data(w: World) -> list:
    write_images(w.inp / "other_images", 24, seed=5)
    return distill_args(w, None, w.inp / "other_images")


def _wrong_shapes(w: World) -> list:
    path = w.out / "resume.pt"
    state = torch.load(path, weights_only=True)
    state["student"]["5.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    return distill_args(w)


RESUME_CASES = {
    "another teacher": (_other_teacher, 2, "the teacher differs"),
    "another data folder": (_other_data, 2, "the inputs differ"),
    "other --arch-args": (lambda w: distill_args(w, None, None, ARCH, "--arch-args", '{"p": 0.3}'), 2,
                          "the architecture differs"),
    "a state of other shapes": (_wrong_shapes, 3, "does not fit this run"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_refuses_another_run(world, monkeypatch, case):
    state = _kept_state(world, monkeypatch)
    make, code, fragment = RESUME_CASES[case]
    args = make(world)
    before = state.read_bytes()
    result = world.run(*args, "--resume")
    _check_failure(result.exit_code, result.stderr, result.output, code, fragment)
    assert state.read_bytes() == before and sorted(p.name for p in world.out.iterdir()) == ["resume.pt"]


# --------------------------------------------------------------------------- distill --check
def _check_folder(w: World, names=("0_a", "1_b", "2_c"), name: str = "check") -> Path:
    """A labelled check folder among the inputs (so that it is hashed as one): 4 images a class."""
    for i, sub in enumerate(names):
        write_images(w.inp / name / sub, 4, seed=20 + i)
    return w.inp / name


def _arrays_check(w: World) -> list:
    """Arrays are not resized as images are: (1, 5, 5) ones do not fit the 8x8 model."""
    for i, sub in enumerate(("0_a", "1_b", "2_c")):
        (w.inp / "arrays" / sub).mkdir(parents=True)
        for j in range(2):
            np.save(w.inp / "arrays" / sub / f"{j}.npy", np.full((1, 5, 5), 0.1 * (i + j), np.float32))
    return ["--check", w.inp / "arrays"]


def _flat_check(w: World) -> list:
    write_images(w.inp / "flat", 6, seed=3)
    return ["--check", w.inp / "flat"]


def _empty_check(w: World) -> list:
    (w.inp / "empty").mkdir()
    return ["--check", w.inp / "empty"]


CHECK_CASES = {
    "no class subfolders": (_flat_check, 5, "has no class subfolders"),
    "an empty folder": (_empty_check, 5, "has no class subfolders"),
    "a missing folder": (lambda w: ["--check", w.inp / "nowhere"], 5, "data folder not found"),
    "fewer class folders than outputs": (lambda w: ["--check", _check_folder(w, ("0_a", "1_b"))], 5,
                                         "2 class folders in the data, but the model has 3 outputs"),
    "a folder naming no class": (lambda w: ["--check", _check_folder(w, ("a", "b", "zz")), "--classes", "a,b,c"], 5,
                                 "name no class of the model"),
    "inputs of another shape": (_arrays_check, 8, "the model failed on inputs"),
    "a smaller student": (lambda w: ["--check", _check_folder(w), "--student-arch", f"{TESTS / 'tiny_arch.py'}:narrow"],
                          2, "a smaller student (--shrink, --student-arch) cannot hold"),
    "an MI head": (lambda w: ["--check", _check_folder(w), "--mi-head"], 2, "--check with --mi-head"),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_distill_check_refuses_a_folder_it_cannot_use_before_distilling(world, case):
    make, code, fragment = CHECK_CASES[case]
    result = world.expect_failure([*distill_args(world), *make(world)], code, fragment)
    assert "epoch 1/1" not in result.stderr  # refused before the first epoch


def test_a_resumed_run_checks_too(world, monkeypatch):
    _kept_state(world, monkeypatch)
    result = world.expect_success(*distill_args(world), "--check", _check_folder(world), "--resume", "--json")
    check = json.loads(result.stdout)["check"]
    assert check["n"] == 12 and check["kept"] in ("distilled", "standard")
    assert f"check on 12 labelled inputs: standard {100 * check['standard_error']:.2f}% error" in result.stderr
    from ddtool import load_model
    assert load_model(world.out).provenance["check"] == check
    assert sorted(p.name for p in world.out.iterdir()) == ["history.json", "model.pt"]


# --------------------------------------------------------------------------- nothing silent: option values
def _export_args(w: World, *extra, out=None):
    return ["export", w.ckpt, "--arch", ARCH, "--input-shape", "1,8,8", "--format", "torchscript", "--out",
            out or w.out / "m.ts", *extra]


OPTION_CASES = {
    "--lr inf": (lambda w: distill_args(w, None, None, ARCH, "--lr", "inf"), "--lr"),
    "--lr nan": (lambda w: distill_args(w, None, None, ARCH, "--lr", "nan"), "--lr"),
    "--lr 1e30": (lambda w: distill_args(w, None, None, ARCH, "--lr", "1e30"), "--lr"),
    "--weight-decay inf": (lambda w: distill_args(w, None, None, ARCH, "--weight-decay", "inf"), "--weight-decay"),
    "--mean nan": (lambda w: distill_args(w, None, None, ARCH, "--mean", "nan"), "--mean"),
    "--std inf": (lambda w: distill_args(w, None, None, ARCH, "--std", "inf"), "--std"),
    "--atol nan": (lambda w: _export_args(w, "--atol", "nan"), "--atol"),
    "--seed 1e23": (lambda w: distill_args(w, None, None, ARCH, "--seed", str(10**23)), "--seed"),
    "--workers -1": (lambda w: distill_args(w, None, None, ARCH, "--workers", "-1"), "--workers"),
    "--class-dim 7": (lambda w: distill_args(w, None, None, ARCH, "--class-dim", "7"), "--class-dim"),
    "--class-dim 0 (the batch axis)": (lambda w: distill_args(w, None, None, ARCH, "--class-dim", "0"), "--class-dim"),
    "--teacher-samples 100000": (lambda w: distill_args(w, None, None, ARCH, "--teacher-samples", "100000"),
                                 "--teacher-samples"),
    "predict --batch-size 0": (lambda w: ["predict", w.ckpt, "--arch", ARCH, "--data", w.inp / "images",
                                          "--batch-size", "0"], "--batch-size"),
    "--size 60000,60000": (lambda w: distill_args(w, None, None, ARCH, "--size", "60000,60000"), "--size"),
    "--input-shape of 10^12 values": (lambda w: ["inspect", w.ckpt, "--arch", ARCH, "--input-shape", "1,1000000,1000000"],
                                      "--input-shape"),
    "malformed --arch-args": (lambda w: distill_args(w, None, None, ARCH, "--arch-args", "{classes: 3"), "--arch-args"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_option_values_that_cannot_work(world, case):
    make, fragment = OPTION_CASES[case]
    world.expect_failure(make(world), 2, fragment)


def test_a_memory_estimate_refuses_what_cannot_fit(world):
    torch.save(tiny_arch.wide().state_dict(), world.inp / "wide.pt")
    # within --teacher-samples' range: 24 inputs x 10,000 samples through a 64 x 256 x 256 layer is 4 TB
    args = distill_args(world, world.inp / "wide.pt", None, f"{TESTS / 'tiny_arch.py'}:wide", "--teacher-samples",
                        10_000, "--size", "256,256")
    world.expect_failure(args, 2, "memory")


def test_a_forward_pass_that_cannot_fit_is_refused_before_it_runs(world, monkeypatch):
    """predict and evaluate measure the widest layer at the real input size on fake tensors (no
    memory): 64 channels x 512 x 512 floats is 64 MB a row, 24 rows at once, input and output,
    3 GB; the inputs alone (1 MB a row) fit in the 100 MB left here."""
    import ddtool.limits

    torch.save(tiny_arch.wide().state_dict(), world.inp / "wide.pt")
    wide = [world.inp / "wide.pt", "--arch", f"{TESTS / 'tiny_arch.py'}:wide", "--size", "512,512"]
    monkeypatch.setattr(ddtool.limits, "available_bytes", lambda device="cpu": 100 << 20)
    world.expect_failure(["predict", *wide, "--data", world.inp / "images"], 2, "predicting 24 inputs at a time needs")
    world.expect_failure(["evaluate", *wide, "--data", world.labelled(), "--mc-samples", 2, "--no-timing"], 2,
                         "evaluating")
    monkeypatch.setattr(ddtool.limits, "available_bytes", lambda device="cpu": 2 << 30)
    world.expect_success("predict", *wide, "--data", world.inp / "images", "--batch-size", 2)


# --------------------------------------------------------------------------- nothing silent: non-finite results
def test_a_model_giving_nan_is_never_a_result(world):
    (world.inp / "nan_arch.py").write_text(
        "import torch\nfrom torch import nn\n\nclass Nan(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = nn.Linear(64, 3)\n        self.drop = nn.Dropout(0.5)\n"
        "    def forward(self, x):\n        return self.drop(self.lin(x.flatten(1))) * torch.log(x.flatten(1)[:, :3] - 2)\n\n"
        "def build():\n    return Nan()\n")
    torch.save({"lin.weight": torch.zeros(3, 64), "lin.bias": torch.ones(3)}, world.inp / "nan_out.pt")
    arch = f"{world.inp / 'nan_arch.py'}:build"
    world.expect_failure(["predict", world.inp / "nan_out.pt", "--arch", arch, "--data", world.inp / "images", "--json"],
                         8, "NaN or infinite outputs")
    world.expect_failure(["evaluate", world.inp / "nan_out.pt", "--arch", arch, "--data", world.labelled(),
                          "--mc-samples", 2, "--no-timing"], 8, "NaN or infinite outputs")


def test_a_student_that_went_non_finite_is_never_saved(tmp_path, tiny_model):
    from ddtool import DistillConfig, distill
    from ddtool.errors import ModelError

    def poison(event):
        if event["event"] == "epoch":  # after the last step: the loss guard has nothing to see
            with torch.no_grad():
                for p in tiny_model_student.parameters():
                    p.fill_(float("inf"))

    tiny_model_student = tiny_arch.tiny()
    with pytest.raises(ModelError, match="NaN or infinite"):
        distill(tiny_model, torch.rand(8, 1, 8, 8), Preprocess(), DistillConfig(epochs=1, batch_size=4),
                progress=poison, student=tiny_model_student)


# --------------------------------------------------------------------------- smaller ones
def test_inspect_on_ddtools_own_torchscript_export(world):
    world.expect_success(*_export_args(world, out=world.root / "m.ts"))
    world.expect_failure(["inspect", world.root / "m.ts"], 4, "traced")


@pytest.mark.slow
def test_a_fifo_checkpoint_does_not_hang_and_errors_have_no_colour(world):
    os.mkfifo(world.inp / "pipe.pt")
    for args, code in (([*DDTOOL, "inspect", "pipe.pt"], 3), ([*DDTOOL, "distill", "--epochs", "zero"], 2)):
        result = _subprocess(args, world.inp, timeout=120, FORCE_COLOR="1", TERM="xterm-256color", COLUMNS="80")
        _check_failure(result.returncode, result.stderr, result.stdout, code, "")


# --------------------------------------------------------------------------- the README's table is this file
AREAS = {
    "Checkpoints": [test_bad_checkpoints, test_malicious_pickle_runs_nothing, test_model_without_dropout, test_bad_arch,
                    test_unreadable_checkpoint],
    "Code that must never run": [test_a_bundle_runs_no_code_it_names, test_a_bundle_with_a_program_works_without_its_code,
                                 test_a_bundle_of_hostile_data_is_a_checkpoint_error,
                                 test_a_hostile_pt2_runs_nothing, test_the_load_guard_alone_stops_a_payload,
                                 test_no_torch_load_without_weights_only],
    "Data, cached and streamed alike": [test_bad_data, test_a_few_corrupt_images_are_skipped_and_counted_per_epoch,
                                        test_a_dying_worker_is_one_line,
                                        test_grayscale_and_rgb_are_converted_to_what_the_model_takes],
    "Every input counted": [test_every_input_is_counted_and_every_other_entry_reported, test_an_unreadable_subfolder_is_reported],
    "Images mean what they show": [test_images_are_scaled_by_their_bit_depth_and_orientation,
                                   test_an_animation_gives_its_first_frame_and_says_so,
                                   test_out_of_range_float_images_are_refused_not_clipped],
    "Classes by name": [test_evaluate_maps_class_folders_by_name, test_evaluate_refuses_class_folders_that_do_not_fit,
                        test_class_names_must_name_every_output],
    "Outputs": [test_no_output_is_an_input_whatever_force_says, test_a_plot_may_go_beside_the_bundle_it_evaluates,
                test_existing_output_needs_force, test_unwritable_output_folder,
                test_outputs_respect_the_umask_and_long_names, test_predict_csv_with_a_file_name_that_is_not_utf8],
    "A real full disk": [test_a_full_disk_is_exit_6_with_nothing_left, test_a_full_disk_at_the_bundle_keeps_the_resumable_state],
    "Interruption and resume": [test_sigint_writes_a_resumable_checkpoint_a_second_run_is_refused_and_resume_finishes,
                                test_sigkill_during_the_final_write_loses_nothing, test_resume_refuses_another_run],
    "A labelled check": [test_distill_check_refuses_a_folder_it_cannot_use_before_distilling, test_a_resumed_run_checks_too],
    "Option values and memory": [test_option_values_that_cannot_work, test_a_memory_estimate_refuses_what_cannot_fit,
                                 test_a_forward_pass_that_cannot_fit_is_refused_before_it_runs],
    "Non-finite results": [test_a_model_giving_nan_is_never_a_result, test_a_student_that_went_non_finite_is_never_saved],
    "Smaller ones": [test_inspect_on_ddtools_own_torchscript_export, test_a_fifo_checkpoint_does_not_hang_and_errors_have_no_colour],
}


def _cases(test) -> int:
    count = 1
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            count *= len(mark.args[1])
    return count


def test_the_readme_table_counts_these_cases():
    tests = [v for k, v in globals().items() if k.startswith("test_") and callable(v) and k != "test_the_readme_table_counts_these_cases"]
    listed = [t for area in AREAS.values() for t in area]
    assert sorted(t.__name__ for t in listed) == sorted(t.__name__ for t in tests), "a test is in no area, or in two"
    rows = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \|", (ROOT / "README.md").read_text(), re.M))
    counts = {area: sum(_cases(t) for t in area_tests) for area, area_tests in AREAS.items()}
    assert {area: int(rows.get(area, -1)) for area in AREAS} == counts
    assert int(rows["Total"]) == sum(counts.values())
