"""Generate from a MiniGLM checkpoint; also the loading and prompting code every later script uses.

    python sample.py --out_dir=out-sft --start="成语“画蛇添足”是什么意思？"
    python sample.py --out_dir=out --start="床前明月光" --num_samples=3 --max_new_tokens=128
    python sample.py --out_dir=out-sft --start=FILE:questions.txt --save_path=answers.jsonl
    python sample.py --out_dir=out-sft        # no --start, in a terminal: an interactive chat

The mode comes from the checkpoint: a pretrained model continues text ("generate"), an SFT model
answers questions ("chat") with exactly the template it was trained on; --mode overrides.
Tokens stream to the terminal as they come. --save_path writes the results as JSONL.
The interactive chat (like ChatGLM's cli_demo): type a question, the answer streams; "clear"
starts over, "stop" or Ctrl-D quits, Ctrl-C cuts an answer short. It is single-turn by default,
as the SFT data is; --history_turns=N puts the last N exchanges before the question.
"""
import json
import pickle
import sys
import time
from pathlib import Path

import torch

from data.tokenizer import EOT_ID, VOCAB_SIZE, StreamDecoder, get_tokenizer, tokenizer_meta, utf8_constraint
from model import GPT, GPTConfig, select_device

# ----------------------------------------------------------------------------- defaults
out_dir = "out-sft"
start = ""                  # a prompt, or FILE:path with one prompt a line
mode = ""                   # "" = from the checkpoint; "chat" (SFT template) or "generate"
num_samples = 1
max_new_tokens = 256
temperature = 0.8
top_k = 50
top_p = 0.95
repetition_penalty = 1.1
utf8_only = True            # sample only tokens that keep the text valid UTF-8 (no "\ufffd")
stop = ""                   # also stop at these strings ("|" between several), besides EOT
history_turns = 0           # interactive chat: earlier exchanges to include (0: single-turn)
seed = 1337
device = ""                 # "" = cuda, then mps, then cpu
save_path = ""
# -----------------------------------------------------------------------------


def load_checkpoint(path, device: str = "cpu") -> tuple[GPT, dict]:
    """(model in eval mode, checkpoint dict) from an out_dir or a ckpt.pt; clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint here; train one first "
                                "(python train.py config/train_cpu.py) or pass the right --out_dir")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{path}: not a readable MiniGLM checkpoint ({e})") from e
    missing = [k for k in ("model", "model_args", "data_meta", "config") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a MiniGLM checkpoint (missing {', '.join(missing)})")
    ours = tokenizer_meta()
    for key in ("tokenizer", "vocab_size", "eot_id"):
        if ckpt["data_meta"].get(key) != ours[key]:
            raise ValueError(f"{path}: trained with {key}={ckpt['data_meta'].get(key)!r}, "
                             f"this code uses {key}={ours[key]!r}")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model.to(device).eval(), ckpt


def checkpoint_mode(ckpt: dict) -> str:
    return "chat" if ckpt["data_meta"].get("kind") == "sft" else "generate"


def render_prompt(ckpt: dict, text: str, mode: str, history: tuple = ()) -> str:
    """The text the model sees: the checkpoint's own SFT template in chat mode (after the given
    earlier (question, answer) exchanges, one a line), else the text itself."""
    if mode != "chat":
        return text
    template = ckpt["data_meta"]["sft_template"]
    return "".join(template.format(question=q) + a + "\n" for q, a in history) + template.format(question=text)


def stream_reply(model: GPT, ckpt: dict, text: str, mode: str, max_new_tokens: int = 256,
                 temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95,
                 repetition_penalty: float = 1.1, generator: torch.Generator | None = None,
                 stats: dict | None = None, utf8_only: bool = True, stop: tuple = (), history: tuple = ()):
    """Yield the reply as text pieces that are whole characters; it ends at EOT, after
    max_new_tokens, or before the first of the stop strings. stats (if given) gets new_tokens,
    stopped_at_eot and seconds."""
    enc = get_tokenizer()
    device = next(model.parameters()).device
    ids = enc.encode_ordinary(render_prompt(ckpt, text, mode, history))
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    decoder, n, eot, t0 = StreamDecoder(), 0, False, time.perf_counter()
    held, stopped = "", False  # held: text not yet shown, it could be the start of a stop string
    keep = max((len(s) for s in stop), default=1) - 1
    for token in model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, eot_id=EOT_ID,
                                max_token_id=VOCAB_SIZE, generator=generator,
                                constraint=utf8_constraint() if utf8_only else None):
        n += 1
        if token == EOT_ID:
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
        stats.update(new_tokens=n, stopped_at_eot=eot, seconds=time.perf_counter() - t0)


def reply(model: GPT, ckpt: dict, text: str, mode: str, **kwargs) -> str:
    return "".join(stream_reply(model, ckpt, text, mode, **kwargs))


if __name__ == "__main__":
    exec(open(Path(__file__).resolve().parent / "configurator.py", encoding="utf-8").read())
    if mode not in ("", "chat", "generate"):
        sys.exit(f"--mode={mode!r}: expected chat or generate")
    device, _ = select_device(device)
    try:
        model, ckpt = load_checkpoint(out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    mode = mode or checkpoint_mode(ckpt)
    stops = tuple(s for s in stop.split("|") if s)
    gen = torch.Generator(device=device).manual_seed(seed)
    print(f"[{out_dir}: mode {mode}, {model.num_params() / 1e6:.1f}M parameters, {device}]", file=sys.stderr)

    def answer(prompt: str, history: tuple = ()) -> dict:
        """Stream one reply to the terminal; the record saved with --save_path."""
        stats, pieces = {}, []
        try:
            for piece in stream_reply(model, ckpt, prompt, mode, max_new_tokens, temperature, top_k, top_p,
                                      repetition_penalty, gen, stats, utf8_only, stops, history):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stats.setdefault("new_tokens", None)
            print("\n[已中断]", end="", flush=True)
        if stats.get("new_tokens") is not None:
            print(f"\n[{stats['new_tokens']} tokens, {stats['new_tokens'] / max(stats['seconds'], 1e-9):.1f} "
                  f"tokens/s{'' if stats['stopped_at_eot'] else ', no EOT'}]", file=sys.stderr)
        return {"prompt": prompt, "output": "".join(pieces), **stats}

    results = []
    if start:
        if start.startswith("FILE:"):
            try:
                lines = Path(start[5:]).read_text(encoding="utf-8").splitlines()
            except OSError as e:
                sys.exit(f"--start={start}: cannot read the file ({e.strerror})")
            prompts = [line.strip() for line in lines if line.strip()]
        else:
            prompts = [start]
        for prompt in prompts:
            for k in range(num_samples):
                print(f"\n>>> {prompt}" if mode == "chat" else f"\n{prompt}", end="\n" if mode == "chat" else "",
                      flush=True)
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
            record = answer(text, tuple(history[-history_turns:]) if history_turns else ())
            history.append((text, record["output"]))
            results.append(record)
    else:
        sys.exit("give a prompt with --start=\"...\" or --start=FILE:path (or run in a terminal to chat)")
    if save_path:
        with open(save_path, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(results)} results to {save_path}", file=sys.stderr)
