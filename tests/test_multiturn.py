"""Multi-turn chat end to end: a tiny model trained (in this process) on a few two-turn dialogues in
the one chat template (data.tokenizer.conversation_ids) answers a follow-up question that only the
previous turn makes answerable: "它出自哪里？" gets the source of the idiom asked about before."""
import base64

import pytest
import torch

from data.tokenizer import SFT_TEMPLATE, conversation_ids, load_tokenizer
from engine import reply
from model import GPT, GPTConfig

FOLLOW_UP = "它出自哪里？"
# (idiom, meaning, source): every follow-up is the same question, every source a different book
IDIOMS = [("画蛇添足", "比喻做了多余的事，反而不好。", "出自《战国策》。"),
          ("守株待兔", "比喻死守经验，不知变通。", "出自《韩非子》。"),
          ("井底之蛙", "比喻见识短浅的人。", "出自《庄子》。"),
          ("叶公好龙", "比喻口头上爱好，实际上并不爱好。", "出自《新序》。")]


def first_question(idiom: str) -> str:
    return f"成语“{idiom}”是什么意思？"


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """(model, ckpt): a 2-layer GPT trained on the dialogues rendered as prepare_sft renders a
    conversation, the loss on the answers and their EOTs only (the mask turned into ignored targets).
    Its tokenizer has the 256 bytes and no merges (a tokenizer file as data/train_tokenizer.py writes
    one): 320 embedding rows instead of gpt2's 50304 keep the training to seconds."""
    path = tmp_path_factory.mktemp("bytes") / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)), encoding="ascii")
    tok = load_tokenizer(str(path))
    rows = [conversation_ids(tok, [(first_question(i), meaning), (FOLLOW_UP, source)])
            for i, meaning, source in IDIOMS]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [tok.pad_id] * (T - len(ids)) for ids, _ in rows])  # (B, T)
    mask = torch.tensor([m + [0] * (T - len(m)) for _, m in rows], dtype=torch.bool)
    x, y, loss_mask = ids[:, :-1], ids[:, 1:], mask[:, 1:]  # a target counts where its token is an answer's
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=tok.model_vocab_size, n_layer=2, n_head=2, n_embd=64,
                          dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ckpt = {"data_meta": {"kind": "sft", "sft_template": SFT_TEMPLATE, "tokenizer": tok.meta()}}
    return model.eval(), ckpt


def test_a_follow_up_question_is_answered_from_the_previous_turn(memorised):
    model, ckpt = memorised
    greedy = dict(temperature=0.0, max_new_tokens=64)
    for idiom, meaning, source in IDIOMS:
        first = reply(model, ckpt, first_question(idiom), "chat", **greedy)
        assert first == meaning
        assert reply(model, ckpt, FOLLOW_UP, "chat", history=[(first_question(idiom), first)], **greedy) == source
    # the same follow-up after another idiom's first turn gets that idiom's source: the answer comes from the history
    sources = {reply(model, ckpt, FOLLOW_UP, "chat", history=[(first_question(i), m)], **greedy) for i, m, _ in IDIOMS}
    assert sources == {s for _, _, s in IDIOMS}
