"""sample.py, the command line over engine.py: answers, bad input, the interactive chat."""
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import PAIRS, ROOT, TINY, run_script, train

from data.tokenizer import SFT_TEMPLATE, load_tokenizer
from engine import load_model, prompt_ids, reply
from model import GPT, GPTConfig


def test_sft_model_answers_its_training_pairs_through_sample(sft_model):
    """Training and sampling share one template: the model reproduces what it was trained on."""
    model, ckpt = load_model(sft_model)
    assert ckpt["data_meta"]["sft_template"] == "问：{question}\n答："
    wrong = [(p["question"], got) for p in PAIRS
             if (got := reply(model, ckpt, p["question"], "chat", temperature=0, max_new_tokens=20)) != p["answer"]]
    assert not wrong, wrong
    proc = run_script("sample.py", f"--out_dir={sft_model}", f"--start={PAIRS[3]['question']}", "--temperature=0")
    assert PAIRS[3]["answer"] in proc.stdout


def test_sample_cli_bad_input(data, tmp_path):
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'none'}", "--start=你好", check=False)
    assert proc.returncode != 0 and "no checkpoint here" in proc.stderr and "Traceback" not in proc.stderr
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_interval=1")
    proc = run_script("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'missing.txt'}", check=False)
    assert proc.returncode != 0 and "cannot read the file" in proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--mode=poem", check=False)
    assert proc.returncode != 0 and "expected chat or generate" in proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--history_turns=-2", check=False)
    assert proc.returncode != 0 and "--history_turns=-2: expected -1 (as many as fit), 0 (none)" in proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--precision=int3", "--start=你好", check=False)
    assert proc.returncode != 0 and "--precision='int3': expected one of fp32, bf16, fp16, int8" in proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--dtype=float32", check=False)
    assert proc.returncode != 0 and "dtype was renamed: use --precision=fp32" in proc.stderr  # the value renamed too
    (tmp_path / "q.txt").write_text("床前\n\n明月\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    proc = run_script("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'q.txt'}",
                      "--max_new_tokens=5", f"--save_path={out}")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["床前", "明月"] and all(r["new_tokens"] <= 5 for r in rows)


def chat_in_a_terminal(out_dir, lines: list, *flags) -> list:
    """Run sample.py's interactive chat in a pseudo-terminal (it chats only when stdin is a tty), type
    lines one per prompt, then stop; the records it saved (--save_path), one per answer."""
    master, slave = os.openpty()
    saved = Path(out_dir) / f"chat{''.join(flags)}.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--out_dir={out_dir}", "--max_new_tokens=5",
                             "--temperature=0", f"--save_path={saved}", *flags],
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)

    def read_until(marker: str, seconds: float = 60) -> str:
        buf, deadline = b"", time.time() + seconds
        while marker.encode() not in buf and time.time() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
        return buf.decode("utf-8", errors="replace")

    try:
        assert "欢迎使用 MiniGLM" in read_until("用户：")
        for line in lines:
            os.write(master, f"{line}\n".encode())
            screen = read_until("用户：")
            assert "对话历史已清空" in screen if line == "clear" else "MiniGLM：" in screen and "tokens/s" in screen
        os.write(master, b"stop\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)
    return [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]


def test_interactive_chat_keeps_the_conversation_until_clear(tmp_path):
    """No --start in a terminal: ChatGLM-style chat. Each question comes after the earlier exchanges
    in the training template (as many as fit by default, --history_turns=N at most N, 0 none); clear
    starts over, stop quits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32))
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "config": {},
            "data_meta": {"tokenizer": load_tokenizer("gpt2").meta(), "kind": "sft", "block_size": 256,
                          "sft_template": SFT_TEMPLATE}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    questions = [p["question"] for p in PAIRS[:3]]
    rows = chat_in_a_terminal(tmp_path, [*questions, "clear", questions[0]])
    said = [(q, r["output"]) for q, r in zip(questions, rows[:3], strict=True)]  # rows[3]: the question after clear
    assert all(out for _, out in said)
    want = [prompt_ids(ckpt, q, "chat", said[:i]) for i, q in enumerate(questions)]
    assert [r["prompt_tokens"] for r in rows] == [len(ids) for ids in want] + [len(want[0])]
    rows = chat_in_a_terminal(tmp_path, questions, "--history_turns=1")
    said = [(q, r["output"]) for q, r in zip(questions, rows, strict=True)]
    assert rows[2]["prompt_tokens"] == len(prompt_ids(ckpt, questions[2], "chat", said[1:2]))
    rows = chat_in_a_terminal(tmp_path, questions[:2], "--history_turns=0")
    assert rows[1]["prompt_tokens"] == len(prompt_ids(ckpt, questions[1], "chat"))


def test_paths_are_relative_to_the_working_directory(data, tmp_path):
    """train.py and sample.py read --data_dir and write/read --out_dir relative to where they are run
    (as any command line tool does), not to the repository."""
    (tmp_path / "d").symlink_to(data / "sft")
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=300)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--data_dir=d", "--out_dir=out-here",
                           "--max_iters=1", "--eval_interval=1"], **run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out-here" / "ckpt.pt").exists() and not (ROOT / "out-here").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--out_dir=out-here", "--start=你好",
                           "--max_new_tokens=3", "--save_path=r.jsonl"], **run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "r.jsonl").read_text(encoding="utf-8"))["prompt"] == "你好"
