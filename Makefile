# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ASL    := $(VENV)/bin/asl

.PHONY: demo test venv venv-test smollm2 tiny-checkpoints goldens bench clean help check-kvpress gpu-wheels screenshots notebooks

help:
	@echo "make demo   - set up .venv, fetch SmolLM2 (once), answer a pass key hidden in ~1K tokens"
	@echo "make test   - set up .venv with the test extras and run the whole suite"
	@echo "make bench  - prefill speed and memory: reference and NumPy port vs transformers on SmolLM2"
	@echo "make tiny-checkpoints - regenerate the committed tiny checkpoints (deterministic)"
	@echo "make goldens - regenerate tests/goldens/ and print the diff of every change"
	@echo "make gpu-wheels - cp312 manylinux wheels of what the GPU image lacks, into .whl/ (docs/gpu.md)"
	@echo "make screenshots - docs/images/view-*.png: asl view of SmolLM2's demo run and of a planted-bug FAIL (docs/view.md)"
	@echo "make notebooks - run notebooks/*.ipynb top to bottom at full settings and write them back with their outputs (docs/notebooks.md)"
	@echo "make check-kvpress - judge kvpress's SnapKVPress with the oracle, in its own .venv-kvpress (docs/integrations.md)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,crosscheck]'
	@touch $@ $(VENV)/.base

venv: $(VENV)/.base
venv-test: $(VENV)/.test

smollm2: $(VENV)/.base
	$(ASL) fetch smollm2

demo: smollm2
	$(ASL) demo

test: $(VENV)/.test
	$(ASL) fetch smollm2
	$(PY) -m pytest

bench: $(VENV)/.test
	$(ASL) fetch smollm2
	$(PY) benchmarks/prefill_smollm2.py

tiny-checkpoints: $(VENV)/.base
	$(PY) -m reference.io.tiny

# The pictures of docs/view.md: SmolLM2's demo run and a planted-bug FAIL, as `asl view` draws them (headless chromium).
screenshots: smollm2
	@command -v chromium >/dev/null || { echo "make screenshots needs Debian's chromium: apt-get install chromium"; exit 1; }
	$(PY) docs/images/screenshots.py

# The notebooks as committed: executed top to bottom at full settings, outputs written into notebooks/*.ipynb;
# no execution times, progress bars or paths (docs/notebooks.md). nbclient and ipykernel come with the test extra.
notebooks: $(VENV)/.test
	$(ASL) fetch smollm2
	$(PY) notebooks/execute.py

goldens: $(VENV)/.base
	$(PY) -m reference.oracle.goldens --out tests/goldens

# The device check's missing packages (gguf, jsonschema and what they import), for `pip install --no-index`
# there; numpy and tqdm are on that image already. Never committed (.gitignore).
GPU_WHEELS := gguf pyyaml jsonschema jsonschema-specifications referencing rpds-py attrs typing-extensions
gpu-wheels: | $(PY)
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --dest .whl $(GPU_WHEELS)
	@ls .whl

# kvpress pins transformers<5.3 and brings pandas, datasets, peft: its own venv, remade only when its requirements change.
KVPRESS_VENV ?= .venv-kvpress
$(KVPRESS_VENV)/.stamp: examples/kvpress/requirements.txt pyproject.toml
	rm -rf $(KVPRESS_VENV)
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet -r examples/kvpress/requirements.txt -e .
	@touch $@

check-kvpress: $(KVPRESS_VENV)/.stamp
	$(KVPRESS_VENV)/bin/asl fetch smollm2
	$(KVPRESS_VENV)/bin/python examples/kvpress/kvpress_check.py --work out/kvpress
	$(KVPRESS_VENV)/bin/python examples/kvpress/kvpress_check.py --work out/kvpress --stable-topk
	$(KVPRESS_VENV)/bin/python examples/kvpress/kvpress_check.py --cases examples/kvpress/sweep.json --expected examples/kvpress/sweep-expected.json

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) .pytest_cache .hypothesis .whl
