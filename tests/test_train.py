"""train.py end to end on tiny data and tiny models: resume, DDP, loss
normalisation, throughput, checkpoints (best and last), failures."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, read_bin, run_script, train, write_jsonl

import checkpoint
from data.tokenizer import load_tokenizer
from data_utils import get_batch, load_dataset
from model import GPT, GPTConfig
from engine import load_model

def torchrun(*args, script=ROOT / "train.py", timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *TINY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def patched_train(tmp_path, patch: str):
    """A script that applies patch (Python source) and then runs train.py as __main__: a fault
    injected from outside, train.py itself has no test hooks. Returns (script, env)."""
    script = tmp_path / "patched_train.py"
    script.write_text(patch + f"\nimport runpy\nrunpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    return script, {**os.environ, "PYTHONPATH": str(ROOT)}


def records(out_dir, split):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def max_weight_difference(a, b) -> float:
    a, b = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def counted_per_block(data_dir, block_size):
    """Targets each block of a prepared SFT folder counts (get_batch masks the first token's mark)."""
    return read_bin(data_dir / "train_mask.bin", np.uint8).reshape(-1, block_size)[:, 1:].sum(1)


def test_forward_sum_reduction_is_the_mean_times_the_counted_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(64, (3, 8)), torch.randint(64, (3, 8))
    m = torch.rand(3, 8) < 0.4
    for return_logits in (True, False):
        _, mean = model(x, y, m, return_logits=return_logits)
        _, total = model(x, y, m, return_logits=return_logits, reduction="sum")
        assert total.item() == pytest.approx(mean.item() * m.sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction='avg'"):
        model(x, y, m, reduction="avg")


def test_gradient_accumulation_equals_one_big_batch(data, tmp_path):
    """SFT blocks count different numbers of targets: the mean of micro-batch means weights them
    unequally; two micro-batches of 2 must train exactly like one batch of 4."""
    assert len(set(counted_per_block(data / "sft", 48))) > 1, "the test needs uneven loss masks"
    common = [f"--data_dir={data / 'sft'}", "--max_iters=3", "--eval_interval=1000", "--grad_clip=0.0",
              "--learning_rate=1e-2"]
    train(*common, f"--out_dir={tmp_path / 'big'}", "--batch_size=4")
    train(*common, f"--out_dir={tmp_path / 'accum'}", "--batch_size=2", "--gradient_accumulation_steps=2")
    # Adam divides by sqrt(v): float rounding in tiny gradients moves a weight by up to ~5e-5 here;
    # the mean of micro-batch means moves them by ~1e-2
    assert max_weight_difference(tmp_path / "big" / "ckpt_last.pt", tmp_path / "accum" / "ckpt_last.pt") < 1e-3
    losses = [[r["loss"] for r in records(tmp_path / run, "train")] for run in ("big", "accum")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_loss_estimate_is_summed_nll_over_counted_targets(sft_model):
    """The val record of the SFT fixture's last iteration against a hand computation on the same
    batches (estimate_loss draws them from Generator(seed + 1000))."""
    model, ckpt = load_model(sft_model / "ckpt_last.pt")
    cfg = ckpt["config"]
    ds = load_dataset(ROOT / cfg["data_dir"], "train")
    g = torch.Generator().manual_seed(cfg["seed"] + 1000)
    nll, count, means = 0.0, 0.0, []
    with torch.no_grad():
        for _ in range(cfg["eval_iters"]):
            x, y, m = get_batch(ds, cfg["batch_size"], "cpu", g)
            logits, _ = model(x, y, m)
            batch = (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * m.flatten()).sum().item()
            nll, count = nll + batch, count + m.sum().item()
            means.append(batch / m.sum().item())
    # the mean of batch means is about 1.7e-4 off here: ten times the tolerance below
    assert abs(sum(means) / len(means) - nll / count) > 1e-4 * nll / count, "the test needs uneven batches"
    assert records(sft_model, "val")[-1]["train_loss"] == pytest.approx(nll / count, rel=1e-5)


def test_tokens_per_s_counts_targets_and_the_log_shows_the_uncounted_share(tmp_path):
    pairs = [{"question": f"第{i}题是什么？", "answer": f"答案是{i}。"} for i in range(1, 10)]
    run_script("data/prepare_sft.py", "--tokenizer=gpt2", f"--input={write_jsonl(tmp_path / 'sft.jsonl', pairs)}",
               f"--out_dir={tmp_path / 'sft'}", "--block_size=48", "--val_fraction=0", "--pack=False")
    counted = counted_per_block(tmp_path / "sft", 48)
    assert len(set(counted)) == 1, "every block counts the same targets: the share is known"
    share = 1 - counted[0] / 48
    proc = train(f"--data_dir={tmp_path / 'sft'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=3",
                 "--eval_interval=1000")
    lines = records(tmp_path / "out", "train")
    assert len(lines) == 3
    for r in lines:
        assert r["uncounted_share"] == pytest.approx(share)
        assert r["positions_per_s"] == pytest.approx(4 * 48 / (r["ms_per_iter"] / 1000), rel=1e-6)
        assert r["tokens_per_s"] == pytest.approx(r["positions_per_s"] * (1 - share), rel=1e-6)
    assert f"{share:.1%} of positions uncounted" in proc.stdout


def test_resume_is_exact(data, tmp_path):
    common = [f"--data_dir={data / 'pre'}", "--eval_interval=3"]
    train(*common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=8")
    train(*common, f"--out_dir={tmp_path / 'halves'}", "--max_iters=3")  # stops at an eval: same bests
    train(*common, f"--out_dir={tmp_path / 'halves'}", "--max_iters=8", "--init_from=resume")
    for name in ("ckpt_last.pt", "ckpt.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ("straight", "halves"))
        assert a["iter_num"] == b["iter_num"] and a["best_val_loss"] == b["best_val_loss"]
        assert max_weight_difference(tmp_path / "straight" / name, tmp_path / "halves" / name) == 0
    assert torch.load(tmp_path / "halves" / "ckpt_last.pt", weights_only=True)["iter_num"] == 8
    records = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val"}
    assert [r["iter"] for r in records if r["split"] == "train"] == list(range(1, 9))


def test_checkpoint_holds_everything_later_scripts_need(data, tmp_path):
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "model_args", "config", "iter_num", "best_val_loss", "rng",
            "data_meta", "scaler"} <= ckpt.keys()
    assert {"batch", "torch"} <= ckpt["rng"].keys() and "cuda" not in ckpt["rng"]  # CUDA states on CUDA only
    assert ckpt["data_meta"]["tokenizer"]["name"] == "gpt2" and ckpt["data_meta"]["block_size"] == 32
    assert checkpoint.tokenizer(ckpt) is load_tokenizer("gpt2")
    assert ckpt["config"]["n_embd"] == 32 and ckpt["model_args"]["vocab_size"] == 50304
    model, _ = load_model(tmp_path)
    assert not model.training


def test_ddp_two_cpu_processes_equal_one_process_with_the_same_global_batch(data, tmp_path):
    """SFT data (uneven loss masks): 2 processes x 2 micro-batches of 2 train like 1 process x 4 x 2."""
    common = [f"--data_dir={data / 'sft'}", "--max_iters=4", "--eval_interval=2", "--batch_size=2",
              "--gradient_accumulation_steps=4", "--grad_clip=0.0", "--learning_rate=1e-2"]
    proc = torchrun(*common, f"--out_dir={tmp_path / 'ddp'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("saved ") >= 1
    train(*common, f"--out_dir={tmp_path / 'one'}")
    ddp_lines, one_lines = records(tmp_path / "ddp", "train"), records(tmp_path / "one", "train")
    assert [r["iter"] for r in ddp_lines] == [1, 2, 3, 4], "only rank 0 writes"
    assert [r["loss"] for r in ddp_lines] == pytest.approx([r["loss"] for r in one_lines], rel=1e-5)
    assert max_weight_difference(tmp_path / "ddp" / "ckpt_last.pt", tmp_path / "one" / "ckpt_last.pt") < 1e-3
    ckpt = torch.load(tmp_path / "ddp" / "ckpt_last.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and len(ckpt["rng"]["torch"]) == 2  # each process's RNG state


NAN_ON_RANK_1 = """
import os
import model
real, calls = model.GPT.forward, []
def forward(self, *args, **kwargs):
    logits, loss = real(self, *args, **kwargs)
    if self.training:
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:  # iter 1, first micro-batch, one process only
            loss = loss * float("nan")
    return logits, loss
model.GPT.forward = forward
"""


def test_ddp_non_finite_loss_in_any_micro_batch_stops_every_process(data, tmp_path):
    script, env = patched_train(tmp_path, NAN_ON_RANK_1)
    proc = torchrun(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=5",
                    "--eval_interval=1000", "--gradient_accumulation_steps=4", script=script, env=env)
    assert proc.returncode != 0
    assert proc.stderr.count("train loss is not finite at iter 1 (in 1 of 4 micro-batches)") == 2, proc.stderr[-3000:]
    assert not list((tmp_path / "out").glob("ckpt*")), "nothing saved after a non-finite loss"


SIGTERM_ON_RANK_1 = """
import os
import signal
import model
real, calls = model.GPT.forward, []
def forward(self, *args, **kwargs):
    if self.training:
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:  # iter 1, first micro-batch, one process only
            os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *args, **kwargs)
model.GPT.forward = forward
"""


def test_ddp_sigterm_to_one_process_stops_every_process_together(data, tmp_path):
    """A SIGTERM that reaches one process only (a scheduler, a kill by hand): both leave after the
    same step and save once, instead of one waiting forever in a collective the other never joins."""
    script, env = patched_train(tmp_path, SIGTERM_ON_RANK_1)
    try:
        proc = torchrun(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=50",
                        "--eval_interval=1000", "--gradient_accumulation_steps=4", script=script, env=env,
                        timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the processes hung after a SIGTERM to one of them")
    # the signal lands during iter 1, after that step's stop flag was set: both stop after iter 2
    assert "interrupted at iter 3" in proc.stderr, proc.stderr[-3000:]
    assert torch.load(tmp_path / "out" / "ckpt_last.pt", weights_only=True)["iter_num"] == 3


def test_best_stays_in_ckpt_pt_and_resume_continues_from_the_last(data, tmp_path):
    common = [f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--eval_interval=3"]
    train(*common, "--max_iters=6")
    best = (tmp_path / "ckpt.pt").read_bytes()
    # two steps at a learning rate that wrecks the model: the end-of-run state is worse than the best
    proc = train(*common, "--init_from=resume", "--max_iters=8", "--learning_rate=1.0", "--min_lr=1.0")
    val = {r["iter"]: r["val_loss"] for r in records(tmp_path, "val")}
    assert val[8] > val[6], "the test needs a worse final model"
    assert (tmp_path / "ckpt.pt").read_bytes() == best
    assert torch.load(tmp_path / "ckpt_last.pt", weights_only=True)["iter_num"] == 8
    assert f"latest state {tmp_path / 'ckpt_last.pt'}; the best ({val[6]:.4f}) stays in {tmp_path / 'ckpt.pt'}" \
        in proc.stdout
    proc = train(*common, "--init_from=resume", "--max_iters=9")
    assert f"resuming from {tmp_path / 'ckpt_last.pt'} (iter 8, best val loss {val[6]:.4f})" in proc.stdout
    (tmp_path / "ckpt_last.pt").unlink()  # as an older train.py left it: ckpt.pt only
    proc = train(*common, "--init_from=resume", "--max_iters=9")
    assert "no " + str(tmp_path / "ckpt_last.pt") in proc.stderr
    assert f"resuming from {tmp_path / 'ckpt.pt'} (iter 6" in proc.stdout


def test_a_new_run_into_an_out_dir_with_a_checkpoint_refuses(data, tmp_path):
    common = [f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2"]
    train(*common)
    before = (tmp_path / "ckpt.pt").read_bytes()
    for extra in ((), ("--init_from=pretrained", f"--init_checkpoint={tmp_path}")):
        proc = train(*common, *extra, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert all(choice in proc.stderr for choice in ("--init_from=resume", "--out_dir", "--overwrite=True"))
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    proc = train(*common, "--overwrite=True", "--seed=7")
    assert f"removed {tmp_path / 'ckpt.pt'}" in proc.stdout and (tmp_path / "ckpt.pt").read_bytes() != before
    assert [r["iter"] for r in records(tmp_path, "train")] == [1, 2], "a new run starts a new metrics.jsonl"


def test_missing_data_and_checkpoints_have_clear_messages(data, tmp_path):
    proc = train(f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode == 1 and "prepare the data first" in proc.stderr and "Traceback" not in proc.stderr
    proc = train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path / 'empty'}", "--init_from=resume", check=False)
    assert proc.returncode == 1 and "no checkpoint here" in proc.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    proc = train(f"--data_dir={data / 'pre'}", "--init_from=pretrained", f"--init_checkpoint={tmp_path / 'bad'}",
                 f"--out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 1 and "cannot read it: not a MiniGLM checkpoint" in proc.stderr


def test_block_size_mismatch_names_both_sides(data, tmp_path):
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path / 'pre'}", "--max_iters=2", "--eval_interval=2")
    proc = train(f"--data_dir={data / 'sft'}", "--init_from=pretrained", f"--init_checkpoint={tmp_path / 'pre'}",
                 f"--out_dir={tmp_path / 'sft'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "block_size=32" in proc.stderr and "block_size=48" in proc.stderr


def test_sft_on_shorter_blocks_than_the_model_trains_and_the_model_keeps_its_context(data, tmp_path):
    from test_prepare import corpus
    run_script("data/prepare.py", f"--input={write_jsonl(tmp_path / 'docs.jsonl', corpus(40))}", "--tokenizer=gpt2",
               f"--out_dir={tmp_path / 'pre64'}", "--block_size=64", "--val_fraction=0.2")
    train(f"--data_dir={tmp_path / 'pre64'}", f"--out_dir={tmp_path / 'pre'}", "--max_iters=2", "--eval_interval=2")
    train(f"--data_dir={data / 'sft'}", "--init_from=pretrained", f"--init_checkpoint={tmp_path / 'pre'}",
          f"--out_dir={tmp_path / 'sft'}", "--max_iters=2", "--eval_interval=2")
    ckpt = checkpoint.read(tmp_path / "sft")
    assert ckpt["model_args"]["block_size"] == 64 and ckpt["data_meta"]["block_size"] == 48


def test_a_config_that_names_a_tokenizer_refuses_data_of_another(data, tmp_path, zh_tokenizer):
    proc = train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", f"--tokenizer={zh_tokenizer}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--tokenizer={zh_tokenizer} uses the tokenizer tiny (511 ids" in proc.stderr
    assert f"data_dir={data / 'pre'} uses gpt2 (50257 ids)" in proc.stderr
    assert f"python data/prepare.py --tokenizer={zh_tokenizer} --out_dir={data / 'pre'}" in proc.stderr
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--tokenizer=gpt2", "--max_iters=1")  # the same: runs


def test_a_tokenizer_this_code_does_not_know_is_named_with_the_data_file(data, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(data / "pre", d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(meta | {"tokenizer": "cl100k_base"}))
    proc = train(f"--data_dir={d}", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode == 1 and "'cl100k_base'" in proc.stderr and str(d / "meta.json") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    proc = train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=40",
                 "--learning_rate=1e30", "--grad_clip=0.0", "--eval_interval=1000", check=False)
    assert proc.returncode == 1 and "stopped before the update" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def start_training(data, out, *extra):
    """train.py in the background. Its SIGINT is reset to the default first: a shell without job
    control starts background commands with SIGINT ignored, and a child inherits that (Python then
    keeps it ignored, and Ctrl-C would never reach train.py)."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--data_dir={data / 'pre'}",
                             f"--out_dir={out}", "--max_iters=100000", "--lr_decay_iters=100000", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(cond, seconds=120):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    assert cond()


def interrupt_after_a_train_line(proc, metrics):
    lines = metrics.read_text().count('"split": "train"') if metrics.exists() else 0
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"split": "train"') > lines)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "saving the latest state" in err and "Traceback" not in err


def test_ctrl_c_saves_the_last_state_and_never_replaces_the_best(data, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    interrupt_after_a_train_line(start_training(data, tmp_path, "--eval_interval=100000"), metrics)
    # no evaluated best yet: the interrupted state is the only model, so ckpt.pt is written too
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] >= 1
    train(f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=4",
          "--eval_interval=4")
    best = (tmp_path / "ckpt.pt").read_bytes()
    interrupt_after_a_train_line(start_training(data, tmp_path, "--eval_interval=100000", "--init_from=resume"), metrics)
    assert (tmp_path / "ckpt.pt").read_bytes() == best
    assert torch.load(tmp_path / "ckpt_last.pt", weights_only=True)["iter_num"] > 4


DIE_BEFORE_RENAME = """
import os
import signal
real = os.replace
def replace(src, dst):
    if os.path.basename(dst).startswith("ckpt"):  # the temp file is written; the rename never happens
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
"""


def test_a_kill_between_write_and_rename_keeps_the_checkpoints_and_the_next_start_cleans_up(data, tmp_path):
    common = [f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}", "--eval_interval=2"]
    train(*common, "--max_iters=2")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ckpt*")}
    script, env = patched_train(tmp_path, DIE_BEFORE_RENAME)
    proc = subprocess.run([sys.executable, str(script), *TINY, *common, "--init_from=resume", "--max_iters=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = [p for p in tmp_path.glob("ckpt*.tmp-*")]
    assert len(stale) == 1 and stale[0].stat().st_size > 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ckpt*.pt")} == before
    load_model(tmp_path)
    alive = tmp_path / f"ckpt.pt.tmp-{os.getpid()}"  # a save in progress in a live process
    alive.write_bytes(b"partial")
    proc = train(*common, "--init_from=resume", "--max_iters=4")
    assert f"removed {stale[0]}" in proc.stdout and not stale[0].exists() and alive.exists()


def test_gpu_config_on_cpu_warns_and_runs(data, tmp_path):
    proc = run_script("train.py", "config/train_config.py", *TINY, "--compile=False", "--max_iters=1",
                      f"--data_dir={data / 'pre'}", f"--out_dir={tmp_path}")
    assert "sized for a CUDA GPU" in proc.stderr


def test_unknown_config_key_is_rejected():
    proc = run_script("train.py", "--learnig_rate=1e-3", check=False)
    assert proc.returncode != 0 and "unknown key 'learnig_rate'" in proc.stderr
