# MiniGLM: `make demo` runs the main job on the embedded default data, `make test` the test suite.
# Both create .venv in the repo root and install requirements.txt into it first (once; again only
# when requirements.txt changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: setup demo test bench clean-data

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

demo: setup
	$(PY) data/fetch_data.py
	$(PY) data/prepare.py
	$(PY) data/prepare_sft.py
	$(PY) train.py config/train_cpu.py
	$(PY) train.py config/train_cpu_sft.py
	$(PY) sample.py --out_dir=out-cpu --start="《春日》" --max_new_tokens=80 --num_samples=2
	$(PY) sample.py --out_dir=out-cpu-sft --start=FILE:config/demo_questions.txt --max_new_tokens=80

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench.py

clean-data:
	rm -rf data/processed_pretrain data/processed_sft
