"""Generate from a MiniGLM checkpoint: a small command line over engine.py.

    python sample.py --out_dir=out-sft --start="成语“画蛇添足”是什么意思？"
    python sample.py --out_dir=out --start="床前明月光" --num_samples=3 --max_new_tokens=128
    python sample.py --out_dir=out-sft --start=FILE:questions.txt --save_path=answers.jsonl
    python sample.py --out_dir=out-sft        # no --start, in a terminal: an interactive chat
    python sample.py --out_dir=out-sft --save_quantized=out-sft-int8   # an int8 copy (4x smaller)
    python sample.py --out_dir=out-cpu-lora --merge_to=out-cpu-lora-merged  # a LoRA run as a whole model

The mode comes from the checkpoint: a pretrained model continues text ("generate"), an SFT model
answers questions ("chat") with exactly the template it was trained on; --mode overrides (chat needs
an SFT checkpoint). A prompt longer than the model's context is cut to fit (engine.fit_prompt: the
template stays whole, the answer keeps its room) and stderr says so. Sampling settings out of
engine.SAMPLING's ranges are refused. --save_path writes the results as JSONL. --precision: "" = the
fastest here (int8 on a CPU; README "Precision"). --save_quantized=PATH writes the model with int8
weights (a folder's ckpt.pt or a .pt file) that every script loads, and exits. A LoRA checkpoint
loads merged into its base (--lora_base=PATH: the base, if it moved); --merge_to=PATH writes it so.
The interactive chat (like ChatGLM's cli_demo): "clear" starts over, "stop" or Ctrl-D quits, Ctrl-C
cuts an answer short. Each question comes after the earlier exchanges (--history_turns: -1 = as many
whole ones as fit the context, the oldest left out first; N = at most the last N; 0 = none).
"""
import sys
from pathlib import Path

import torch

from checkpoint import can_chat, checkpoint_file, mode_of, save_standalone, tokenizer
from configurator import configure
from data.records import write_jsonl_atomic
from engine import MODES, RENAMED_DTYPE, SAMPLING_DEFAULTS, exit_on_bad_flags, fit_prompt, load_model_or_exit, stream_reply

# ----------------------------------------------------------------------------- defaults
out_dir = "out-sft"
start = ""                  # a prompt, or FILE:path with one prompt a line
mode = ""                   # "" = from the checkpoint; "chat" (SFT template) or "generate"
num_samples = 1
max_new_tokens = SAMPLING_DEFAULTS["max_new_tokens"]  # the sampling defaults: engine.SAMPLING
temperature = SAMPLING_DEFAULTS["temperature"]
top_k = SAMPLING_DEFAULTS["top_k"]
top_p = SAMPLING_DEFAULTS["top_p"]
repetition_penalty = SAMPLING_DEFAULTS["repetition_penalty"]
utf8_only = True            # sample only tokens that keep the text valid UTF-8 (no "\ufffd")
stop = ""                   # also stop at these strings ("|" between several), besides EOT
history_turns = -1          # interactive chat: earlier exchanges to include (-1: as many as fit, 0: none)
seed = 1337
device = ""                 # "" = cuda, then mps, then cpu
precision = ""              # fp32, bf16, fp16 or int8; "" = the fastest on this device (engine.pick_precision)
save_path = ""
save_quantized = ""         # write an int8 checkpoint here (a folder or a .pt file) and exit
merge_to = ""               # a LoRA checkpoint: write it merged into its base here and exit
lora_base = ""              # a LoRA checkpoint's base (ckpt.pt or out_dir), if it is no longer where it was
# -----------------------------------------------------------------------------
RENAMED_KEYS = {"dtype": RENAMED_DTYPE}  # --dtype is training's autocast type; generation has --precision

if __name__ == "__main__":
    config = configure(globals())
    if mode not in ("", *MODES):
        sys.exit(f"--mode={mode!r}: expected {' or '.join(MODES)}")
    exit_on_bad_flags(config)
    if num_samples < 1:
        sys.exit(f"--num_samples={num_samples}: expected a whole number >= 1")
    if history_turns < -1:
        sys.exit(f"--history_turns={history_turns}: expected -1 (as many as fit), 0 (none) or a whole number N")
    if save_quantized or merge_to:  # one standalone copy: int8 weights, or a LoRA run merged (in float32)
        target = save_quantized or merge_to
        if save_quantized and merge_to or precision not in ("", "int8" if save_quantized else "fp32") or device not in ("", "cpu"):
            sys.exit("--save_quantized writes int8 weights, --merge_to float32, one of them, on the CPU: drop --precision/--device")
        if checkpoint_file(target).exists():  # never replaces a checkpoint (a LoRA run's base, say)
            sys.exit(f"{checkpoint_file(target)} already holds a checkpoint: write the copy elsewhere (or delete it first)")
        model, ckpt, _, _ = load_model_or_exit(out_dir, "cpu", "int8" if save_quantized else "fp32", lora_base)
        if merge_to and "lora" not in ckpt:
            sys.exit(f"--merge_to: {out_dir} is not a LoRA checkpoint (train.py --lora_rank): it needs no base already")
        size = [p.stat().st_size / 2**20 for p in (checkpoint_file(out_dir), save_standalone(ckpt, model, target, bool(save_quantized)))]
        print(f"wrote {target} ({size[0]:.1f} -> {size[1]:.1f} MB); python sample.py --out_dir={target} loads it", file=sys.stderr)
        sys.exit(0)
    model, ckpt, device, precision = load_model_or_exit(out_dir, device, precision, lora_base)
    mode = mode or mode_of(ckpt)
    if mode == "chat" and not can_chat(ckpt):
        sys.exit(f"{out_dir}: --mode=chat needs an SFT checkpoint (trained on question/answer pairs); this one "
                 "is pretrained and only continues text: drop --mode, or use --mode=generate")
    stops = tuple(s for s in stop.split("|") if s)
    gen = torch.Generator(device=device).manual_seed(seed)
    print(f"[{out_dir}: mode {mode}, {model.num_params() / 1e6:.1f}M parameters, tokenizer {tokenizer(ckpt).describe()}, "
          f"{device}, {precision}]", file=sys.stderr)

    def answer(prompt: str, history: tuple = ()) -> dict:
        """Stream one reply to the terminal; the record saved with --save_path."""
        stats, pieces = {}, []
        fit = fit_prompt(ckpt, prompt, mode, model.config.block_size, max_new_tokens, history)
        cuts = [f"kept the {'first' if mode == 'chat' else 'last'} {len(fit.text)} of {fit.chars} characters"] * fit.shortened
        cuts += [f"left out the {len(history) - len(fit.history)} oldest exchanges"] * (len(fit.history) < len(history))
        if cuts:
            print(f"[input shortened to fit the model's {fit.block_size}-token context with {fit.room} tokens for the "
                  f"answer: {', '.join(cuts)}]", file=sys.stderr, flush=True)
        try:
            for piece in stream_reply(model, ckpt, prompt, mode, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, generator=gen, stats=stats,
                                      utf8_only=utf8_only, stop=stops, prompt=fit):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stats.setdefault("new_tokens", None)
            print("\n[已中断]", end="", flush=True)
        if stats.get("new_tokens") is not None:
            seconds = max(stats["seconds"], 1e-9)  # characters/s compares models with different tokenizers
            print(f"\n[{stats['new_tokens']} tokens, {stats['new_tokens'] / seconds:.1f} tokens/s, "
                  f"{len(''.join(pieces)) / seconds:.1f} characters/s{'' if stats['stopped_at_eot'] else ', no EOT'}]",
                  file=sys.stderr)
        return {"prompt": prompt, "output": "".join(pieces), **stats}

    results = []
    if start:
        prompts = [start]
        if start.startswith("FILE:"):
            try:
                prompts = [line.strip() for line in Path(start[5:]).read_text(encoding="utf-8").splitlines() if line.strip()]
            except OSError as e:
                sys.exit(f"--start={start}: cannot read the file ({e.strerror})")
        for prompt in prompts:
            for k in range(num_samples):
                print(f"\n>>> {prompt}\n" if mode == "chat" else f"\n{prompt}", end="", flush=True)
                results.append(answer(prompt) | {"sample": k})
    elif sys.stdin.isatty():
        print("欢迎使用 MiniGLM！输入问题后回车；clear 清空对话历史，stop 或 Ctrl-D 退出，Ctrl-C 打断回答。"
              + ("" if mode == "chat" else "（续写模式：模型接着你输入的文字往下写）"))
        history = []
        while True:
            try:
                text = input("\n用户：").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if text == "stop":
                break
            if text == "clear":
                history = []
                print("（对话历史已清空）")
                continue
            if not text:
                continue
            print("MiniGLM：", end="", flush=True)
            results.append(record := answer(text, tuple(history[-history_turns:] if history_turns > 0 else history)))
            if record["output"] and history_turns and mode == "chat":
                history.append((text, record["output"]))
    else:
        sys.exit("give a prompt with --start=\"...\" or --start=FILE:path (or run in a terminal to chat)")
    if save_path:
        write_jsonl_atomic(save_path, results)
        print(f"wrote {len(results)} results to {save_path}", file=sys.stderr)
