"""checkpoint.py: old checkpoints still load and answer as before; every broken file (a damaged
tokenizer record included) gets a clear message."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
from data.tokenizer import load_tokenizer
from engine import load_model, reply

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt_v0"


def test_a_checkpoint_written_before_checkpoint_py_loads_and_computes_what_it_did():
    expected = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    model, ckpt = load_model(FIXTURE / "ckpt.pt")
    assert "format" not in ckpt and ckpt["model_args"] == expected["model_args"]
    x = torch.tensor(expected["input"])
    logits, _ = model(x, x)
    assert torch.allclose(logits.sum(-1), torch.tensor(expected["logits_sum"]), rtol=1e-5, atol=1e-4)
    assert torch.allclose(logits[0, :, :5], torch.tensor(expected["logits_first"]), rtol=1e-5, atol=1e-6)
    assert checkpoint.mode_of(ckpt) == "chat" and checkpoint.can_chat(ckpt)
    assert reply(model, ckpt, "第1个成语是什么？", "chat", max_new_tokens=8, temperature=0.0) == expected["chat_reply"]
    assert reply(model, ckpt, "床前", "generate", max_new_tokens=8, temperature=0.0) == expected["generate_reply"]


def test_save_writes_the_format_version_and_best_is_the_same_bytes(tmp_path):
    state = torch.load(FIXTURE / "ckpt.pt", weights_only=True)
    checkpoint.save(tmp_path, state, best=True)
    assert (tmp_path / "ckpt.pt").read_bytes() == (tmp_path / "ckpt_last.pt").read_bytes()
    assert checkpoint.read(tmp_path)["format"] == checkpoint.TRAINING_FORMAT
    checkpoint.save(tmp_path, state | {"iter_num": 99}, best=False)
    assert checkpoint.read(tmp_path / "ckpt_last.pt")["iter_num"] == 99 and checkpoint.read(tmp_path)["iter_num"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt_last.pt"]  # no temp file left


def broken(tmp_path, kind: str) -> Path:
    path = tmp_path / "ckpt.pt"
    state = torch.load(FIXTURE / "ckpt.pt", weights_only=True)
    if kind == "partial":
        data = (FIXTURE / "ckpt.pt").read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "text":
        path.write_text("not a checkpoint", encoding="utf-8")
    elif kind == "foreign":
        torch.save({"state_dict": state["model"]}, path)
    elif kind == "newer":
        torch.save(state | {"format": checkpoint.FORMAT_VERSION + 1}, path)
    elif kind == "tokenizer":
        torch.save(state | {"data_meta": state["data_meta"] | {"vocab_size": 8192}}, path)
    elif kind == "rows":  # an embedding without a row for PAD: not the tokenizer it was trained with
        torch.save(state | {"model_args": state["model_args"] | {"vocab_size": 50000}}, path)
    elif kind == "shape":
        torch.save(state | {"model_args": state["model_args"] | {"n_embd": 4}}, path)
    elif kind == "pickle":  # a full pickle (code would run on load): weights_only refuses it
        torch.save(state | {"extra": object()}, path)
    return path


@pytest.mark.parametrize("kind, words", [
    ("missing", "no checkpoint here"),
    ("partial", "partial or damaged"),
    ("text", "not a MiniGLM checkpoint (not a torch.save zip archive)"),
    ("foreign", "not a MiniGLM checkpoint (missing model, model_args, data_meta, config)"),
    ("newer", "is newer than this code reads"),
    ("tokenizer", "tokenizer gpt2 records vocab_size=8192, but its ranks give 50257"),
    ("rows", "vocab_size=50000 embedding rows, too few for its tokenizer gpt2 (50257 ids)"),
    ("shape", "the weights do not fit the checkpoint's model_args"),
    ("pickle", "holds Python objects MiniGLM never writes"),
])
def test_a_broken_checkpoint_gets_a_message_naming_the_file(tmp_path, kind, words):
    path = tmp_path / "ckpt.pt" if kind == "missing" else broken(tmp_path, kind)
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        load_model(tmp_path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_peek_mode_reads_no_weights_and_says_none_for_a_broken_file(tmp_path):
    assert checkpoint.peek_mode(FIXTURE) == "chat"
    shutil.copy(FIXTURE / "ckpt.pt", tmp_path / "ckpt.pt")
    assert checkpoint.peek_mode(tmp_path) == "chat"
    broken(tmp_path, "partial")
    assert checkpoint.peek_mode(tmp_path) is None


def test_the_old_form_names_gpt2_and_a_damaged_trained_tokenizer_record_is_named(tmp_path, zh_tokenizer):
    """ckpt_v0 says "tokenizer": "gpt2" with the ids beside it; a trained tokenizer travels whole
    (its ranks) and a record that no longer rebuilds names the checkpoint file."""
    state = torch.load(FIXTURE / "ckpt.pt", weights_only=True)
    assert state["data_meta"]["tokenizer"] == "gpt2" and checkpoint.tokenizer(state) is load_tokenizer("gpt2")
    zh = load_tokenizer(str(zh_tokenizer))
    record, path = zh.meta(), tmp_path / "ckpt.pt"
    torch.save(state | {"data_meta": state["data_meta"] | {"tokenizer": record}}, path)
    assert checkpoint.tokenizer(checkpoint.read(tmp_path)).sha256 == zh.sha256
    for damage, words in [({"ranks": record["ranks"][:-100]}, "the tokenizer's ranks do not match their sha256"),
                          ({"ranks": None}, "the tokenizer's ranks do not match their sha256"),
                          ({"name": 7}, "is not one this code knows"),
                          ({"eot_id": 3}, "records eot_id=3, but its ranks give 510")]:
        torch.save(state | {"data_meta": state["data_meta"] | {"tokenizer": record | damage}}, path)
        with pytest.raises(ValueError) as e:
            load_model(tmp_path)
        assert str(path) in str(e.value) and words in str(e.value)
