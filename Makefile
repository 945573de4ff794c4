# MiniGLM: `make demo` runs the main job on the embedded default data, `make test` the test suite.
# Both create .venv in the repo root and install requirements.txt into it first (once; again only
# when requirements.txt changes). `make test` also installs requirements-test.txt (pytest,
# playwright: test-only, so `make demo` never installs them) and Debian's chromium (for the
# browser test) and a CJK font, with apt, when they are missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
TEST_STAMP := $(VENV)/.requirements-test-installed

.PHONY: setup test-setup browser fonts demo race test bench clean-data

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

test-setup: $(TEST_STAMP)

$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

# apt needs root: sudo when not root.
APT_INSTALL = sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); $$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

# Debian's chromium for the end-to-end test (playwright drives it; it never downloads a browser)
# and Noto CJK so that pages, screenshots and plots show Chinese.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/opentype/noto ]; then \
	  $(APT_INSTALL) chromium fonts-noto-cjk; fi

# The plots' Chinese labels: Noto CJK where apt exists; elsewhere (or if it fails) English labels.
fonts:
	@[ -d /usr/share/fonts/opentype/noto ] || ! command -v apt-get >/dev/null || { $(APT_INSTALL) fonts-noto-cjk; } \
	  || echo "fonts-noto-cjk not installed: the plots get English labels"

# make demo starts over: its two runs replace out-cpu and out-cpu-sft (--overwrite=True)
demo: setup fonts
	$(PY) data/fetch_data.py
	$(PY) data/train_tokenizer.py
	$(PY) data/prepare.py
	$(PY) data/prepare_sft.py --block_size=128
	$(PY) train.py config/train_cpu.py --overwrite=True
	$(PY) train.py config/train_cpu_sft.py --overwrite=True
	$(PY) sample.py --out_dir=out-cpu --start="《春日》" --max_new_tokens=80 --num_samples=2
	$(PY) sample.py --out_dir=out-cpu-sft --start=FILE:config/demo_questions.txt --max_new_tokens=80
	$(PY) evaluations.py --out_dir=out-cpu --max_samples=100 --seen_samples=50 --max_new_tokens=64 --report=True
	$(PY) evaluations.py --out_dir=out-cpu-sft --max_samples=200 --seen_samples=50 --report=True
	$(PY) visualize.py --out_dir=out-cpu,out-cpu-sft
	@echo
	@echo "完成。评测报告：out-cpu-sft/report.md、out-cpu/report.md（图：loss.png、eval.png，两次训练对比：out-cpu/loss_runs.png）"
	@echo "打开网页版：.venv/bin/python sample_gradio.py ，然后用浏览器访问 http://127.0.0.1:7860"

# README's tokenizer race: GPT-2's tokenizer against zh with the demo's first model (4 layers, 192
# wide, batch 8 x 256, AdamW 2e-3 cosine, 20 warmup steps) at equal CPU time: the step counts
# follow the ms/step ratio measured on a 2-core machine (3.4x), then the same evaluations.
# About 50 minutes on 2 cores; outputs in data/race-* and out-race-*.
RACE := --n_layer=4 --n_head=4 --n_embd=192 --batch_size=8 --warmup_iters=20 --learning_rate=2e-3 --min_lr=2e-4 --overwrite=True
RACE_SFT := --batch_size=8 --warmup_iters=10 --learning_rate=1e-3 --min_lr=1e-4 --overwrite=True
race: setup
	$(PY) data/fetch_data.py
	$(PY) data/train_tokenizer.py
	for t in gpt2 zh; do \
	  $(PY) data/prepare.py --tokenizer=$$t --out_dir=data/race-pre-$$t && \
	  $(PY) data/prepare_sft.py --tokenizer=$$t --out_dir=data/race-sft-$$t || exit 1; done
	$(PY) train.py config/train_cpu.py $(RACE) --data_dir=data/race-pre-gpt2 --out_dir=out-race-gpt2 --max_iters=400 --lr_decay_iters=400 --eval_interval=100
	$(PY) train.py config/train_cpu.py $(RACE) --data_dir=data/race-pre-zh --out_dir=out-race-zh --max_iters=1360 --lr_decay_iters=1360 --eval_interval=340
	$(PY) train.py config/train_cpu_sft.py $(RACE_SFT) --data_dir=data/race-sft-gpt2 --init_checkpoint=out-race-gpt2 --out_dir=out-race-gpt2-sft --max_iters=200 --lr_decay_iters=200 --eval_interval=50
	$(PY) train.py config/train_cpu_sft.py $(RACE_SFT) --data_dir=data/race-sft-zh --init_checkpoint=out-race-zh --out_dir=out-race-zh-sft --max_iters=680 --lr_decay_iters=680 --eval_interval=170
	for t in gpt2 zh; do \
	  $(PY) evaluations.py --out_dir=out-race-$$t --max_samples=100 --seen_samples=50 --max_new_tokens=64 && \
	  $(PY) evaluations.py --out_dir=out-race-$$t-sft --max_samples=200 --seen_samples=50 || exit 1; done

test: test-setup browser
	$(PY) -m pytest

bench: setup
	$(PY) bench.py

clean-data:
	rm -rf data/processed_pretrain data/processed_sft
