"""One tokenizer carried with the data and the model: a trained tokenizer (and gpt2 beside it) goes
through prepare (--tokenizer=PATH) -> train (tiny) -> sample -> evaluations; the checkpoint holds it
whole, so it answers in a fresh process with no data folder and no tokenizer file; a model and data
made with different tokenizers are refused with a message naming both; the streamed text never
shows half a character with either tokenizer."""
import json
import shutil

import pytest
import torch
from conftest import PAIRS, run_script, train, write_jsonl

import checkpoint
from data.tokenizer import StreamDecoder, load_tokenizer
from engine import reply, utf8_constraint
from model import GPT, GPTConfig
from serving import ModelStore, stream_together
from test_measures import is_utf8
from test_prepare import corpus
from test_serving import GREEDY

QUESTION = PAIRS[0]["question"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, zh_tokenizer):
    """Tiny SFT models on PAIRS, one per tokenizer: tmp/{zh,gpt2}/data (prepared), tmp/{zh,gpt2}/out
    (trained), and tmp/mine.tiktoken, the trained tokenizer's file the zh data was prepared with."""
    tmp = tmp_path_factory.mktemp("carried")
    pairs = write_jsonl(tmp / "sft.jsonl", PAIRS)
    shutil.copy(zh_tokenizer, tmp / "mine.tiktoken")
    for name, flag in (("zh", [f"--tokenizer={tmp / 'mine.tiktoken'}"]), ("gpt2", ["--tokenizer=gpt2"])):
        run_script("data/prepare_sft.py", f"--input={pairs}", f"--out_dir={tmp / name / 'data'}", "--block_size=48",
                   "--val_fraction=0.2", *flag)
        train(f"--data_dir={tmp / name / 'data'}", f"--out_dir={tmp / name / 'out'}", "--max_iters=20",
              "--eval_interval=20", "--log_interval=10")
    return tmp


def test_the_embedding_is_sized_from_the_data_and_the_checkpoint_holds_the_tokenizer_whole(runs):
    zh = load_tokenizer(str(runs / "mine.tiktoken"))
    ckpt = torch.load(runs / "zh" / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["vocab_size"] == zh.model_vocab_size == 512  # 510 BPE tokens, EOT, PAD
    assert ckpt["data_meta"]["tokenizer"]["ranks"] == (runs / "mine.tiktoken").read_text(encoding="ascii")
    assert checkpoint.tokenizer(ckpt) is zh
    gpt2 = torch.load(runs / "gpt2" / "out" / "ckpt.pt", weights_only=True)
    assert gpt2["model_args"]["vocab_size"] == 50304 and checkpoint.tokenizer(gpt2) is load_tokenizer("gpt2")


def test_a_checkpoint_answers_in_a_fresh_process_without_its_data_or_tokenizer_file(runs, tmp_path):
    """Copied alone to another folder (another machine), while the data folder and the tokenizer
    file are gone, the checkpoint samples with the tokenizer it carries."""
    shutil.copy(runs / "zh" / "out" / "ckpt.pt", tmp_path / "ckpt.pt")
    hidden = [(runs / "zh" / "data", runs / "zh" / "data-away"), (runs / "mine.tiktoken", runs / "away.tiktoken")]
    for path, away in hidden:
        path.rename(away)
    try:
        proc = run_script("sample.py", f"--out_dir={tmp_path}", f"--start={QUESTION}", "--max_new_tokens=24",
                          "--temperature=1.5", "--top_k=0", "--top_p=1.0", "--num_samples=3", "--device=cpu")
    finally:
        for path, away in hidden:
            away.rename(path)
    assert "tokenizer mine (511 ids" in proc.stderr and proc.stdout.count(f">>> {QUESTION}") == 3
    assert "\ufffd" not in proc.stdout


def test_evaluations_scores_a_trained_tokenizer_model_and_skips_data_of_another_tokenizer(runs, tmp_path):
    common = ["--max_samples=4", "--seen_samples=0", "--max_new_tokens=16", f"--input={runs / 'sft.jsonl'}"]
    run_script("evaluations.py", f"--out_dir={runs / 'zh' / 'out'}", *common)
    results = json.loads((runs / "zh" / "out" / "eval.json").read_text(encoding="utf-8"))
    assert results["perplexity"] > 1 and results["bits_per_char"] > 0 and results["ppl_tokens"] > 0
    assert results["samples"] == 4 and results["common_chars"] > 0
    # the same checkpoint whose data_dir was prepared again, with gpt2
    state = torch.load(runs / "zh" / "out" / "ckpt.pt", weights_only=True)
    torch.save(state | {"config": state["config"] | {"data_dir": str(runs / "gpt2" / "data")}}, tmp_path / "ckpt.pt")
    proc = run_script("evaluations.py", f"--out_dir={tmp_path}", *common)  # answers scored, data-based ones skipped
    assert (f"checkpoint {tmp_path} uses the tokenizer mine (511 ids" in proc.stderr
            and f"but its data_dir {runs / 'gpt2' / 'data'} (prepared again since?) uses gpt2 (50257 ids)" in proc.stderr)
    results = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert results["perplexity"] is None and results["rare_char_rate"] is None and results["samples"] == 4
    assert "uses gpt2 (50257 ids)" in results["ppl_note"] and "uses gpt2 (50257 ids)" in results["rare_note"]


@pytest.mark.parametrize("model, data", [("zh", "gpt2"), ("gpt2", "zh")])
def test_fine_tuning_on_data_of_another_tokenizer_names_both(runs, tmp_path, model, data):
    source, data_dir = runs / model / "out", runs / data / "data"
    proc = train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--init_from=pretrained",
                 f"--init_checkpoint={source}", "--max_iters=2", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    names = {"zh": "mine (511 ids", "gpt2": "gpt2 (50257 ids)"}
    assert f"checkpoint {source} uses the tokenizer {names[model]}" in proc.stderr
    assert f"data_dir={data_dir} uses {names[data]}" in proc.stderr
    assert not (tmp_path / "ckpt.pt").exists()


def test_the_arena_serves_a_gpt2_model_and_a_trained_tokenizer_model_side_by_side(runs):
    store = ModelStore({"gpt2": runs / "gpt2" / "out", "zh": runs / "zh" / "out"})
    params = GREEDY | {"max_new_tokens": 12, "temperature": 1.5, "top_k": 0, "top_p": 1.0}
    *_, last = stream_together([store.stream("gpt2", QUESTION, "", params), store.stream("zh", QUESTION, "", params)])
    (a, a_stats), (b, b_stats) = last
    assert a_stats["tokenizer"] == "gpt2 (50257 ids)" and b_stats["tokenizer"].startswith("mine (511 ids")
    assert a_stats["new_tokens"] and b_stats["new_tokens"] and "\ufffd" not in a + b


def test_a_trained_tokenizer_streams_whole_characters_and_the_constraint_keeps_them_valid(zh_tokenizer):
    """A trained tokenizer spells the characters it never merged as byte tokens, so an untrained
    model writes broken UTF-8 with it too; the constraint (sized by the model's rows) and the
    stream decoder keep every piece whole."""
    zh = load_tokenizer(str(zh_tokenizer))
    text = "魑魅魍魉，𠀀龘😀。画蛇添足 Hello"
    ids = zh.encode(text)
    assert any(not is_utf8(zh.token_bytes(t)) for t in ids), "this text should need byte tokens"
    dec = StreamDecoder(zh)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, vocab_size=zh.model_vocab_size)).eval()
    x = torch.tensor([zh.encode("床前明月光")])
    free = list(model.generate(x, 200, temperature=1.5, max_token_id=zh.vocab_size,
                               generator=torch.Generator().manual_seed(0)))
    assert "\ufffd" in zh.enc.decode(free, errors="replace"), "the unconstrained sample should show the problem"
    constraint = utf8_constraint(zh, model.config.vocab_size)
    assert constraint.allowed(0).shape == (512,) and not constraint.allowed(0)[zh.pad_id:].any()
    ckpt = {"data_meta": {"kind": "pretrain", "tokenizer": zh.meta()}}
    out = reply(model, ckpt, "床前明月光", "generate", max_new_tokens=200, temperature=1.5, top_k=0, top_p=1.0,
                repetition_penalty=1.0, generator=torch.Generator().manual_seed(0))
    assert "\ufffd" not in out and len(out) > 20


def test_pretraining_data_of_a_trained_tokenizer_sizes_the_model(tmp_path, zh_tokenizer):
    run_script("data/prepare.py", f"--input={write_jsonl(tmp_path / 'docs.jsonl', corpus(40))}",
               f"--out_dir={tmp_path / 'pre'}", "--block_size=32", "--val_fraction=0.2", f"--tokenizer={zh_tokenizer}")
    train(f"--data_dir={tmp_path / 'pre'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2")
    ckpt = checkpoint.read(tmp_path / "out")
    assert ckpt["model_args"]["vocab_size"] == 512 and checkpoint.tokenizer(ckpt).name == zh_tokenizer.stem
    proc = run_script("sample.py", f"--out_dir={tmp_path / 'out'}", "--start=床前明月光", "--max_new_tokens=8")
    assert "mode generate" in proc.stderr and "\ufffd" not in proc.stdout
