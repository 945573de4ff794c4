"""data/train_tokenizer.py: a byte-level BPE trained on the corpus, written in tiktoken's format."""
import hashlib
import json

import pytest
from conftest import WORDS, run_script, write_jsonl

from data.records import split_hash
from data.tokenizer import EOT_TOKEN, PAD_TOKEN, read_ranks, trained_encoding


def corpus(n: int = 200) -> list:
    return [{"text": f"第{i}篇：成语“{WORDS[i % 20]}”出自古书。{WORDS[(i * 7) % 20]}的意思是比喻做事。"} for i in range(n)]


def train(tmp_path, *args, check=True):
    src = tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, corpus())
    return run_script("data/train_tokenizer.py", f"--input={src}", f"--out_path={tmp_path / 'tok.tiktoken'}",
                      "--vocab_size=400", *args, check=check)


def test_the_same_input_gives_the_same_file_and_its_sha256(tmp_path):
    train(tmp_path)
    first = (tmp_path / "tok.tiktoken").read_bytes()
    train(tmp_path)
    assert (tmp_path / "tok.tiktoken").read_bytes() == first
    digest = (tmp_path / "tok.tiktoken.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(first).hexdigest()
    assert len(read_ranks(tmp_path / "tok.tiktoken")) == 398  # + EOT + PAD = --vocab_size


def test_every_character_round_trips_and_user_text_never_becomes_a_special_token(tmp_path):
    train(tmp_path)
    enc = trained_encoding(read_ranks(tmp_path / "tok.tiktoken"), "tok")
    eot, pad = enc.encode_single_token(EOT_TOKEN), enc.encode_single_token(PAD_TOKEN)
    assert (eot, pad) == (398, 399) and enc.n_vocab == 400
    text = "成语“守株待兔”出自《韩非子》。English words, digits 2026, emoji 😀🀄, " + EOT_TOKEN + PAD_TOKEN + "\n\t末"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and eot not in ids and pad not in ids
    assert len(enc.encode_ordinary("成语出自古书")) < len("成语出自古书".encode())  # merges were learned


def test_val_documents_are_held_out_and_bad_records_are_reported(tmp_path):
    rows = corpus()
    held = sum(split_hash(r["text"]) < 0.2 for r in rows)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + ["{not json", json.dumps({"title": "no text"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = train(tmp_path, "--val_fraction=0.2")
    assert 0 < held < len(rows) and f"trained on {len(rows) - held:,} documents" in proc.stdout
    assert f"{held:,} held out as val" in proc.stdout
    assert f"in.jsonl:{len(rows) + 1}:" in proc.stderr and f"in.jsonl:{len(rows) + 2}:" in proc.stderr
    assert "invalid_json=1" in proc.stdout and "missing_text=1" in proc.stdout


@pytest.mark.parametrize("args, words", [(("--vocab_size=100",), "expected 258..65536"),
                                         (("--input=nowhere/*.jsonl",), "no input files found")])
def test_bad_flags_are_refused_with_the_flag_named(tmp_path, args, words):
    proc = train(tmp_path, *args, check=False)
    assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_truncated_or_foreign_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file here"):
        read_ranks(tmp_path / "none.tiktoken")
    train(tmp_path)
    data = (tmp_path / "tok.tiktoken").read_bytes()
    cut = tmp_path / "cut.tiktoken"
    cut.write_bytes(data[:len(data) // 2].rsplit(b"\n", 1)[0] + b"\n")
    with pytest.raises(ValueError, match="not a complete byte-level tokenizer"):
        read_ranks(cut)
    middle = data.index(b"\n", len(data) // 2) + 1
    cut.write_bytes(data[:middle + 2])  # cut inside a token's base64: the last line has no rank
    with pytest.raises(ValueError, match=r"cut.tiktoken:\d+: expected a tokenizer line"):
        read_ranks(cut)
    foreign = tmp_path / "foreign.tiktoken"
    foreign.write_text('{"model": "not a tokenizer"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="foreign.tiktoken:1: expected a tokenizer line"):
        read_ranks(foreign)
