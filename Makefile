# MiniGLM: `make demo` runs the main job on the embedded default data, `make test` the test suite.
# Both create .venv in the repo root and install requirements.txt into it first (once; again only
# when requirements.txt changes). `make test` also installs Debian's chromium (for the browser
# test) and a CJK font, with apt, when they are missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: setup browser demo test bench clean-data

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# Debian's chromium for the end-to-end test (playwright drives it; it never downloads a browser)
# and Noto CJK so pages and plots show Chinese. apt needs root: sudo when not root.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/opentype/noto ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-noto-cjk; \
	fi

demo: setup
	$(PY) data/fetch_data.py
	$(PY) data/prepare.py
	$(PY) data/prepare_sft.py
	$(PY) train.py config/train_cpu.py
	$(PY) train.py config/train_cpu_sft.py
	$(PY) sample.py --out_dir=out-cpu --start="《春日》" --max_new_tokens=80 --num_samples=2
	$(PY) sample.py --out_dir=out-cpu-sft --start=FILE:config/demo_questions.txt --max_new_tokens=80

test: setup browser
	$(PY) -m pytest

bench: setup
	$(PY) bench.py

clean-data:
	rm -rf data/processed_pretrain data/processed_sft
