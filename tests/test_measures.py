"""The measures that compare tokenizers honestly: bits per character, the rare-character check and
character BLEU-4 (evaluations.py over metrics.py), on crafted cases whose answers are known."""
import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import PAIRS, read_bin, run_script, write_jsonl

import checkpoint
import evaluations
from data.tokenizer import Tokenizer, load_tokenizer, trained_encoding
from data_utils import Dataset, load_dataset
from evaluations import evaluate, lead_bytes, perplexity, train_char_counts
from metrics import bleu_4, char_counts, common_chars, flags_of, rare_chars
from model import GPT, GPTConfig

GPT2 = load_tokenizer("gpt2")

# Han (a character gpt2 spells with two tokens), Latin with an accent, an emoji, a Han character of
# extension B, ASCII and a line break: 1 to 4 bytes a character.
TEXTS = ["床前明月光，疑是地上霜。", "Café 😀 𠀀 é\n举头望明月"]


@pytest.fixture(params=["gpt2", "zh"])
def tok(request, zh_tokenizer) -> Tokenizer:
    """Each tokenizer: gpt2 and a small trained one (vocabulary 512)."""
    return load_tokenizer("gpt2" if request.param == "gpt2" else str(zh_tokenizer))


def uniform_model(block_size, vocab_size=GPT2.model_vocab_size):
    model = GPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=16, vocab_size=vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over the whole vocabulary
    return model


def text_blocks(tmp_path, tok, texts, T=48) -> Dataset:
    """One block per text: EOT (the context, not a target), the text, EOT, then PAD: the counted
    targets are exactly the text's tokens and its EOT."""
    blocks = []
    for text in texts:
        ids = [tok.eot_id, *tok.encode(text), tok.eot_id]
        assert len(ids) <= T
        blocks.append(ids + [tok.pad_id] * (T - len(ids)))
    path = tmp_path / "val.bin"
    np.array(blocks, dtype=np.uint16).tofile(path)
    meta = {"block_size": T, "block_aligned": True, "tokenizer": tok.meta(), "kind": "pretrain"}
    return Dataset(path, None, meta, T * len(texts))


def test_bits_per_char_of_a_uniform_model_on_texts_of_known_characters(tmp_path, tok):
    ds = text_blocks(tmp_path, tok, TEXTS)
    model = uniform_model(ds.block_size, tok.model_vocab_size)
    tokens = sum(len(tok.encode(t)) + 1 for t in TEXTS)  # each text's tokens and its EOT
    # both tokenizers split characters across tokens here: a token that is not whole UTF-8 on its own
    pieces = [tok.token_bytes(t) for t in tok.encode("".join(TEXTS))]
    assert any(not is_utf8(p) for p in pieces)
    result = perplexity(model, ds, batch_size=1)
    assert result["tokens"] == tokens and result["chars"] == sum(map(len, TEXTS))
    V = model.config.vocab_size
    assert result["bits_per_char"] == pytest.approx(math.log2(V) * tokens / sum(map(len, TEXTS)), rel=1e-6)
    assert result["perplexity"] == pytest.approx(V, rel=1e-5)


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_characters_are_counted_the_same_with_any_tokenizer():
    """gpt2 and a byte-level tokenizer (every byte its own token) cut a text differently; the
    characters counted are len(text) with both, and special tokens count none."""
    byte_level = Tokenizer("bytes", trained_encoding({bytes([b]): b for b in range(256)}, "bytes"), "none")
    text = "".join(TEXTS)
    for tokenizer in (GPT2, byte_level):
        lead = lead_bytes(tokenizer, tokenizer.model_vocab_size)
        ids = tokenizer.encode(text)
        assert int(lead[ids].sum()) == len(text)
        assert lead[tokenizer.eot_id] == lead[tokenizer.pad_id] == 0
        assert len(lead) == tokenizer.model_vocab_size and not lead[tokenizer.pad_id:].any()
    assert len(byte_level.encode(text)) > len(GPT2.encode(text))
    assert len(lead_bytes(GPT2, 50304)) == 50304 and len(lead_bytes(byte_level, 64)) == 258


def test_bits_per_char_of_sft_data_counts_the_answers_characters(tmp_path):
    """SFT: the counted targets are the answers and their EOT, so the characters are the answers'."""
    run_script("data/prepare_sft.py", "--tokenizer=gpt2", f"--input={write_jsonl(tmp_path / 'sft.jsonl', PAIRS)}",
               f"--out_dir={tmp_path / 'sft'}", "--block_size=48", "--val_fraction=0.3")
    ds = load_dataset(tmp_path / "sft", "val")
    T = ds.block_size
    tokens = read_bin(tmp_path / "sft" / "val.bin").reshape(-1, T)
    marks = read_bin(tmp_path / "sft" / "val_mask.bin", np.uint8).reshape(-1, T).astype(bool)
    answers = [GPT2.decode([t for t in row[m] if t != GPT2.eot_id]) for row, m in zip(tokens, marks, strict=True)]
    assert answers and all(a in {p["answer"] for p in PAIRS} for a in answers)
    result = perplexity(uniform_model(T), ds, batch_size=2)
    assert result["chars"] == sum(map(len, answers)) and result["tokens"] == int(marks.sum())
    assert result["bits_per_char"] == pytest.approx(math.log2(50304) * result["tokens"] / result["chars"], rel=1e-6)


def test_training_text_is_decoded_in_chunks_without_losing_a_character(tmp_path, tok):
    """Chunks of 3 tokens cut characters in two; PAD and EOT are no text."""
    ds = text_blocks(tmp_path, tok, TEXTS)
    counts = train_char_counts(ds, chunk_tokens=3)
    assert np.array_equal(counts, char_counts("".join(TEXTS)))


def test_common_set_covers_the_share_and_keeps_ties():
    text = "床前明月光疑是地上霜" * 100 + "龘"  # 龘: 1 in 1001 Han characters, under the 0.1% tail
    common = common_chars(char_counts(text + "Hello，。😀"))
    assert common == set("床前明月光疑是地上霜")
    assert common_chars(char_counts("的" * 5 + "一" * 5)) == {"的", "一"}  # tied at the cut: both in
    assert common_chars(char_counts("abc，。")) == frozenset()
    counts = char_counts("的" * 997 + "一二三")
    assert common_chars(counts, share=0.997) == {"的"} and common_chars(counts, share=0.998) == set("的一二三")


def test_rare_characters_are_flagged_and_common_ones_are_not():
    common = common_chars(char_counts("床前明月光疑是地上霜" * 100 + "龘"))
    assert rare_chars("床前明月光", common) == "" and flags_of("床前明月光。", True, True, common) == []
    assert rare_chars("床前龘月𪚥光", common) == "龘𪚥"  # seen once, and never seen (extension B)
    assert flags_of("床前龘月", True, True, common) == ["rare_chars"]
    assert flags_of("Hello, 😀 ，。!", True, True, common) == []  # only Han characters can be rare
    assert flags_of("床前龘月", True, True, None) == []  # no training text: no check


def answer_with(monkeypatch, predictions: dict):
    """evaluations.reply_batch replaced by fixed answers to each prompt."""
    def fake(model, ckpt, prompts, mode, generators, **settings):
        return [(predictions[p], {"stopped_at_eot": True, "new_tokens": 1, "seconds": 0.01}) for p in prompts]
    monkeypatch.setattr(evaluations, "reply_batch", fake)


SETTINGS = {"seed": 1, "gen_batch_size": 2, "max_new_tokens": 8, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
            "rouge_max_words": 1000}


def test_rare_char_rate_counts_characters_over_all_answers(monkeypatch):
    common = common_chars(char_counts("床前明月光疑是地上霜" * 100))
    answers = {"q1": "床前明月光", "q2": "床前龘龘光", "q3": "Hello!", "q4": "𪚥是"}
    answer_with(monkeypatch, answers)
    cases = [{"prompt": q, "reference": "床前明月光"} for q in answers]
    samples, summary = evaluate(None, {}, "chat", cases, SETTINGS, common=common)
    assert [s["flags"] for s in samples] == [[], ["rare_chars"], [], ["rare_chars"]]
    assert [s["rare_chars"] for s in samples] == ["", "龘龘", "", "𪚥"]
    assert summary["han_chars"] == 12 and summary["rare_char_rate"] == pytest.approx(3 / 12)
    assert summary["rare_answer_rate"] == pytest.approx(2 / 4)
    assert summary["bleu_4"] == pytest.approx(sum(bleu_4(a, "床前明月光") for a in answers.values()) / 4, abs=1e-4)
    _, summary = evaluate(None, {}, "chat", cases, SETTINGS, common=None)
    assert summary["rare_char_rate"] is None and summary["rare_answer_rate"] is None


def test_bleu_4_is_nltk_character_bleu_with_geometric_smoothing():
    ref = "床前明月光，疑是地上霜。"
    assert bleu_4(ref, ref) == pytest.approx(1.0) and bleu_4(" " + ref + "\n", ref) == pytest.approx(1.0)
    assert bleu_4("大漠孤烟直", ref) == 0 and bleu_4("", ref) == 0
    # by hand: 7 characters against 12; 1-grams 明 月 床 前 match (4/7), 2-grams 明月 床前 (2/6), no
    # 3- or 4-gram: method3 counts the first missing order 1/2 match, the next 1/4 (Chen & Cherry 2014)
    p = [Fraction(4, 7), Fraction(2, 6), Fraction(1, 2 * 5), Fraction(1, 4 * 4)]
    brevity = math.exp(1 - 12 / 7)
    expected = brevity * math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu_4("明月很亮照床前", ref) == pytest.approx(expected, rel=1e-12)
    assert bleu_4("床前", "床前") == pytest.approx((1 * 1 * 0.5 * 0.25) ** 0.25)  # under 4 characters: below 1


def test_bleu_needs_no_nltk_data(monkeypatch):
    import nltk

    def no_data(*args, **kwargs):
        raise AssertionError("nltk looked for data")
    monkeypatch.setattr(nltk.data, "find", no_data)
    monkeypatch.setattr(nltk.data, "load", no_data)
    monkeypatch.setattr(nltk, "download", no_data)
    assert bleu_4("床前明月光很亮", "床前明月光，疑是地上霜。") > 0


def test_a_model_that_invents_characters_fails_visibly(sft_model, tmp_path):
    """The tiny SFT model answers its training pairs word for word: no rare character, BLEU-4 1.
    The same model judged against a training text of other characters (its checkpoint pointed at
    other data) writes only rare ones: eval.json, the printed table and report.md all say so."""
    src = write_jsonl(tmp_path / "test.jsonl", PAIRS[:5])
    own = tmp_path / "own"
    own.mkdir()
    shutil.copyfile(sft_model / "ckpt.pt", own / "ckpt.pt")
    proc = run_script("evaluations.py", f"--out_dir={own}", f"--input={src}", "--seen_samples=0")
    results = json.loads((own / "eval.json").read_text(encoding="utf-8"))
    assert results["rare_char_rate"] == 0 and results["rare_answer_rate"] == 0 and results["common_chars"] > 20
    assert results["bleu_4"] == pytest.approx(1.0) and "FAIL" not in proc.stdout
    assert "rare char rate" in proc.stdout and "BLEU-4" in proc.stdout

    poems = [{"question": f"第{i}首诗？", "answer": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"} for i in range(8)]
    run_script("data/prepare_sft.py", "--tokenizer=gpt2", f"--input={write_jsonl(tmp_path / 'poems.jsonl', poems)}",
               f"--out_dir={tmp_path / 'poems'}", "--block_size=96", "--val_fraction=0")
    state = checkpoint.read(sft_model)
    state["config"]["data_dir"] = str(tmp_path / "poems")
    checkpoint.save(tmp_path / "other", state, best=True)
    proc = run_script("evaluations.py", f"--out_dir={tmp_path / 'other'}", f"--input={src}", "--seen_samples=0",
                      "--report=True")
    results = json.loads((tmp_path / "other" / "eval.json").read_text(encoding="utf-8"))
    assert results["rare_answer_rate"] == 1 and results["rare_char_rate"] > 0.5
    assert [line for line in proc.stdout.splitlines() if line.startswith("rare char rate")][0].endswith(
        "FAIL: above 0.01")
    report = (tmp_path / "other" / "report.md").read_text(encoding="utf-8")
    assert "✗（超过 0.01）" in report and "；罕见字：" in report and "rare_chars" in report

    # fine-tuned on the poems from a parent trained on the pairs (then resumed, whose config still
    # names the parent): the common set is built from both
    for init_from in ("pretrained", "resume"):
        state["config"] |= {"init_from": init_from, "init_checkpoint": str(own)}
        checkpoint.save(tmp_path / init_from, state, best=True)
        proc = run_script("evaluations.py", f"--out_dir={tmp_path / init_from}", f"--input={src}", "--seen_samples=0")
        results = json.loads((tmp_path / init_from / "eval.json").read_text(encoding="utf-8"))
        assert results["rare_char_rate"] == 0 and str(tmp_path / "poems") in proc.stderr
        assert str(checkpoint.read(own)["config"]["data_dir"]) in proc.stderr
