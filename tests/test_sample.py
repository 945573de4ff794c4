"""sample.py, the command line over engine.py: answers, bad input, the interactive chat."""
import json
import subprocess
import sys
import time

from conftest import PAIRS, ROOT, TINY, run_script, train

from engine import load_model, reply


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


def test_interactive_chat_in_a_terminal(data, tmp_path):
    """No --start in a terminal: ChatGLM-style chat; clear starts over, stop quits."""
    import os
    import select
    run_script("train.py", *TINY, f"--data_dir={data / 'sft'}", f"--out_dir={tmp_path}", "--max_iters=1",
               "--eval_interval=1")
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--out_dir={tmp_path}", "--max_new_tokens=5"],
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
        os.write(master, "第一个成语是什么？\n".encode())
        reply_screen = read_until("用户：")
        assert "MiniGLM：" in reply_screen and "tokens/s" in reply_screen
        os.write(master, b"clear\n")
        assert "对话历史已清空" in read_until("用户：")
        os.write(master, b"stop\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


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
