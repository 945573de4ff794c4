"""Multi-turn chat: a tiny model trained (in this process) on a few two-turn dialogues in the one
chat template (data.tokenizer.conversation_ids) answers a follow-up question that only the previous
turn makes answerable ("它出自哪里？" gets the source of the idiom asked about before); the web page's
chat tab and arena pass the conversation they show as history. (The API's history: test_gradio.py;
the terminal chat's: test_sample.py; the prompt's: test_model.py.) evaluations.py scores the
follow-up turns of held-out dialogues apart."""
import base64
import json

import gradio as gr
import pytest
import torch
from conftest import PAIRS, run_script, write_jsonl
from test_gradio import WatchedStore
from test_serving import GREEDY

from arena import VoteBook
from data.tokenizer import SFT_TEMPLATE, conversation_ids, load_tokenizer
from engine import SAMPLING, load_model, reply, reply_batch
from model import GPT, GPTConfig
from sample_gradio import build_app
from webpage import EMPTY_REPLY, HISTORY_CHARS, newest_exchanges

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


def page_events(demo) -> tuple[dict, dict]:
    """({function name: function} of the page's events, {elem_id: component}): a test calls a tab's
    function as Gradio does, with the components' values."""
    return ({f.name: f.fn for f in demo.fns.values()},
            {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)})


def outcome(updates) -> list:
    """The outputs an event function leaves on the page: each one's last value that is not gr.skip()."""
    last = {}
    for update in updates:
        last |= {i: v for i, v in enumerate(update) if v != gr.skip()}
    return [last[i] for i in sorted(last)]


def as_sent(chatbot, messages) -> list:
    """A gr.Chatbot's value as the page sends it back to a function (content as a list of parts)."""
    return chatbot.preprocess(chatbot.postprocess(messages))


def test_the_chat_tab_passes_the_conversation_shown_as_history(sft_model, tmp_path):
    """Each question goes to the model after the exchanges the chat shows, in 问答 mode only; error
    replies, empty replies and unanswered questions are left out."""
    store = WatchedStore({"sft": sft_model}, stream_every=0)
    fns, parts = page_events(build_app(store, VoteBook(tmp_path / "v.jsonl"), [], limit=30))
    greedy = [GREEDY[k] for k in SAMPLING]

    def ask(question, shown, label="问答"):
        *_, (messages, box, status) = fns["chat"](question, shown, "sft", label, *greedy)
        assert box == "" and "tokens/s" in status
        return as_sent(parts["chatbot"], messages)

    shown = ask(PAIRS[0]["question"], [])
    shown = ask(PAIRS[1]["question"], shown)
    assert [call[4] for call in store.calls] == [(), ((PAIRS[0]["question"], PAIRS[0]["answer"]),)]
    shown = as_sent(parts["chatbot"], shown + [
        {"role": "user", "content": "坏了"}, {"role": "assistant", "content": "【出错】没有名为 'x' 的模型"},
        {"role": "user", "content": "空的"}, {"role": "assistant", "content": EMPTY_REPLY},
        {"role": "user", "content": "停了"}])
    shown = ask(PAIRS[2]["question"], shown)
    assert store.calls[-1][4] == tuple((p["question"], p["answer"]) for p in PAIRS[:2])
    assert parts["chatbot"].postprocess(shown).model_dump()[-1]["content"][0]["text"] == PAIRS[2]["answer"]
    ask("床前", shown, "续写")
    assert store.calls[-1][2:] == ("generate", {k: GREEDY[k] for k in SAMPLING}, ())


def test_each_arena_side_keeps_its_own_history(sft_model, tmp_path):
    """Each side's question comes after its own earlier answers (its chat); a side's error is not
    history; the vote record has each side's history."""
    store = WatchedStore({"a": sft_model, "b": sft_model}, stream_every=0)
    fns, parts = page_events(build_app(store, VoteBook(tmp_path / "v.jsonl"), [], limit=30))
    greedy = [GREEDY[k] for k in SAMPLING]
    shown_a, shown_b, round_, status = outcome(fns["arena"](PAIRS[0]["question"], [], [], "a", "nope", *greedy))
    assert round_ is None and "不能投票" in status
    shown_a, shown_b = as_sent(parts["answer-a"], shown_a), as_sent(parts["answer-b"], shown_b)
    _, last_b, round_, status = outcome(fns["arena"](PAIRS[1]["question"], shown_a, shown_b, "a", "b", *greedy))
    first = (PAIRS[0]["question"], PAIRS[0]["answer"])
    assert {call[0]: call[4] for call in store.calls[-2:]} == {"a": (first,), "b": ()}
    assert "请投票" in status and round_["history_a"] == [list(first)] and round_["history_b"] == []
    assert (round_["answer_a"], round_["answer_b"]) == (PAIRS[1]["answer"],) * 2
    assert last_b[-1] == {"role": "assistant", "content": PAIRS[1]["answer"]} and len(last_b) == 4


def test_a_request_keeps_the_newest_whole_exchanges_up_to_a_bound():
    """The page and the API pass on at most HISTORY_CHARS characters of history, newest exchanges
    whole (fit_prompt then keeps what fits the model), so no request makes the app tokenize megabytes."""
    pairs = [["问" * 5, "答" * 5], ["问二", "答二"], ["问三", "答三"]]
    assert newest_exchanges(pairs) == tuple(map(tuple, pairs))
    assert newest_exchanges(pairs, 8) == (("问二", "答二"), ("问三", "答三"))
    assert newest_exchanges(pairs, 7) == (("问三", "答三"),) and newest_exchanges(pairs, 3) == ()
    assert newest_exchanges([("问" * HISTORY_CHARS, "答"), ("问", "答")]) == (("问", "答"),)


def test_follow_up_turns_of_dialogues_are_answered_with_the_dialogue_so_far_and_scored_apart(sft_model, tmp_path):
    a, b = {"question": "天", "answer": "地"}, {"question": "人", "answer": "和"}  # the tiny model's context: 48 tokens
    dialogue = {"messages": [{"role": "user", "content": a["question"]}, {"role": "assistant", "content": a["answer"]},
                             {"role": "user", "content": b["question"]}, {"role": "assistant", "content": b["answer"]}]}
    src = write_jsonl(tmp_path / "test.jsonl", PAIRS[:3] + [dialogue])
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", f"--input={src}", "--seen_samples=0", "--report=True")
    results = json.loads((sft_model / "eval.json").read_text(encoding="utf-8"))
    assert results["samples"] == 3 and results["followup"]["samples"] == 1  # the first turn is no follow-up
    assert "多轮对话：留出的对话里第二轮起的 1 个追问" in (sft_model / "report.md").read_text(encoding="utf-8")
    samples = [json.loads(line) for line in (sft_model / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    follow = [s for s in samples if s["set"] == "followup"]
    assert [(s["question"], s["reference"], s["history_turns"]) for s in follow] == [(b["question"], b["answer"], 1)]
    model, ckpt = load_model(sft_model, "cpu", "fp32")  # answered after the first exchange, as reply() would
    history = ((a["question"], a["answer"]),)
    assert follow[0]["prediction"] == reply(model, ckpt, b["question"], "chat", history=history, temperature=0,
                                            max_new_tokens=128, repetition_penalty=1.5)
    together = reply_batch(model, ckpt, [b["question"], b["question"]], "chat", temperature=0, max_new_tokens=16,
                           histories=[history, ()], systems=["", ""])
    assert together[0][1]["prompt_tokens"] > together[1][1]["prompt_tokens"]  # the history is in the first prompt
    assert "follow-up turns of held-out dialogues" in proc.stdout
    only = write_jsonl(tmp_path / "dialogues.jsonl", [dialogue])  # a test file of dialogues alone
    run_script("evaluations.py", f"--out_dir={sft_model}", f"--input={only}", "--seen_samples=0")
    assert json.loads((sft_model / "eval.json").read_text(encoding="utf-8"))["followup"]["samples"] == 1
