# make test / make demo set everything up on a fresh machine: a .venv, the CPU build of torch
# (pinned here only; pyproject.toml leaves torch open for GPU users), then ddtool itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DDTOOL := $(VENV)/bin/ddtool
STAMP  := $(VENV)/.ddtool-installed
DEMO   ?= build/demo
SAMPLE := samples/fmnist_quick.pt --arch samples/quick.py:quick

.PHONY: setup test demo image-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# The embedded sample end to end: inspect, distill, evaluate, export (under 5 minutes on 2 cores).
demo: $(STAMP)
	$(DDTOOL) inspect $(SAMPLE) --input-shape 1,28,28
	$(DDTOOL) distill $(SAMPLE) --data samples/unlabelled --out $(DEMO)/distilled --classes samples/classes.txt --force
	$(DDTOOL) export $(DEMO)/distilled --format onnx --out $(DEMO)/distilled.onnx --force
	$(DDTOOL) evaluate $(SAMPLE) --data samples/eval --distilled $(DEMO)/distilled

# The Docker image built and run for real: docker when an engine answers, else podman (see the script).
image-test:
	sh docker/image_test.sh

clean:
	rm -rf $(DEMO) build .pytest_cache
