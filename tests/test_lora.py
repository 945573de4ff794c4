"""LoRA (lora.py, train.py --lora_rank): the adapters start as a no-op, only they (and the embedding
with train_embeddings) learn, the merge equals peft's forward, resume and DDP are exact, the small
checkpoint names its base by path and sha256, and every script loads it merged."""
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PAIRS, ROOT, TINY, run_script, train, write_jsonl

import checkpoint
import hf_export
import lora
from model import GPT, GPTConfig
from report import write_report
from serving import ModelStore, model_facts

SETTINGS = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(lora.TARGETS), "train_embeddings": False}
LORA = ["--init_from=pretrained", "--lora_rank=4", "--lora_alpha=8", "--learning_rate=1e-2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny pretraining and SFT data (blocks of 48, GPT-2's tokenizer) and a base model pretrained on it."""
    from test_prepare import corpus
    tmp = tmp_path_factory.mktemp("lora")
    run_script("data/prepare.py", f"--input={write_jsonl(tmp / 'docs.jsonl', corpus(80))}",
               f"--out_dir={tmp / 'pre'}", "--block_size=48", "--val_fraction=0.2", "--tokenizer=gpt2")
    run_script("data/prepare_sft.py", f"--input={write_jsonl(tmp / 'sft.jsonl', PAIRS)}",
               f"--out_dir={tmp / 'sft'}", "--block_size=48", "--val_fraction=0.2", "--tokenizer=gpt2")
    train(f"--data_dir={tmp / 'pre'}", f"--out_dir={tmp / 'base'}", "--max_iters=4", "--eval_interval=4")
    return tmp


def lora_run(base, out, *args, check=True):
    return train(f"--data_dir={base / 'sft'}", f"--out_dir={out}", f"--init_checkpoint={base / 'base'}",
                 *LORA, *args, check=check)


def tiny_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("embeddings", [False, True])
def test_adapters_start_as_a_no_op_and_only_the_intended_parameters_get_gradients(embeddings):
    model, idx = tiny_gpt(), torch.randint(0, 128, (2, 16))
    want = model(idx, idx)[0]
    lora.attach(model, SETTINGS | {"train_embeddings": embeddings})
    assert torch.equal(model(idx, idx)[0], want)  # B = 0: the base model's exact outputs
    model(idx, idx)[1].backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {name for name, _ in model.named_parameters() if ".lora_" in name}
    assert len(adapters) == 2 * 2 * len(lora.TARGETS)  # A and B of 4 Linear layers in 2 blocks
    assert got == adapters | ({lora.EMBEDDING} if embeddings else set())
    assert set(lora.adapter_state(model)) == {n.replace(".default.", ".") for n in got}
    only_qkv = lora.attach(tiny_gpt(), SETTINGS | {"targets": ["attn.c_attn"]})
    assert {n.split(".lora_")[0] for n, p in only_qkv.named_parameters() if p.requires_grad} == {
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


def test_a_base_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"base")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert lora.sha256_of(path) == lora.sha256_of(tmp_path / ".." / tmp_path.name / "ckpt.pt") == sha(path)
    assert reads.count(str(path.resolve())) == 1
    (tmp_path / "new").write_bytes(b"trained")
    os.replace(tmp_path / "new", path)  # a new file, as checkpoint.save writes one
    assert lora.sha256_of(path) == hashlib.sha256(b"trained").hexdigest()


@pytest.mark.parametrize("embeddings", [False, True])
def test_merged_equals_peft_forward(embeddings):
    """lora.merge_into (what every script loads) computes what peft's adapted model computes."""
    settings = SETTINGS | {"train_embeddings": embeddings, "dropout": 0.1}
    plain, idx = tiny_gpt(), torch.randint(0, 128, (2, 16))
    adapted = lora.attach(copy.deepcopy(plain), settings)
    with torch.no_grad():  # a trained adapter: B no longer zero
        for p in lora.trainable(adapted).values():
            p.add_(torch.randn_like(p) * 0.2)
    adapted.eval()  # no dropout
    merged = lora.merge_into(plain, settings, lora.adapter_state(adapted), "test").eval()
    want, got = adapted(idx)[0], merged(idx)[0]
    assert not torch.allclose(want, tiny_gpt()(idx)[0], atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    state = lora.adapter_state(adapted)
    state.pop(next(k for k in state if k.endswith("lora_B.weight")))
    with pytest.raises(ValueError, match="test: not an adapter of this model"):
        lora.merge_into(tiny_gpt(), settings, state, "test")


def test_lora_run_trains_the_adapters_only_into_a_small_checkpoint(base, tmp_path):
    proc = lora_run(base, tmp_path / "r4", "--max_iters=30", "--eval_interval=30", "--lr_decay_iters=30")
    assert re.search(r"M parameters, 2,048 trained \(\d\.\d\d%: LoRA rank 4\)", proc.stdout), proc.stdout[:2000]
    losses = [float(line.split("train loss ")[1].split(",")[0]) for line in proc.stdout.splitlines() if "train loss" in line]
    assert losses[-1] < losses[0] - 0.1, losses  # it learns (frozen weights alone would give equal losses)
    ckpt = checkpoint.read(tmp_path / "r4")
    assert ckpt["format"] == checkpoint.LORA_FORMAT and ckpt["lora"]["base"] == {
        "path": os.path.relpath(base / "base" / "ckpt.pt", tmp_path / "r4"), "sha256": sha(base / "base" / "ckpt.pt")}
    assert set(ckpt["model"]) and all(".lora_" in k for k in ckpt["model"])
    size, full = ((d / "ckpt.pt").stat().st_size for d in (tmp_path / "r4", base / "base"))
    assert size < 0.05 * full, (size, full)
    # merged, only the adapted Linear weights differ from the base's
    merged, _ = checkpoint.load(tmp_path / "r4")
    original, _ = checkpoint.load(base / "base")
    for (name, a), b in zip(merged.state_dict().items(), original.state_dict().values(), strict=True):
        adapted = any(name.endswith(f"{t}.weight") for t in lora.TARGETS)
        assert torch.equal(a, b) != adapted, name
    # continued pretraining (pretraining data) with train_embeddings: the tied matrix changes too
    train(f"--data_dir={base / 'pre'}", f"--out_dir={tmp_path / 'emb'}", f"--init_checkpoint={base / 'base'}", *LORA,
          "--max_iters=4", "--eval_interval=4", "--train_embeddings=True")
    emb, _ = checkpoint.load(tmp_path / "emb")
    assert lora.EMBEDDING in checkpoint.read(tmp_path / "emb")["model"]
    assert not torch.equal(emb.transformer.wte.weight, original.transformer.wte.weight)
    assert emb.transformer.wte.weight is emb.lm_head.weight


def test_lora_resume_is_exact(base, tmp_path):
    common = ["--eval_interval=3", "--lora_dropout=0.1", "--train_embeddings=True"]
    lora_run(base, tmp_path / "straight", *common, "--max_iters=6")
    lora_run(base, tmp_path / "halves", *common, "--max_iters=3")
    proc = train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path / 'halves'}", *LORA[1:], *common,
                 "--max_iters=6", "--init_from=resume")
    assert "resuming from" in proc.stdout
    a, b = (checkpoint.read(tmp_path / run / "ckpt_last.pt") for run in ("straight", "halves"))
    assert a["iter_num"] == b["iter_num"] == 6 and a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    proc = train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path / 'halves'}", "--init_from=resume",
                 "--max_iters=9", check=False)  # the settings of another run: refused, not silently mixed
    assert proc.returncode == 1 and "was trained with LoRA settings" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_or_changed_base_is_refused_by_name_and_lora_base_names_a_moved_one(base, tmp_path):
    for name in ("base", "other"):  # two bases, other weights
        shutil.copytree(base / "base", tmp_path / name)
    other = checkpoint.read(tmp_path / "other")
    other["model"]["transformer.wpe.weight"] += 0.01
    checkpoint.save(tmp_path / "other", other, best=True)
    for run, of in (("run", "base"), ("run2", "other")):
        train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path / run}", f"--init_checkpoint={tmp_path / of}",
              *LORA, "--max_iters=3", "--eval_interval=3")
    question = ["--start=" + PAIRS[0]["question"], "--max_new_tokens=5", "--temperature=0"]
    want = run_script("sample.py", f"--out_dir={tmp_path / 'run'}", *question).stdout
    link = tmp_path / "deeper" / "link"  # the checkpoint through a symlink: its base is found from its real folder
    link.mkdir(parents=True)
    (link / "ckpt.pt").symlink_to(tmp_path / "run" / "ckpt.pt")
    assert run_script("sample.py", f"--out_dir={link}", *question).stdout == want
    (tmp_path / "base").rename(tmp_path / "moved")
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'run'}", *question, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"its base checkpoint {tmp_path / 'base' / 'ckpt.pt'} is missing" in proc.stderr and "--lora_base" in proc.stderr
    got = run_script("sample.py", f"--out_dir={tmp_path / 'run'}", f"--lora_base={tmp_path / 'moved'}", *question)
    assert got.stdout == want
    # --lora_base is a fallback: one flag serves an app whose other LoRA model still finds its own base
    store = ModelStore({"a": tmp_path / "run", "b": tmp_path / "run2"}, precision="fp32", lora_base=str(tmp_path / "moved"))
    assert store.local("a") and store.local("b")
    # resuming with the moved base records where it is now: then no flag is needed
    train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path / 'run'}", *LORA[1:], "--init_from=resume",
          "--max_iters=4", "--eval_interval=4", "--always_save_checkpoint=True", f"--lora_base={tmp_path / 'moved'}")
    assert checkpoint.read(tmp_path / "run" / "ckpt_last.pt")["lora"]["base"]["path"] == "../moved/ckpt.pt"
    run_script("sample.py", f"--out_dir={tmp_path / 'run' / 'ckpt_last.pt'}", *question)
    # a base whose weights changed (trained further) is another model: refused, named, with both hashes
    ckpt = checkpoint.read(tmp_path / "moved")
    ckpt["model"]["transformer.wpe.weight"] += 0.01
    checkpoint.save(tmp_path / "moved", ckpt, best=True)
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'run' / 'ckpt_last.pt'}", *question, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"its base checkpoint {tmp_path / 'moved' / 'ckpt.pt'} is not the one the adapter was trained on" in proc.stderr


def test_sample_the_web_store_and_evaluations_load_it_merged_and_merge_to_writes_a_standalone_copy(base, tmp_path):
    shutil.copytree(base / "base", tmp_path / "base")  # moved away at the end
    train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path / 'run'}", f"--init_checkpoint={tmp_path / 'base'}",
          *LORA, "--max_iters=20", "--eval_interval=20")
    question = ["--start=" + PAIRS[1]["question"], "--max_new_tokens=8", "--temperature=0", "--precision=fp32"]
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'run'}", f"--merge_to={tmp_path / 'merged'}")
    assert "wrote" in proc.stderr
    merged = checkpoint.read(tmp_path / "merged")
    assert "lora" not in merged and merged["merged_lora"]["rank"] == 4 and "optimizer" not in merged
    answers = [run_script("sample.py", f"--out_dir={tmp_path / name}", *question).stdout for name in ("run", "merged")]
    assert answers[0] == answers[1] and answers[0].strip()
    proc = run_script("sample.py", f"--out_dir={base / 'base'}", f"--merge_to={tmp_path / 'x'}", check=False)
    assert proc.returncode == 1 and "not a LoRA checkpoint" in proc.stderr and not (tmp_path / "x").exists()
    # the web app's store: the same answer, and its facts name the base
    store = ModelStore({"lora": tmp_path / "run", "merged": tmp_path / "merged"}, precision="fp32")
    greedy = {"max_new_tokens": 8, "temperature": 0.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}
    texts = [list(store.stream(name, PAIRS[1]["question"], "", greedy))[-1][0] for name in ("lora", "merged")]
    assert texts[0] == texts[1]
    assert model_facts(tmp_path / "run")["lora_base"] == "base"  # the base's folder, not a path on the server
    assert model_facts(tmp_path / "merged")["lora_base"] is None
    # evaluations.py: the same figures from the LoRA checkpoint and from its merged copy
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    for name in ("run", "merged"):
        run_script("evaluations.py", f"--out_dir={tmp_path / name}", f"--input={pairs}", "--max_new_tokens=8",
                   "--ppl_max_blocks=4")
    a, b = (json.loads((tmp_path / name / "eval.json").read_text(encoding="utf-8")) for name in ("run", "merged"))
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5) and a["rouge_l"] == b["rouge_l"]
    assert "LoRA：rank 4，alpha 8，" in write_report(tmp_path / "run").read_text(encoding="utf-8")
    # the merged copy needs no base, and training starts from it
    (tmp_path / "base").rename(tmp_path / "away")
    run_script("sample.py", f"--out_dir={tmp_path / 'merged'}", *question)
    train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path / 'again'}", "--init_from=pretrained",
          f"--init_checkpoint={tmp_path / 'merged'}", "--max_iters=2", "--eval_interval=2")
    # neither copy may replace a checkpoint: not the merged one, not the base (export.py's --to neither)
    for source, flag, target in (("run", "--merge_to", "merged"), ("merged", "--save_quantized", "away")):
        before = sha(tmp_path / target / "ckpt.pt")
        proc = run_script("sample.py", f"--out_dir={tmp_path / source}", f"{flag}={tmp_path / target}", check=False)
        assert proc.returncode == 1 and "already holds a checkpoint" in proc.stderr
        assert sha(tmp_path / target / "ckpt.pt") == before
    with pytest.raises(ValueError, match="holds MiniGLM checkpoints"):
        hf_export.export(tmp_path / "merged", tmp_path / "away", overwrite=True)
    assert sha(tmp_path / "away" / "ckpt.pt") == before


def test_ddp_two_cpu_processes_with_lora_equal_one_process(base, tmp_path):
    common = [f"--data_dir={base / 'sft'}", f"--init_checkpoint={base / 'base'}", *LORA, "--max_iters=4",
              "--eval_interval=2", "--batch_size=2", "--gradient_accumulation_steps=4", "--grad_clip=0.0",
              "--train_embeddings=True", "--lora_dropout=0"]  # dropout masks differ per process
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *TINY, *common, f"--out_dir={tmp_path / 'ddp'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "LoRA rank 4" in proc.stdout
    train(*common, f"--out_dir={tmp_path / 'one'}")
    a, b = (checkpoint.read(tmp_path / run / "ckpt_last.pt") for run in ("ddp", "one"))
    assert a["model"].keys() == b["model"].keys() and a["lora"] == b["lora"]
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=1e-4, rtol=1e-3)
    assert not torch.equal(a["model"][lora.EMBEDDING], checkpoint.read(base / "base")["model"][lora.EMBEDDING])


@pytest.mark.parametrize("flags, message", [
    (["--init_from=scratch", "--lora_rank=4"], "LoRA adapts a trained model"),
    (["--init_from=pretrained", "--lora_rank=4", "--lora_targets=attn.c_attn,wte"], "unknown: wte"),
    (["--init_from=pretrained", "--train_embeddings=True"], "set lora_rank too"),
    (["--init_from=pretrained", "--lora_rank=-1"], "lora_rank=-1: expected 0"),
    (["--init_from=pretrained", "--lora_rank=4", "--lora_dropout=1.0"], "lora_dropout=1.0"),
])
def test_bad_lora_settings_are_refused_by_name(base, tmp_path, flags, message):
    proc = train(f"--data_dir={base / 'sft'}", f"--out_dir={tmp_path}", f"--init_checkpoint={base / 'base'}", *flags,
                 check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
