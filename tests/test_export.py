"""export.py / hf_export.py: a checkpoint written as a Hugging Face GPT2LMHeadModel folder computes
our logits and our greedy tokens in transformers, its tokenizer gives our ids (gpt2 and a trained
one), its chat template renders our SFT prompt, int8 checkpoints export dequantized, and what
cannot be exported is refused with a message. Tiny random models, built here; no network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; set before transformers is imported

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import PAIRS, run_script, write_jsonl  # noqa: E402

import checkpoint  # noqa: E402
import hf_export  # noqa: E402
import lora  # noqa: E402
import quant  # noqa: E402
from data.tokenizer import (EOT_TOKEN, PAD_TOKEN, SFT_TEMPLATE, SYSTEM_TEMPLATE, conversation_ids,  # noqa: E402
                            load_tokenizer)
from engine import prompt_ids  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_prepare import corpus  # noqa: E402

TEXT = "床前明月光，疑是地上霜。Hello, world! 😀🎉🇨🇳 魑魅魍魉𠀀 123456\t tabs  and\n\nlines "
KINDS = [("gpt2", "pretrain"), ("gpt2", "sft"), ("zh", "pretrain"), ("zh", "sft")]


def make_checkpoint(out_dir, tok, kind: str, bias: bool = False, val_loss: float = 2.5) -> dict:
    """A tiny random model saved as a training checkpoint. Its weights are spread wider than
    training's init (std 0.3 added) so the logits differ by more than float noise: a greedy tie
    would not test anything."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.model_vocab_size, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    meta = {"tokenizer": tok.meta(), "kind": kind, "sources": ["tiny.jsonl"]}
    if kind == "sft":
        meta |= {"sft_template": SFT_TEMPLATE, "system_template": SYSTEM_TEMPLATE}
    state = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "data_meta": meta,
             "config": {"data_dir": "data/tiny"}, "iter_num": 7, "best_val_loss": val_loss}
    checkpoint.save(out_dir, state, best=True)
    return state


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A tiny trained tokenizer (vocabulary 512) whose text has what real Chinese text and SFT data
    have: quotes after a colon and answers after "答：", so it merges "：“" and "：是" (the conftest
    one, trained on the documents alone, has neither)."""
    tmp = tmp_path_factory.mktemp("chat_tokenizer")
    rows = corpus(40) + [{"text": f"他说：“{p['answer']}”问：{p['question']}\n答：{p['answer']}"} for p in PAIRS * 3]
    run_script("data/train_tokenizer.py", f"--input={write_jsonl(tmp / 'docs.jsonl', rows)}",
               f"--out_path={tmp / 'chat.tiktoken'}", "--vocab_size=512", "--val_fraction=0")
    return tmp / "chat.tiktoken"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, chat_tokenizer):
    """{(tokenizer, kind): (checkpoint folder, exported folder)}; zh pretrain has biases (the others
    bias=False, our default: zero biases in the export)."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for name, kind in KINDS:
        tok = load_tokenizer("gpt2" if name == "gpt2" else str(chat_tokenizer))
        make_checkpoint(tmp / f"{name}-{kind}", tok, kind, bias=(name, kind) == ("zh", "pretrain"))
        out[name, kind] = tmp / f"{name}-{kind}", hf_export.export(tmp / f"{name}-{kind}", tmp / f"hf-{name}-{kind}")
    return out


def hf_model(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("key", KINDS, ids="-".join)
def test_transformers_computes_our_logits_and_greedy_tokens(exported, key):
    source, folder = exported[key]
    ours, ckpt = checkpoint.load(source)
    tok = checkpoint.tokenizer(ckpt)
    theirs = hf_model(folder)
    assert isinstance(theirs, transformers.GPT2LMHeadModel) and theirs.lm_head.weight is theirs.transformer.wte.weight
    x = torch.tensor([tok.encode(TEXT)[:40]])
    with torch.no_grad():
        want, got = ours(x, x)[0], theirs(x).logits
    assert want.shape == got.shape and (want - got).abs().max() < 1e-4, (want - got).abs().max()
    # greedy, our sampler's vocabulary mask (max_token_id) and no UTF-8 constraint; transformers gets
    # the same mask from generation_config.json's suppress_tokens
    prompt = x[:, :12]
    mine = list(ours.generate(prompt, 40, temperature=0.0, eot_id=tok.eot_id, max_token_id=tok.vocab_size))
    out = theirs.generate(prompt, do_sample=False, max_new_tokens=40, repetition_penalty=1.0,
                          attention_mask=torch.ones_like(prompt))
    assert out[0, 12:].tolist() == mine and len(set(mine)) > 3
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["suppress_tokens"] == list(range(tok.vocab_size, ckpt["model_args"]["vocab_size"]))
    assert generation["eos_token_id"] == tok.eot_id and generation["pad_token_id"] == tok.pad_id


def test_gelu_new_would_not_match(exported, tmp_path):
    """GPT-2's own activation (tanh-approximate gelu_new) gives other logits: the logits test above
    would fail without activation_function "gelu"."""
    source, folder = exported["zh", "sft"]
    ours, ckpt = checkpoint.load(source)
    shutil.copytree(folder, tmp_path / "tanh")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["activation_function"] == "gelu"
    (tmp_path / "tanh" / "config.json").write_text(json.dumps(config | {"activation_function": "gelu_new"}))
    x = torch.tensor([checkpoint.tokenizer(ckpt).encode(TEXT)[:40]])
    with torch.no_grad():
        diff = (ours(x, x)[0] - hf_model(tmp_path / "tanh")(x).logits).abs().max()
    assert diff > 1e-3, diff


@pytest.mark.parametrize("name", ["gpt2", "zh"])
def test_the_chat_template_renders_our_sft_prompt(exported, name):
    """A system message and earlier exchanges, answers that begin with a letter and with a quote mark
    (where a whole-string tokenization would merge "答：" into the answer): our ids exactly."""
    source, folder = exported[name, "sft"]
    ckpt = checkpoint.read(source)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    history = (("第1个成语是什么？", "是画蛇添足。"), ("它是什么意思？", "“画蛇添足”比喻做多余的事。"))
    question, system = "再说一个 please 😀", "你是成语老师。"
    messages = [{"role": "system", "content": system}]
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    want = prompt_ids(ckpt, question, "chat", history, system)
    got = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert got == want
    assert hf_tok.apply_chat_template(messages[1:], return_dict=False) == prompt_ids(ckpt, question, "chat", history)
    # a whole conversation renders the training ids (EOT after each answer)
    tok = checkpoint.tokenizer(ckpt)
    whole = conversation_ids(tok, history, None, system)[0]
    assert hf_tok.apply_chat_template(messages[:-1], return_dict=False) == whole
    # without the piece separator the rendered string tokenizes differently with the trained tokenizer
    # ("：是" is one pre-token of its pattern): the template needs it. GPT-2's pattern splits after "："
    # and its BPE has no token joining "：" to what follows, so there it changes nothing.
    text = hf_tok.apply_chat_template(messages, tokenize=False)
    assert text.count(hf_export.CHAT_SEP) == 4
    joined = hf_tok.encode(text.replace(hf_export.CHAT_SEP, ""), add_special_tokens=False)
    assert (joined == want) == (name == "gpt2")


@pytest.mark.parametrize("name", ["gpt2", "zh"])
def test_the_exported_tokenizer_gives_our_ids_and_text(exported, name):
    source, folder = exported[name, "sft"]
    tok = checkpoint.tokenizer(checkpoint.read(source))
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [TEXT, "Ünïcödé café naïve — “quotes” ‘single’ … ¥€", "  leading spaces\r\nand CRLF\n", "a" * 300,
             *(d["text"] for d in corpus(40)), *(p["question"] + p["answer"] for p in PAIRS)]
    for text in texts:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids) == text == tok.decode(ids)
    assert (hf_tok.eos_token, hf_tok.eos_token_id, hf_tok.pad_token, hf_tok.pad_token_id) == (
        EOT_TOKEN, tok.eot_id, PAD_TOKEN, tok.pad_id)
    if name == "gpt2":  # GPT-2's own files: its vocabulary and merges
        assert json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"][0] == ["Ġ", "t"]


# llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre) names a tokenizer's pre-tokenizer by the sha256
# of the ids it gives this text; GPT-2's (openai-community/gpt2) is LLAMA_GPT2_HASH: "gpt-2"
LLAMA_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
LLAMA_GPT2_HASH = "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454"


def test_llama_cpp_recognizes_the_gpt2_exports_as_gpt2(exported):
    """Pretrained and SFT (with the CHAT_SEP split) alike: llama.cpp's converter accepts them;
    a trained tokenizer has a hash of its own (README.md, "Export to the Hugging Face format": how to register it)."""
    hashes = {key: hashlib.sha256(str(transformers.AutoTokenizer.from_pretrained(folder).encode(LLAMA_CHKTXT))
                                  .encode()).hexdigest() for key, (_, folder) in exported.items()}
    assert hashes["gpt2", "pretrain"] == hashes["gpt2", "sft"] == LLAMA_GPT2_HASH
    assert hashes["zh", "sft"] != LLAMA_GPT2_HASH


def test_an_int8_checkpoint_exports_dequantized(tmp_path):
    tok = load_tokenizer("gpt2")
    state = make_checkpoint(tmp_path / "float", tok, "sft", val_loss=float("inf"))  # trained without a val split
    model, _ = checkpoint.load(tmp_path / "float")
    checkpoint.save_standalone(state, quant.quantize_int8(model), tmp_path / "int8", int8=True)
    folder = hf_export.export(tmp_path / "int8", tmp_path / "hf")
    x = torch.tensor([tok.encode(TEXT)[:40]])
    with torch.no_grad():
        dequantized = checkpoint.load(tmp_path / "int8")[0](x, x)[0]
        got = hf_model(folder)(x).logits
        exact = model(x, x)[0]
    assert (got - dequantized).abs().max() < 1e-4 and (got - exact).abs().max() > 1e-3
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "exported dequantized" in card and "best validation loss: not measured (no val split)" in card


def test_a_lora_checkpoint_exports_merged_into_its_base(tmp_path):
    """The adapted model's logits (peft's forward) from the exported folder; a moved base named with lora_base."""
    tok = load_tokenizer("gpt2")
    state = make_checkpoint(tmp_path / "base", tok, "sft")
    settings = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(lora.TARGETS), "train_embeddings": True}
    adapted = lora.attach(checkpoint.load(tmp_path / "base")[0], settings)
    with torch.no_grad():  # a trained adapter: B no longer zero
        for p in lora.trainable(adapted).values():
            p.add_(torch.randn_like(p) * 0.2)
    reference = lora.base_reference(tmp_path / "base" / "ckpt.pt", tmp_path / "run")
    checkpoint.save(tmp_path / "run", state | {"model": lora.adapter_state(adapted),
                                               "lora": settings | {"base": reference}}, best=True)
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="is missing"):
        hf_export.export(tmp_path / "run", tmp_path / "hf")
    folder = hf_export.export(tmp_path / "run", tmp_path / "hf", lora_base=tmp_path / "moved")
    x = torch.tensor([tok.encode(TEXT)[:40]])
    with torch.no_grad():
        want, got = adapted.eval()(x, x)[0], hf_model(folder)(x).logits
    assert (want - got).abs().max() < 1e-4, (want - got).abs().max()
    assert "- LoRA: rank 4 adapters on attn.c_attn" in (folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("key", [("zh", "sft"), ("gpt2", "pretrain")], ids="-".join)
def test_the_model_card_has_the_training_and_eval_figures_and_its_code_runs(exported, tmp_path, key):
    source, _ = exported[key]
    shutil.copytree(source, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "eval.json").write_text(json.dumps({"rouge_l": 0.25, "perplexity": 12.5, "samples": 4}))
    folder = hf_export.export(tmp_path / "ckpt", tmp_path / "hf")
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "steps: 7, best validation loss: 2.5000" in card and f"data: `data/tiny` ({key[1]}), sources: tiny.jsonl" in card
    assert "| Rouge-L F1 | 0.2500 |" in card and "| perplexity | 12.5000 |" in card and "| samples | 4 |" in card
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1).replace("PATH", str(folder))
    exec(code, {"print": lambda *a: None})  # sampling with generation_config.json up to the context


def export_cli(*args):
    return run_script("export.py", *args, check=False)


def test_refusals_name_what_is_wrong_and_leave_nothing_behind(exported, tmp_path):
    source, _ = exported["gpt2", "pretrain"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt.pt").write_text("not a checkpoint")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    cases = [((f"--out_dir={tmp_path / 'junk'}", f"--to={tmp_path / 'a'}"), "not a MiniGLM checkpoint"),
             ((f"--out_dir={tmp_path / 'none'}", f"--to={tmp_path / 'a'}"), "no checkpoint here"),
             ((f"--out_dir={source}",), "--to=PATH"),
             ((f"--out_dir={source}", f"--to={tmp_path / 'full'}"), "not empty; pass --overwrite=True"),
             ((f"--out_dir={source}", f"--to={tmp_path / 'file'}"), "a file, not a folder"),
             ((f"--out_dir={source}", f"--to={source}", "--overwrite=True"), "holds the checkpoint")]
    for args, words in cases:
        proc = export_cli(*args)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (source / "ckpt.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "junk"]
    proc = export_cli(f"--out_dir={source}", f"--to={tmp_path / 'full'}", "--overwrite=True")
    assert proc.returncode == 0 and "wrote" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted(hf_export.FILES)
    assert (tmp_path / "full").stat().st_mode & 0o755 == 0o755  # readable by a server of another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "junk"]


@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_an_interrupted_export_keeps_the_old_folder(exported, tmp_path, monkeypatch, when):
    """Interrupted while writing the files, or between moving the old folder away and the new one in."""
    source, _ = exported["gpt2", "pretrain"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    real_replace = os.replace

    def interrupted(*args):
        raise KeyboardInterrupt

    def replace(src, dst):
        if ".hf.export-" in str(src) and str(dst) == str(tmp_path / "hf"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    if when == "writing":
        monkeypatch.setattr(hf_export, "model_card", interrupted)
    else:
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        hf_export.export(source, tmp_path / "hf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and (tmp_path / "hf" / "keep.txt").read_text() == "mine"
