"""model.py: size, masked loss, learning, KV-cache generation; the streaming decoder; sample.py's prompts
and command line."""
import dataclasses

import pytest
import torch
from conftest import run_script

from data.tokenizer import StreamDecoder, load_tokenizer
from model import GPT, GPTConfig, KVCache

GPT2 = load_tokenizer("gpt2")
EOT_ID, VOCAB_SIZE, MODEL_VOCAB_SIZE = GPT2.eot_id, GPT2.vocab_size, GPT2.model_vocab_size


def tiny(block_size=32, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def test_default_config_has_about_45m_parameters():
    model = GPT(GPTConfig())
    n = model.num_params()
    print(f"default model: {n:,} parameters")
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (6, 8, 512)
    assert model.config.vocab_size == MODEL_VOCAB_SIZE == 50304
    assert 44_000_000 < n < 46_000_000


def test_set_dropout_reaches_the_attention_dropout_too():
    """A run's --dropout over a checkpoint's (train.py, init_from=pretrained or resume): the
    attention's dropout_p is a float, not an nn.Dropout, and was left at the checkpoint's value."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)).train()
    model.set_dropout(0.5)
    assert model.config.dropout == 0.5
    for m in model.modules():  # only the attention's dropout left on
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.5
            m.p = 0.0
    idx = torch.randint(0, 64, (2, 16))
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_masked_targets_do_not_change_the_loss():
    model = tiny()
    x = torch.randint(0, VOCAB_SIZE, (3, 16))
    y = torch.randint(0, VOCAB_SIZE, (3, 16))
    mask = torch.rand(3, 16) > 0.5
    _, loss = model(x, y, mask)
    y2 = torch.where(mask, y, torch.randint(0, VOCAB_SIZE, (3, 16)))
    _, loss2 = model(x, y2, mask)
    assert torch.equal(loss, loss2)
    logits, _ = model(x, y, mask)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none")
    assert torch.allclose(loss, ce[mask.view(-1)].mean())


def test_all_zero_mask_is_safe():
    model = tiny().train()
    x = torch.randint(0, VOCAB_SIZE, (2, 8))
    _, loss = model(x, x, torch.zeros(2, 8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tiny_model_overfits_one_batch():
    model = tiny().train()
    x = torch.randint(0, 1000, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 6 and loss.item() < 0.5, (first, loss.item())


@pytest.mark.parametrize("prompt_len,new", [(5, 20), (20, 60), (40, 10)])
def test_kv_cache_greedy_equals_uncached(prompt_len, new):
    """Token for token, also across the block_size rebuild and for prompts over the block."""
    model = tiny(block_size=32)
    idx = torch.randint(0, VOCAB_SIZE, (1, prompt_len))
    cached = list(model.generate(idx, new, temperature=0, use_cache=True))
    plain = list(model.generate(idx, new, temperature=0, use_cache=False))
    assert cached == plain and len(cached) == new


def test_kv_cache_is_allocated_once_and_written_in_place():
    """One (B, n_head, block_size, head_dim) buffer per layer, the same storage every step, and the
    cached logits those of the whole sequence without a cache."""
    model = tiny(block_size=32)
    seq = torch.randint(0, VOCAB_SIZE, (2, 12))
    cache = KVCache(model.config.n_layer, 32)
    model(seq[:, :9], cache=cache)
    storage = [t.data_ptr() for t in cache.k + cache.v]
    assert cache.length == 9 and all(t.shape == (2, 2, 32, 16) for t in cache.k + cache.v)
    for t in range(9, 12):
        logits, _ = model(seq[:, t:t + 1], cache=cache)
        assert [t.data_ptr() for t in cache.k + cache.v] == storage
        assert torch.allclose(logits, model(seq[:, :t + 1])[0], atol=1e-5)
    assert cache.length == 12


def test_kv_cache_sampling_equals_uncached_with_the_same_seed():
    model = tiny(block_size=32)
    idx = torch.randint(0, VOCAB_SIZE, (1, 6))
    runs = [list(model.generate(idx, 40, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2,
                                use_cache=c, generator=torch.Generator().manual_seed(7))) for c in (True, False)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("temperature, use_cache", [(0.0, True), (1.0, True), (0.0, False)])
def test_batched_generation_equals_one_prompt_at_a_time(temperature, use_cache):
    """float32, prompts of different lengths, some rows ending at EOT early, others running past
    block_size (the rebuild), with the repetition penalty, the UTF-8 constraint and each row's own
    generator: token for token what generate gives each prompt alone."""
    from engine import utf8_constraint
    model = tiny(block_size=32)
    torch.manual_seed(1)
    prompts = [torch.randint(0, VOCAB_SIZE, (n,)).tolist() for n in (3, 17, 1, 30, 9, 25, 40)]
    settings = dict(temperature=temperature, top_k=50, top_p=0.9, repetition_penalty=1.5, max_token_id=VOCAB_SIZE,
                    use_cache=use_cache, constraint=utf8_constraint(GPT2, model.config.vocab_size))

    def alone(eot_id):
        return [list(model.generate(torch.tensor([p]), 45, eot_id=eot_id, generator=torch.Generator().manual_seed(i),
                                    **settings)) for i, p in enumerate(prompts)]

    eot_id = alone(None)[0][4]  # a token the first row gives early: it ends there, as may others
    expected, got = alone(eot_id), [[] for _ in prompts]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    for step in model.generate_batch(prompts, 45, eot_id=eot_id, generators=gens, **settings):
        assert len({row for row, _ in step}) == len(step) and all(not got[row] or got[row][-1] != eot_id
                                                                  for row, _ in step)
        for row, token in step:
            got[row].append(token)
    assert got == expected
    assert len(got[0]) == 5 and max(map(len, got)) == 45, "rows end at EOT early and others run past the block"


def test_long_prompt_keeps_its_last_tokens():
    model = tiny(block_size=32)
    idx = torch.randint(0, VOCAB_SIZE, (1, 100))
    assert list(model.generate(idx, 5, temperature=0)) == list(model.generate(idx[:, -31:], 5, temperature=0))


def test_never_samples_padding_ids_and_stops_at_eot(monkeypatch):
    model = tiny()
    favourite = {"id": 7}

    def forward(idx, targets=None, loss_mask=None, cache=None, pad=None):  # PAD and padding rows dominate
        logits = torch.zeros(idx.size(0), 1, MODEL_VOCAB_SIZE)
        logits[..., VOCAB_SIZE:] = 100.0
        logits[..., favourite["id"]] = 1.0
        return logits, None

    monkeypatch.setattr(model, "forward", forward)
    x = torch.zeros(1, 4, dtype=torch.long)
    assert list(model.generate(x, 5, temperature=0, max_token_id=VOCAB_SIZE)) == [7] * 5
    out = list(model.generate(x, 200, temperature=2.0, max_token_id=VOCAB_SIZE,
                              generator=torch.Generator().manual_seed(0)))
    assert len(out) == 200 and max(out) < VOCAB_SIZE
    favourite["id"] = EOT_ID
    assert list(model.generate(x, 50, temperature=0, eot_id=EOT_ID, max_token_id=VOCAB_SIZE)) == [EOT_ID]


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (None, None, {0, 1, 2, 3}),
    (3, None, {0, 1, 2}),
    (None, 0.6, {0, 1}),     # masses 0.4, 0.3, 0.2, 0.1: 0.4 < 0.6, so the second is kept too
    (None, 0.4, {0}),
    (None, 0.0, {0}),        # top_p 0: only the most likely token
    (3, 0.0, {0}),
    (2, 0.95, {0, 1}),
])
def test_top_k_and_top_p_sample_only_from_their_set(monkeypatch, top_k, top_p, allowed):
    model = tiny()
    probs = torch.full((MODEL_VOCAB_SIZE,), 0.0)
    probs[:4] = torch.tensor([0.4, 0.3, 0.2, 0.1])

    def forward(idx, targets=None, loss_mask=None, cache=None, pad=None):
        return torch.log(probs).expand(idx.size(0), 1, -1), None

    monkeypatch.setattr(model, "forward", forward)
    out = list(model.generate(torch.zeros(1, 1, dtype=torch.long), 400, temperature=1.0, top_k=top_k,
                              top_p=top_p, generator=torch.Generator().manual_seed(0)))
    assert set(out) == allowed


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-45, 5e-324])
def test_a_temperature_near_zero_is_greedy(monkeypatch, temperature):
    model = tiny()
    logits = torch.linspace(-40.0, 60.0, MODEL_VOCAB_SIZE)[torch.randperm(MODEL_VOCAB_SIZE)]
    monkeypatch.setattr(model, "forward", lambda idx, cache=None, pad=None: (logits.expand(idx.size(0), 1, -1), None))
    x = torch.zeros(1, 1, dtype=torch.long)
    for top_k, top_p in [(None, None), (50, 0.95), (0, 1.0)]:
        out = list(model.generate(x, 5, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=torch.Generator().manual_seed(0)))
        assert out == [int(logits.argmax())] * 5


def test_forward_rejects_sequences_over_the_block():
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        tiny(block_size=32)(torch.zeros(1, 33, dtype=torch.long))


def test_stream_decoder_never_emits_broken_characters():
    text = "魑魅魍魉，𠀀龘。Hello 世界"
    ids = GPT2.encode(text)
    assert len(ids) > len(text) // 2, "this text should need multi-token characters"
    dec = StreamDecoder(GPT2)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 3, "text streams out as it comes"


def test_flush_drops_a_character_cut_off_by_the_end():
    ids = GPT2.encode("你好魑")
    dec = StreamDecoder(GPT2)
    text = "".join(dec.push(t) for t in ids[:-1]) + dec.flush()
    assert text == "你好"


def test_utf8_constraint_keeps_random_models_from_broken_characters():
    """An untrained model emits stray byte tokens; with the constraint every sample decodes cleanly."""
    from engine import utf8_constraint
    model = tiny()
    x = torch.tensor([GPT2.encode("床前明月光")])
    g = torch.Generator().manual_seed(0)
    free = GPT2.enc.decode(list(model.generate(x, 300, temperature=1.5, max_token_id=VOCAB_SIZE, generator=g)),
                      errors="replace")
    assert "\ufffd" in free, "the unconstrained sample should show the problem"
    g = torch.Generator().manual_seed(0)
    ids = list(model.generate(x, 300, temperature=1.5, max_token_id=VOCAB_SIZE, generator=g,
                              constraint=utf8_constraint(GPT2, model.config.vocab_size)))
    dec = StreamDecoder(GPT2)
    text = "".join(dec.push(t) for t in ids) + dec.flush()
    assert "\ufffd" not in text and len(text) > 50


def test_loss_without_logits_equals_the_full_masked_loss():
    model = tiny().train()
    x = torch.randint(0, VOCAB_SIZE, (3, 16))
    y = torch.randint(0, VOCAB_SIZE, (3, 16))
    for mask in (torch.rand(3, 16) > 0.7, None, torch.zeros(3, 16, dtype=torch.bool)):
        _, full = model(x, y, mask)
        logits, fast = model(x, y, mask, return_logits=False)
        assert logits is None and torch.allclose(full, fast, atol=1e-6)
        fast.backward()  # differentiable even when nothing is counted


def test_stream_reply_stops_at_stop_strings_and_eot(monkeypatch):
    from engine import stream_reply
    model = tiny()
    ckpt = {"data_meta": {"sft_template": "问：{question}\n答：", "tokenizer": GPT2.meta()}}
    scripted = GPT2.encode("答案是画蛇添足。\n问：下一个问题") + [EOT_ID]
    monkeypatch.setattr(model, "generate", lambda *a, **k: iter(scripted))
    pieces = list(stream_reply(model, ckpt, "问题", "chat", stop=("\n问：",)))
    assert "".join(pieces) == "答案是画蛇添足。" and len(pieces) > 1
    stats = {}
    assert "".join(stream_reply(model, ckpt, "问题", "chat", stats=stats)) == "答案是画蛇添足。\n问：下一个问题"
    assert stats["stopped_at_eot"] and stats["new_tokens"] == len(scripted)


def fed_prompt(monkeypatch, model, ckpt, text, mode, **kwargs) -> tuple[list, dict]:
    """(the token ids stream_reply gives the model, its stats)."""
    from engine import stream_reply
    fed = []
    monkeypatch.setattr(model, "generate", lambda idx, *a, **k: fed.append(idx[0].tolist()) or iter([EOT_ID]))
    stats = {}
    list(stream_reply(model, ckpt, text, mode, stats=stats, **kwargs))
    return fed[0], stats


def test_long_prompts_are_cut_to_fit_keeping_the_template_and_room_for_the_answer(monkeypatch):
    from data.tokenizer import sft_prompt
    from engine import fit_prompt, prompt_ids
    model = tiny(block_size=64)
    ckpt = {"data_meta": {"sft_template": "问：{question}\n答：", "tokenizer": GPT2.meta()}}
    question = "成语“画蛇添足”是什么意思？" * 6  # 84 characters, about 160 tokens
    for max_new, room in [(256, 16), (5, 5)]:  # room = min(max_new_tokens, block_size // 4)
        ids, stats = fed_prompt(monkeypatch, model, ckpt, question, "chat", max_new_tokens=max_new)
        kept = stats["kept_chars"]
        assert ids == GPT2.encode(sft_prompt(question[:kept]))  # the template whole, the start kept
        assert len(ids) <= 64 - room < len(GPT2.encode(sft_prompt(question[:kept + 1])))
        assert stats["input_chars"] == len(question) and stats["prompt_tokens"] == len(ids)
    text = "床前明月光，疑是地上霜。" * 10
    ids, stats = fed_prompt(monkeypatch, model, ckpt, text, "generate")
    assert ids == GPT2.encode(text[-stats["kept_chars"]:]) and 40 < len(ids) <= 48  # the end kept
    short, stats = fed_prompt(monkeypatch, model, ckpt, "你好", "chat")
    assert short == GPT2.encode(sft_prompt("你好")) and stats["kept_chars"] == 2
    history = (("问题一" * 5, "回答一" * 5), ("问题二", "回答二"))
    fit = fit_prompt(ckpt, "你好", "chat", 64, 16, history)
    assert fit.history == history[1:] and not fit.shortened  # the oldest exchange goes first
    assert fit_prompt(ckpt, "你好", "generate", 64, 16, history).history == ()  # a continuation has no exchanges
    # earlier exchanges leave the answer min(max_new_tokens, block_size // 2) tokens, not just a quarter: a long
    # conversation must not push the answer past the context (32 tokens left here: the newest exchange no longer fits)
    small = (("问题二", "回答二"),)
    assert len(prompt_ids(ckpt, "你好", "chat", small)) > 32 >= len(prompt_ids(ckpt, "你好", "chat"))
    assert fit_prompt(ckpt, "你好", "chat", 64, 64, small).history == ()
    assert fit_prompt(ckpt, "你好", "chat", 64, 16, small).history == small  # a short answer leaves room for it


def test_a_conversation_is_prompted_as_training_renders_it_and_cut_from_its_oldest_end():
    """prompt_ids: each earlier answer ends with EOT, then the open question's template, exactly the
    tokens of the training row before the next answer; one question alone is the single-turn prompt.
    fit_prompt leaves out whole exchanges, oldest first, then the system text, then cuts the question."""
    from data.tokenizer import conversation_ids, sft_prompt
    from engine import fit_prompt, prompt_ids
    ckpt = {"data_meta": {"sft_template": "问：{question}\n答：", "tokenizer": GPT2.meta()}}
    history = (("成语“画蛇添足”是什么意思？", "比喻做了多余的事。"), ("它出自哪里？", "出自《战国策》。"))
    ids = prompt_ids(ckpt, "造个句子？", "chat", history)
    pieces = [GPT2.encode(sft_prompt(q)) + GPT2.encode(a) + [EOT_ID] for q, a in history]
    assert ids == pieces[0] + pieces[1] + GPT2.encode(sft_prompt("造个句子？"))
    row, mask = conversation_ids(GPT2, [*history, ("造个句子？", "他画蛇添足。")])
    assert row[:len(ids)] == ids and mask[len(ids)] == 1 and not any(mask[len(pieces[0]) + len(pieces[1]):len(ids)])
    assert prompt_ids(ckpt, "你好", "chat") == GPT2.encode(sft_prompt("你好"))  # single turn: as before
    newest = len(prompt_ids(ckpt, "造个句子？", "chat", history[1:]))
    fit = fit_prompt(ckpt, "造个句子？", "chat", newest + 4, 4, history)  # room for the newest exchange only
    assert fit.history == history[1:] and fit.ids == prompt_ids(ckpt, "造个句子？", "chat", history[1:])
    assert not fit.shortened and len(fit_prompt(ckpt, "造个句子？", "chat", newest + 3, 4, history).history) == 0
    system = "你是一个乐于助人的中文助手，回答要简短。"
    with_system = len(prompt_ids(ckpt, "你好", "chat", (), system))
    fit = fit_prompt(ckpt, "你好", "chat", with_system + 4, 4, history, system)  # the exchanges go first
    assert (fit.history, fit.system, fit.text) == ((), system, "你好")
    fit = fit_prompt(ckpt, "你好", "chat", with_system + 3, 4, history, system)  # then the system text
    assert (fit.history, fit.system, fit.text) == ((), "", "你好") and fit.ids == GPT2.encode(sft_prompt("你好"))


def test_chat_mode_without_a_question_template_is_refused(monkeypatch):
    from engine import stream_reply
    model = tiny()
    pretrained = {"data_meta": {"kind": "pretrain", "tokenizer": GPT2.meta()}}
    with pytest.raises(ValueError, match="chat mode needs an SFT checkpoint"):
        list(stream_reply(model, pretrained, "你好", "chat"))
    assert fed_prompt(monkeypatch, model, pretrained, "你好", "generate")[0]  # continuation still works


def test_sample_cli_names_bad_settings_refuses_chat_without_a_template_and_says_when_it_cuts(tmp_path):
    model = tiny(block_size=32)
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                "data_meta": {"tokenizer": GPT2.meta(), "kind": "pretrain", "block_size": 32}, "config": {}},
               tmp_path / "ckpt.pt")
    for arg, words in [("--top_p=1.5", "--top_p=1.5: expected a number from 0.0 to 1.0"),
                       ("--max_new_tokens=0", "--max_new_tokens=0: expected a whole number from 1 to 1024"),
                       ("--temperature=-0.1", "--temperature=-0.1: expected a number from 0.0 to 2.0"),
                       ("--mode=chat", "--mode=chat needs an SFT checkpoint")]:
        proc = run_script("sample.py", f"--out_dir={tmp_path}", "--start=你好", arg, check=False)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_script("sample.py", f"--out_dir={tmp_path}", "--start=" + "床前明月光" * 10, "--max_new_tokens=3",
                      "--temperature=0", "--top_p=0")
    assert ("[input shortened to fit the model's 32-token context with 3 tokens for the answer: kept the last"
            in proc.stderr)


def test_flops_count_the_output_layer_only_where_the_loss_counts():
    """forward(return_logits=False) projects only counted positions onto the vocabulary, so MFU
    counts the output layer (6 FLOPs per weight per token) for those alone."""
    model = tiny()
    c = model.config
    head = c.vocab_size * c.n_embd
    per_position = 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
    assert model.flops(100, 100) == 100 * per_position  # every position counted: PaLM's 6N + attention
    assert model.flops(100, 30) == 100 * per_position - 70 * 6 * head
