"""Shared helpers: run a repo script in a subprocess, write small JSON/JSONL inputs; a tiny trained SFT model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """python <script> args..., from the repo root, with this interpreter."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_meta(out_dir: Path) -> dict:
    return json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))


def read_bin(path: Path, dtype=np.uint16) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


@pytest.fixture(scope="session")
def enc():
    """GPT-2's tiktoken Encoding (the tests that predate the trained tokenizer use it directly)."""
    from data.tokenizer import load_tokenizer
    return load_tokenizer("gpt2").enc


WORDS = ["画蛇添足", "守株待兔", "亡羊补牢", "掩耳盗铃", "对牛弹琴", "井底之蛙", "狐假虎威", "刻舟求剑",
         "叶公好龙", "杯弓蛇影", "画龙点睛", "拔苗助长", "望梅止渴", "卧薪尝胆", "破釜沉舟", "四面楚歌",
         "纸上谈兵", "指鹿为马", "闻鸡起舞", "班门弄斧"]
PAIRS = [{"question": f"第{i + 1}个成语是什么？", "answer": f"是{w}。"} for i, w in enumerate(WORDS)]


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    """The out_dir of a tiny SFT model (2 layers, 64 wide) trained until it answers PAIRS word for word.
    Its data has one pair a block, in file order (--pack=False), so a test can find each pair's block."""
    tmp = tmp_path_factory.mktemp("sft_model")
    run_script("data/prepare_sft.py", f"--input={write_jsonl(tmp / 'sft.jsonl', PAIRS)}", f"--out_dir={tmp / 'data'}",
               "--block_size=48", "--val_fraction=0", "--tokenizer=gpt2", "--pack=False")
    run_script("train.py", f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}", "--n_layer=2", "--n_head=2",
               "--n_embd=64", "--batch_size=10", "--max_iters=250", "--lr_decay_iters=250", "--warmup_iters=10",
               "--learning_rate=3e-3", "--min_lr=3e-4", "--eval_interval=250", "--eval_iters=2", "--log_interval=50")
    return tmp / "out"


@pytest.fixture(scope="session")
def zh_tokenizer(tmp_path_factory) -> Path:
    """The file of a tiny trained tokenizer (vocabulary 512, data/train_tokenizer.py) for
    --tokenizer=PATH: trained on the tests' documents and SFT pairs, so its merges are real."""
    from test_prepare import corpus
    tmp = tmp_path_factory.mktemp("zh_tokenizer")
    rows = corpus(80) + [{"text": p["question"] + p["answer"]} for p in PAIRS]
    run_script("data/train_tokenizer.py", f"--input={write_jsonl(tmp / 'docs.jsonl', rows)}",
               f"--out_path={tmp / 'tiny.tiktoken'}", "--vocab_size=512", "--val_fraction=0")
    return tmp / "tiny.tiktoken"


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=1", "--lr_decay_iters=8", "--learning_rate=1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny prepared data for train.py: pretraining (pre, 80 documents) and SFT (sft, PAIRS)."""
    from test_prepare import corpus
    tmp = tmp_path_factory.mktemp("train_data")
    run_script("data/prepare.py", f"--input={write_jsonl(tmp / 'docs.jsonl', corpus(80))}",
               f"--out_dir={tmp / 'pre'}", "--block_size=32", "--val_fraction=0.2", "--tokenizer=gpt2")
    run_script("data/prepare_sft.py", f"--input={write_jsonl(tmp / 'sft.jsonl', PAIRS)}",
               f"--out_dir={tmp / 'sft'}", "--block_size=48", "--val_fraction=0", "--tokenizer=gpt2")
    return tmp


def train(*args, check=True, **kw):
    return run_script("train.py", *TINY, *args, check=check, **kw)


@pytest.fixture(params=["gpt2", "zh"])
def tokenizer(request, zh_tokenizer):
    """(--tokenizer value, Tokenizer), once with GPT-2's and once with the tiny trained one."""
    from data.tokenizer import load_tokenizer
    spec = "gpt2" if request.param == "gpt2" else str(zh_tokenizer)
    return spec, load_tokenizer(spec)
