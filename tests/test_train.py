"""train.py end to end on tiny data and tiny models: resume, SFT through sample.py, DDP, failures."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PAIRS, ROOT, run_script, write_jsonl
from test_prepare import corpus

from sample import load_checkpoint, reply

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=1", "--lr_decay_iters=8", "--learning_rate=1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_data")
    run_script("data/prepare.py", f"--input={write_jsonl(tmp / 'docs.jsonl', corpus(80))}",
               f"--out_dir={tmp / 'pre'}", "--block_size=32", "--val_fraction=0.2")
    run_script("data/prepare_sft.py", f"--input={write_jsonl(tmp / 'sft.jsonl', PAIRS)}",
               f"--out_dir={tmp / 'sft'}", "--block_size=48", "--val_fraction=0")
    return tmp


def train(*args, check=True, **kw):
    return run_script("train.py", *TINY, *args, check=check, **kw)


def test_resume_is_exact(data, tmp_path):
    common = [f"--data_dir={data / 'pre'}", "--eval_interval=3"]
    train(*common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=8")
    train(*common, f"--out_dir={tmp_path / 'halves'}", "--max_iters=4")
    train(*common, f"--out_dir={tmp_path / 'halves'}", "--max_iters=8", "--init_from=resume")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 8
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val"}
    assert [r["iter"] for r in records if r["split"] == "train"] == list(range(1, 9))


def test_checkpoint_holds_everything_later_scripts_need(data, tmp_path):
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "model_args", "config", "iter_num", "best_val_loss", "rng",
            "data_meta"} <= ckpt.keys()
    assert ckpt["data_meta"]["tokenizer"] == "gpt2" and ckpt["data_meta"]["block_size"] == 32
    assert ckpt["config"]["n_embd"] == 32 and ckpt["model_args"]["vocab_size"] == 50304
    model, _ = load_checkpoint(tmp_path)
    assert not model.training


def test_sft_model_answers_its_training_pairs_through_sample(sft_model):
    """Training and sampling share one template: the model reproduces what it was trained on."""
    model, ckpt = load_checkpoint(sft_model)
    assert ckpt["data_meta"]["sft_template"] == "问：{question}\n答："
    wrong = [(p["question"], got) for p in PAIRS
             if (got := reply(model, ckpt, p["question"], "chat", temperature=0, max_new_tokens=20)) != p["answer"]]
    assert not wrong, wrong
    proc = run_script("sample.py", f"--out_dir={sft_model}", f"--start={PAIRS[3]['question']}", "--temperature=0")
    assert PAIRS[3]["answer"] in proc.stdout


def test_ddp_two_cpu_processes(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *TINY, f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}",
                           "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("saved ") >= 1
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and len(ckpt["rng"]["batch"]) == 2
    train_lines = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "train"]
    assert [r["iter"] for r in train_lines] == [1, 2, 3, 4], "only rank 0 writes"


def test_missing_data_and_checkpoints_have_clear_messages(data, tmp_path):
    proc = train(f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode == 1 and "prepare the data first" in proc.stderr and "Traceback" not in proc.stderr
    proc = train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path / 'empty'}", "--init_from=resume", check=False)
    assert proc.returncode == 1 and "no checkpoint here" in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    proc = train(f"--data_dir={data / 'pre'}", "--init_from=pretrained", f"--init_checkpoint={tmp_path / 'bad'}",
                 f"--out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 1 and "not a readable MiniGLM checkpoint" in proc.stderr


def test_block_size_mismatch_names_both_sides(data, tmp_path):
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path / 'pre'}", "--max_iters=2", "--eval_interval=2")
    proc = train(f"--data_dir={data / 'sft'}", "--init_from=pretrained", f"--init_checkpoint={tmp_path / 'pre'}",
                 f"--out_dir={tmp_path / 'sft'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "block_size=32" in proc.stderr and "block_size=48" in proc.stderr


def test_tokenizer_mismatch_names_both_sides(data, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(data / "pre", d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(meta | {"tokenizer": "cl100k_base"}))
    proc = train(f"--data_dir={d}", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode == 1 and "'cl100k_base'" in proc.stderr and "'gpt2'" in proc.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    proc = train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=40",
                 "--learning_rate=1e30", "--grad_clip=0.0", "--eval_interval=1000", check=False)
    assert proc.returncode == 1 and "stopped. The last good checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def start_training(data, out, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--data_dir={data / 'pre'}",
                             f"--out_dir={out}", "--max_iters=100000", "--lr_decay_iters=100000", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, seconds=120):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    assert cond()


def test_ctrl_c_saves_a_checkpoint(data, tmp_path):
    proc = start_training(data, tmp_path, "--eval_interval=100000")
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and '"split": "train"' in metrics.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "saving a checkpoint" in err and "Traceback" not in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] >= 1


def test_kill_during_saves_never_corrupts_the_checkpoint(data, tmp_path):
    for delay in (0.0, 0.13, 0.31):
        proc = start_training(data, tmp_path, "--eval_interval=1", "--always_save_checkpoint=True")
        wait_for(lambda: (tmp_path / "ckpt.pt").exists())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        load_checkpoint(tmp_path)  # raises if ckpt.pt were half-written
        (tmp_path / "ckpt.pt").unlink()


def test_gpu_config_on_cpu_warns_and_runs(data, tmp_path):
    proc = run_script("train.py", "config/train_config.py", *TINY, "--compile=False", "--max_iters=1",
                      f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}")
    assert "sized for a CUDA GPU" in proc.stderr


def test_unknown_config_key_is_rejected():
    proc = run_script("train.py", "--learnig_rate=1e-3", check=False)
    assert proc.returncode != 0 and "unknown key 'learnig_rate'" in proc.stderr


def test_sample_cli_bad_input(data, tmp_path):
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'none'}", "--start=你好", check=False)
    assert proc.returncode != 0 and "no checkpoint here" in proc.stderr and "Traceback" not in proc.stderr
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_interval=1")
    proc = run_script("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'missing.txt'}", check=False)
    assert proc.returncode != 0 and "cannot read the file" in proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--mode=poem", check=False)
    assert proc.returncode != 0 and "expected chat or generate" in proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--dtype=int8", "--start=你好", check=False)
    assert proc.returncode != 0 and "expected float32, bfloat16 or float16" in proc.stderr
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
