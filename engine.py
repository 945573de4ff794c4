"""Everything that turns a loaded checkpoint into text: precision, the sampling settings, the
prompt (the chat template and cutting to fit), the generation loop's stopping and streaming.

    from engine import load_model, stream_reply
    model, ckpt = load_model("out-sft", precision="")        # "" = the fastest here (pick_precision)
    for piece in stream_reply(model, ckpt, "成语“画蛇添足”是什么意思？", "chat"):
        print(piece, end="")                                 # whole characters, never "\ufffd"

mode is how the text is used: "chat" puts it in the checkpoint's own SFT template (exactly the
text the model was trained on) and the model answers; "generate" continues the text itself.
sample.py, the web app (serving.py), evaluations.py and bench.py all generate through here
(evaluations.py several questions at a time: reply_batch).
"""
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

import checkpoint
import quant
from data.tokenizer import SYSTEM_TEMPLATE, UTF8_STATES, StreamDecoder, Tokenizer, conversation_ids, utf8_scan
from model import GPT, select_device

# The sampling settings: name -> (default, low, high, whole number?). sample.py's flags, the web
# app's sliders and its API, and evaluations.py read their defaults and ranges from this one table.
# temperature 0 is greedy, top_k 0 keeps every token, top_p 0 keeps only the most likely one.
# top_k's ceiling is 65536, the most ids a uint16 token file holds, so no tokenizer this code can
# train on has more: one range for every model (gpt2's 50257 ids, a trained tokenizer's few thousand).
SAMPLING = {"max_new_tokens": (256, 1, 1024, True),
            "temperature": (0.8, 0.0, 2.0, False),
            "top_k": (50, 0, 65536, True),
            "top_p": (0.95, 0.0, 1.0, False),
            "repetition_penalty": (1.1, 1.0, 2.0, False)}
SAMPLING_DEFAULTS = {k: v[0] for k, v in SAMPLING.items()}
MODES = ("chat", "generate")
# Inference precision (--precision): the weights' and activations' dtype while generating; int8 is
# int8 weights with bfloat16 activations (quant.py, CPU only). Training has its own autocast dtype
# (train.py --dtype). "" picks the fastest (pick_precision).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": quant.ACT_DTYPE}
DTYPE_OF = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch's names
# The scripts' old --dtype flag and its values, for the configurator's "renamed" message.
RENAMED_DTYPE = ("precision", {v: k for k, v in DTYPE_OF.items()})
# Room for the answer when a prompt is cut to fit: min(max_new_tokens, block_size // ANSWER_SHARE)
# tokens. A quarter (64 of 256) holds a typical SFT answer, and 3/4 of the context stays for the
# question; a prompt never takes more than block_size - 1, so the first step sees all of it.
ANSWER_SHARE = 4
# With earlier exchanges in the prompt, they stay only while the answer keeps min(max_new_tokens,
# block_size // HISTORY_SHARE) tokens: half the context (64 of 128 in make demo's SFT) holds most
# answers of the default data whole.
HISTORY_SHARE = 2

_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


def sampling_error(p: dict) -> tuple | None:
    """The first setting in p out of SAMPLING's ranges as (key, value, low, high, whole), else None."""
    for key, (_, lo, hi, whole) in SAMPLING.items():
        v = p[key]
        number = not isinstance(v, bool) and isinstance(v, (int, float))
        if not number or not lo <= v <= hi or (whole and v != int(v)):
            return key, v, lo, hi, whole
    return None


def exit_on_bad_flags(config: dict) -> None:
    """A command line's sampling and precision flags: exit with a message naming the first bad one."""
    bad = sampling_error(config)
    if bad:
        key, value, lo, hi, whole = bad
        sys.exit(f"--{key}={value!r}: expected a {'whole ' if whole else ''}number from {lo} to {hi}")
    if config.get("precision", "") not in ("", *PRECISIONS):
        sys.exit(f"--precision={config['precision']!r}: expected one of {', '.join(PRECISIONS)} (or empty: the fastest)")


def pick_precision(device: str, precision: str = "") -> str:
    """The precision to generate in; ValueError for an unknown one or one device cannot run.
    "": on a CPU int8, the fastest measured with and without AVX-512 (README "Precision": 4.3-4.8x
    fp32 and 1.3-2.4x bf16 for the 45M model, perplexity within 0.02% of fp32), else bf16 (decoding is bound
    by reading the weights: half the bytes, about twice fp32's speed, even without native bf16
    dot products); on CUDA GPUs training's choice, bf16 where supported, else fp16; fp32 elsewhere."""
    if precision:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if precision == "int8" and (why := int8_error(device)):
            raise ValueError(f"precision int8: {why} (choices: {', '.join(PRECISIONS)})")
        return precision
    if device.startswith("cuda"):  # training's choice there (select_device): bf16 where supported, else fp16
        return {v: k for k, v in DTYPE_OF.items()}[select_device(device)[1]]
    if device == "cpu":
        return "bf16" if int8_error(device) else "int8"
    return "fp32"


@lru_cache(maxsize=None)
def int8_error(device: str) -> str | None:
    return quant.int8_error(device)


def load_model(path, device: str = "cpu", precision: str = "fp32", lora_base="") -> tuple[GPT, dict]:
    """(model ready to generate, checkpoint dict) from an out_dir or a .pt file (checkpoint.load);
    precision "" picks the fastest for device. A checkpoint saved in int8 (sample.py
    --save_quantized) loads in any precision: its weights are int8's, dequantized for fp32/bf16.
    A LoRA checkpoint comes merged into its base (lora_base: where the base is, if it moved)."""
    precision = pick_precision(device, precision)
    if precision == "int8":
        model, ckpt = checkpoint.load(path, device, lora_base=lora_base)
        return quant.quantize_int8(model), ckpt
    return checkpoint.load(path, device, PRECISIONS[precision], lora_base)


def load_model_or_exit(path, device: str = "", precision: str = "", lora_base="") -> tuple[GPT, dict, str, str]:
    """For a command line: (model, ckpt, device, precision) with "" choices made (select_device,
    pick_precision); a missing or broken checkpoint (or LoRA base) exits with its message."""
    device, _ = select_device(device)
    try:
        precision = pick_precision(device, precision)
        return *load_model(path, device, precision, lora_base), device, precision
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))


class Utf8Constraint:
    """A sampling constraint that keeps generated bytes valid UTF-8.

    A byte-level BPE spells characters it has not merged as 2-3 byte tokens (GPT-2 most Chinese
    ones, a trained tokenizer the rare ones); a small model often follows a lead byte with a
    token that does not continue it, which decodes to "\ufffd". The state says what the text
    still owes (UTF8_STATES); allowed(state) is the boolean mask, over the model's size output
    rows, of the ids that keep the text valid (EOT only at a character boundary; never PAD or
    the padding rows), advance(state, token) the next state."""

    def __init__(self, tok: Tokenizer, size: int):
        self.next = torch.full((len(UTF8_STATES), size), -1, dtype=torch.int8)
        self.next[0, tok.eot_id] = 0
        for t in range(tok.eot_id):  # the ordinary tokens: every id below EOT
            raw = tok.token_bytes(t)
            lead = len(raw) - len(raw.lstrip(_CONTINUATION_BYTES))
            # a token that starts a character fits only state 0; one that starts with k
            # continuation bytes fits only states owing exactly k (or more, if it is all of them)
            for state, (need, _, _) in enumerate(UTF8_STATES):
                if need == lead or (lead == len(raw) and need > lead):
                    after = utf8_scan(raw, state)
                    if after is not None:
                        self.next[state, t] = after
        self.mask = self.next >= 0  # (states, size)

    def allowed(self, state: int) -> torch.Tensor:
        return self.mask[state]

    def advance(self, state: int, token: int) -> int:
        return int(self.next[state, token])


@lru_cache(maxsize=16)  # one per tokenizer (and model size) served: the arena may hold gpt2 and zh models
def utf8_constraint(tok: Tokenizer, size: int) -> Utf8Constraint:
    return Utf8Constraint(tok, size)


def prompt_ids(ckpt: dict, text: str, mode: str, history: tuple = (), system: str = "") -> list:
    """The tokens the model sees: in chat mode the conversation in the checkpoint's own chat template
    (data.tokenizer.conversation_ids: system text if any, the earlier (question, answer) exchanges
    each ending with EOT as in training, then the question's template); else the text itself."""
    tok = checkpoint.tokenizer(ckpt)
    if mode != "chat":
        return tok.encode(text)
    if not checkpoint.can_chat(ckpt):
        raise ValueError("chat mode needs an SFT checkpoint; this one is pretrained and has no question "
                         "template (it only continues text: use mode generate)")
    meta = ckpt["data_meta"]
    return conversation_ids(tok, history, text, system, meta["sft_template"],
                            meta.get("system_template", SYSTEM_TEMPLATE))[0]


@dataclass
class Prompt:
    """A prompt cut to fit the model (fit_prompt)."""
    ids: list        # the tokens the model is given
    text: str        # the part of the user's text in them
    history: tuple   # the earlier exchanges in them, the most recent ones
    chars: int       # the user's text length in characters
    room: int        # tokens kept free for the answer
    block_size: int
    mode: str
    system: str = ""  # the system text in them ("" if none was given, or it did not fit)

    @property
    def shortened(self) -> bool:
        return len(self.text) < self.chars


def fit_prompt(ckpt: dict, text: str, mode: str, block_size: int, max_new_tokens: int,
               history: tuple = (), system: str = "") -> Prompt:
    """The prompt in at most block_size - room tokens, room = min(max_new_tokens, block_size //
    ANSWER_SHARE): the oldest exchanges go first (whole: never a cut answer), then the system
    text, then the text is cut in characters (chat keeps the question's beginning, as the web
    app's character limit does; generate keeps the text's end, which is what gets continued).
    Earlier exchanges are kept only while they leave min(max_new_tokens, block_size //
    HISTORY_SHARE) tokens for the answer: a long conversation must not push the answer past the
    context (the model would then go on from a context cut mid-turn). The template stays whole
    and the kept text is tokenized exactly as training tokenized it (the checkpoint's
    tokenizer). ValueError if not even the template fits."""
    history = tuple(tuple(h) for h in history) if mode == "chat" else ()  # earlier exchanges are a chat's only
    system = system if mode == "chat" else ""
    room = max(1, min(max_new_tokens, block_size // ANSWER_SHARE))
    budget = block_size - room
    history_budget = block_size - max(room, min(max_new_tokens, block_size // HISTORY_SHARE))
    while history and len(prompt_ids(ckpt, text, mode, history, system)) > history_budget:
        history = history[1:]
    if system and len(prompt_ids(ckpt, text, mode, history, system)) > budget:
        system = ""

    def cut(n: int) -> str:
        return text[:n] if mode == "chat" else text[len(text) - n:]

    def fits(n: int) -> list | None:
        ids = prompt_ids(ckpt, cut(n), mode, history, system)
        return ids if len(ids) <= budget else None

    n = len(text)
    if fits(n) is None:
        if fits(0) is None:
            raise ValueError(f"block_size {block_size} leaves no room for the prompt template")
        lo, hi = 0, n  # binary search for the longest cut that fits: fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid)
        n = lo
    return Prompt(fits(n), cut(n), history, len(text), room, block_size, mode, system)


def prompt_stats(prompt: Prompt) -> dict:
    return {"prompt_tokens": len(prompt.ids), "input_chars": prompt.chars, "kept_chars": len(prompt.text)}


def stream_reply(model: GPT, ckpt: dict, text: str, mode: str, max_new_tokens: int = SAMPLING_DEFAULTS["max_new_tokens"],
                 temperature: float = SAMPLING_DEFAULTS["temperature"], top_k: int | None = SAMPLING_DEFAULTS["top_k"],
                 top_p: float | None = SAMPLING_DEFAULTS["top_p"],
                 repetition_penalty: float = SAMPLING_DEFAULTS["repetition_penalty"],
                 generator: torch.Generator | None = None, stats: dict | None = None, utf8_only: bool = True,
                 stop: tuple = (), history: tuple = (), system: str = "", prompt: Prompt | None = None):
    """Yield the reply as text pieces that are whole characters; it ends at EOT, after
    max_new_tokens, or before the first of the stop strings. history: earlier (question, answer)
    exchanges, system: system text (chat mode). The prompt is cut to fit the model (fit_prompt;
    pass prompt= when the caller already fitted it). stats (if given) gets prompt_tokens,
    input_chars and kept_chars at once, then new_tokens, stopped_at_eot, stopped_at_stop (a stop
    string ended it) and seconds."""
    device = next(model.parameters()).device
    if prompt is None:
        prompt = fit_prompt(ckpt, text, mode, model.config.block_size, max_new_tokens, history, system)
    if stats is not None:
        stats.update(prompt_stats(prompt))
    idx = torch.tensor([prompt.ids], dtype=torch.long, device=device)
    tok = checkpoint.tokenizer(ckpt)
    decoder, n, eot, t0 = StreamDecoder(tok), 0, False, time.perf_counter()
    held, stopped = "", False  # held: text not yet shown, it could be the start of a stop string
    keep = max((len(s) for s in stop), default=1) - 1
    for token in model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, eot_id=tok.eot_id,
                                max_token_id=tok.vocab_size, generator=generator,
                                constraint=utf8_constraint(tok, model.config.vocab_size) if utf8_only else None):
        n += 1
        if token == tok.eot_id:
            eot = True
            break
        held += decoder.push(token)
        cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            held, stopped = held[:cut], True
            break
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if not stopped:
        held += decoder.flush()
    if held:
        yield held
    if stats is not None:
        stats.update(new_tokens=n, stopped_at_eot=eot, stopped_at_stop=stopped, seconds=time.perf_counter() - t0)


def reply(model: GPT, ckpt: dict, text: str, mode: str, **kwargs) -> str:
    return "".join(stream_reply(model, ckpt, text, mode, **kwargs))


def reply_batch(model: GPT, ckpt: dict, texts: list, mode: str, generators: list | None = None, utf8_only: bool = True,
                max_new_tokens: int = SAMPLING_DEFAULTS["max_new_tokens"], temperature: float = SAMPLING_DEFAULTS["temperature"],
                top_k: int | None = SAMPLING_DEFAULTS["top_k"], top_p: float | None = SAMPLING_DEFAULTS["top_p"],
                repetition_penalty: float = SAMPLING_DEFAULTS["repetition_penalty"], histories: list | None = None,
                systems: list | None = None) -> list:
    """The replies to several texts generated together (model.generate_batch), as [(text, stats)]:
    each text what reply() gives with the same settings, generators[i], histories[i] and systems[i]
    (in float32; in bfloat16 a batch's matmuls can round differently and a near tie can go the
    other way), each stats what stream_reply's holds, seconds counted from the batch's start to the
    row's last token."""
    tok = checkpoint.tokenizer(ckpt)
    histories, systems = histories or [()] * len(texts), systems or [""] * len(texts)
    prompts = [fit_prompt(ckpt, text, mode, model.config.block_size, max_new_tokens, history, system)
               for text, history, system in zip(texts, histories, systems, strict=True)]
    stats = [prompt_stats(p) | {"new_tokens": 0, "stopped_at_eot": False, "stopped_at_stop": False}
             for p in prompts]
    decoders, pieces, t0 = [StreamDecoder(tok) for _ in texts], [[] for _ in texts], time.perf_counter()
    for step in model.generate_batch([p.ids for p in prompts], max_new_tokens, temperature, top_k, top_p,
                                     repetition_penalty, tok.eot_id, tok.vocab_size, generators=generators,
                                     constraint=utf8_constraint(tok, model.config.vocab_size) if utf8_only else None):
        for row, token in step:
            stats[row]["new_tokens"] += 1
            stats[row]["seconds"] = time.perf_counter() - t0
            if token == tok.eot_id:
                stats[row]["stopped_at_eot"] = True
            else:
                pieces[row].append(decoders[row].push(token))
    return [("".join(p) + d.flush(), s) for p, d, s in zip(pieces, decoders, stats)]
