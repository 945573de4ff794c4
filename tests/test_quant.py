"""--precision=int8 (quant.py): the int8 layers against float math, the quantized model against
float32, the int8 checkpoint (sample.py --save_quantized) through every script that loads one."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import PAIRS, run_script, write_jsonl

import checkpoint
import quant
from engine import PRECISIONS, load_model, pick_precision, reply, reply_batch
from model import GPT, GPTConfig
from serving import ModelStore

GREEDY = {"max_new_tokens": 30, "temperature": 0.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}


@pytest.mark.parametrize("width", [32, 40])  # 32: torch's int8 kernel; 40 (not a multiple of 16): dequantized
def test_int8_linear_is_the_dequantized_product(width):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(width, 24, bias=True)
    torch.nn.init.normal_(linear.weight, generator=g)
    torch.nn.init.normal_(linear.bias, generator=g)
    x = torch.randn(2, 5, width, generator=g)
    layer = quant.Int8Linear.from_float(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127
    w = quant.dequantize_rows(layer.weight, layer.scale)
    assert (w - linear.weight).abs().max() <= layer.scale.float().max() / 2 + 1e-6  # rounding: half a step
    got = layer(x.to(quant.ACT_DTYPE)).float()
    want = F.linear(x.to(quant.ACT_DTYPE).float(), w, linear.bias.to(quant.ACT_DTYPE).float())
    assert got.shape == (2, 5, 24)
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_quantizing_the_dequantized_weights_gives_the_same_int8():
    """A saved int8 checkpoint is loaded by dequantizing then quantizing again: exactly the same."""
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    w[5] = 0  # a row of zeros
    q, scale = quant.quantize_rows(w)
    q2, scale2 = quant.quantize_rows(quant.dequantize_rows(q, scale))
    assert torch.equal(q, q2) and torch.equal(scale, scale2)


def tiny_model(n_embd: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=32, vocab_size=96, bias=True)).eval()


def test_int8_model_is_close_to_float32_and_stays_tied():
    model = tiny_model()
    idx = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(idx, targets=idx)[0]
        q = quant.quantize_int8(tiny_model())
        got = q(idx, targets=idx)[0].float()
    assert q.transformer.wte.weight is q.lm_head.weight  # one int8 table for the lookup and the output
    assert {p.dtype for p in q.parameters()} == {torch.int8, quant.ACT_DTYPE}
    assert q.num_params() == pytest.approx(model.num_params(), rel=0.05)  # the scales are the extra
    rel = (got - want).norm() / want.norm()
    assert rel < 0.02, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_int8_checkpoint_round_trips_and_every_script_loads_it(sft_model, tmp_path):
    out = tmp_path / "int8"
    proc = run_script("sample.py", f"--out_dir={sft_model}", f"--save_quantized={out}", "--precision=bf16", check=False)
    assert proc.returncode != 0 and "--save_quantized writes int8 weights" in proc.stderr and not out.exists()
    proc = run_script("sample.py", f"--out_dir={sft_model}", f"--save_quantized={out}")
    assert "MB" in proc.stderr and (out / "ckpt.pt").exists()
    assert (out / "ckpt.pt").stat().st_size < (sft_model / "ckpt.pt").stat().st_size / 3  # no optimizer, int8
    saved = checkpoint.read(out)
    assert saved["precision"] == "int8" and saved["format"] == 2 and "optimizer" not in saved
    model, ckpt = load_model(sft_model, precision="int8")
    loaded, _ = load_model(out, precision="int8")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # exactly the int8 weights and scales of the in-memory quantization
    # dequantized for fp32 it answers as the int8 model does
    as_fp32, _ = load_model(out, precision="fp32")
    assert next(as_fp32.parameters()).dtype == torch.float32
    question = PAIRS[3]["question"]
    assert reply(as_fp32, ckpt, question, "chat", temperature=0) == reply(loaded, ckpt, question, "chat", temperature=0)
    # the command line, the web app's store and evaluations.py
    proc = run_script("sample.py", f"--out_dir={out}", f"--start={question}", "--temperature=0")
    assert PAIRS[3]["answer"] in proc.stdout and "int8]" in proc.stderr
    store = ModelStore({"q": out}, precision="int8")
    text, stats = list(store.stream("q", question, "", GREEDY))[-1]
    assert text == PAIRS[3]["answer"] and stats["new_tokens"] > 1
    run_script("evaluations.py", f"--out_dir={out}", f"--input={write_jsonl(tmp_path / 'pairs.jsonl', PAIRS)}",
               "--precision=int8", "--max_new_tokens=30")
    results = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert results["settings"]["precision"] == "int8" and results["rouge_l"] > 0.9  # the memorized answers
    # training does not start from it: it has no optimizer state and its weights are rounded
    proc = run_script("train.py", f"--data_dir={sft_model.parent / 'data'}", f"--out_dir={out}", "--init_from=resume",
                      check=False)
    assert proc.returncode != 0 and "--save_quantized" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_every_precision_answers_alone_and_in_a_batch(sft_model, precision):
    """The memorized answers in every precision this CPU runs (fp16: if torch has its CPU kernels),
    alone and batched (greedy: int8 and bf16 may round a near tie differently, so the memorized
    answers are what must hold, as the issue asks, not the tokens of fp32)."""
    model, ckpt = load_model(sft_model, precision=precision)
    questions = [p["question"] for p in PAIRS[:6]]
    alone = [reply(model, ckpt, q, "chat", temperature=0, max_new_tokens=30) for q in questions]
    together = [text for text, _ in reply_batch(model, ckpt, questions, "chat", temperature=0, max_new_tokens=30)]
    want = [p["answer"] for p in PAIRS[:6]]
    assert alone == want and together == want


def test_precision_choices_and_refusals():
    assert pick_precision("cpu") == "int8"  # measured fastest on CPUs with and without AVX-512 (README)
    for device in ("cuda", "mps"):
        with pytest.raises(ValueError, match=f"int8 runs on the CPU only.*on {device}.*choices: fp32, bf16, fp16, int8"):
            pick_precision(device, "int8")
    with pytest.raises(ValueError, match="expected one of fp32, bf16, fp16, int8"):
        pick_precision("cpu", "int4")
