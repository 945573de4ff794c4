"""How bench.py measures: process-tree memory, timed subprocesses, a plain training loop, nanoGPT's
generate, held-out NLL per document, the demo model's speed at several vocabulary sizes, a
training run's figures and evaluations.py's.
Each returns numbers; bench.py decides what they are compared against and prints them.
"""
import json
import re
import runpy
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import torch

from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc (Linux)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024


def run_sampled(cmd: list) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd, sampling its process tree's memory; returns (result, seconds, peak MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds, peak[0]


def plain_loop_positions_per_s(model, steps: int, batch: int, block: int) -> float:
    """nanoGPT's inner loop: random batch, forward, backward, clip, AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    x, y = torch.randint(0, 256, (2, batch, block))  # byte tokens: ids every tokenizer has
    for i in range(steps + 2):  # two warm-up steps (compilation, allocator)
        if i == 2:
            t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * block / (time.perf_counter() - t0)


def nanogpt_generate(model, idx, max_new_tokens: int):
    """nanoGPT's generate, greedy: the whole (cropped) sequence through the model every step."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def documents(ids: list, eot: int) -> list:
    """The documents of a token stream: the runs of ids before each EOT (a tail without one is left out)."""
    docs, cur = [], []
    for t in ids:
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def document_nll(model, docs: list, block: int, eot: int) -> float:
    """Mean NLL per token over documents, each scored alone after an EOT (every layout's model has
    seen a document start after an EOT; none is favoured by position 0), its tokens + EOT."""
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            seq = ([eot] + doc + [eot])[:block + 1]
            x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
            _, loss = model(x, y)
            total += loss.item() * y.numel()
            count += y.numel()
    return total / count


def demo_model_speeds(vocabs: dict, rounds: int = 5) -> dict:
    """name -> (training positions/s, decoding tokens/s) of config/train_cpu.py's model (random
    weights, fp32, batch and block as configured) with each vocabulary size: rounds of two
    training steps and of 128 new tokens, the models taking turns so that a busy moment slows
    them alike; medians over the rounds after a warm-up round."""

    cfg = runpy.run_path(str(ROOT / "config/train_cpu.py"))
    shape = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd")}
    batch, block = cfg["batch_size"], 256
    torch.manual_seed(0)
    models = {name: GPT(GPTConfig(vocab_size=v, block_size=block, **shape)) for name, v in vocabs.items()}
    runs = {name: [] for name in models}
    for r in range(rounds + 1):
        for name, model in models.items():
            train = plain_loop_positions_per_s(model.train(), 2, batch, block)
            model.eval()
            t0 = time.perf_counter()
            n = len(list(model.generate(torch.randint(0, 256, (1, 16)), 128, temperature=0)))
            if r:
                runs[name].append((train, n / (time.perf_counter() - t0)))
    return {name: tuple(statistics.median(x[i] for x in rows) for i in range(2)) for name, rows in runs.items()}


def cpu_description() -> str:
    """The CPU and the kernels torch runs on it (ATEN_CPU_CAPABILITY=avx2 makes an AVX-512
    machine run the AVX2 ones): what every speed figure depends on."""
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return (f"{name}, {torch.get_num_threads()} threads, torch kernels {torch.backends.cpu.get_cpu_capability()}"
            f"{', native bf16' if native_bf16 else ''}")


def decode_speed(model, ckpt: dict, prompt: str, new: int, rounds: int = 3) -> tuple[float, float, float]:
    """(first-token seconds, tokens/s, characters/s) of batch-1 decoding as the app does it (its
    sampling defaults, the UTF-8 constraint, a fixed seed), medians over rounds after a warm-up:
    first token = the prompt's forward pass and one token; then `new` tokens (EOT not stopping
    them), characters = their decoded text's."""
    from engine import SAMPLING_DEFAULTS, utf8_constraint
    from checkpoint import tokenizer
    tok = tokenizer(ckpt)
    ids = tok.encode(prompt)
    s = {k: SAMPLING_DEFAULTS[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    constraint = utf8_constraint(tok, model.config.vocab_size)
    runs = []
    for r in range(rounds + 1):
        gen = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        next(model.generate(torch.tensor([ids]), 1, **s, max_token_id=tok.vocab_size, generator=gen,
                            constraint=constraint))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = list(model.generate(torch.tensor([ids]), new, **s, max_token_id=tok.vocab_size, generator=gen,
                                     constraint=constraint))
        seconds = time.perf_counter() - t0
        if r:
            runs.append((first, len(tokens) / seconds, len(tok.decode([t for t in tokens if t < tok.eot_id])) / seconds))
    return tuple(statistics.median(x[i] for x in runs) for i in range(3))


RSS_WRAPPER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("VmRSS", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")), file=sys.stderr)
"""


def serving_rss_mb(python: str, out_dir, precision: str) -> float:
    """Resident memory (MB) of a fresh sample.py process after it loaded out_dir in precision and
    answered one short prompt."""
    cmd = [python, "-c", RSS_WRAPPER, "sample.py", f"--out_dir={out_dir}", f"--precision={precision}",
           "--start=床前明月光", "--max_new_tokens=8", "--device=cpu"]
    err = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stderr
    return int(err.rsplit("VmRSS", 1)[1].split()[0]) / 1024


def api_reply(client, *args, tick: float = 0.005) -> tuple[float, float, dict]:
    """(seconds to the first text, seconds to the whole reply, its stats) of one call of the app's
    /generate with args, streamed. The updates are looked at every tick seconds (job.outputs()):
    gradio_client's own Job iterator sleeps 1 ms at a time holding the lock its reader thread needs
    to add an update, and with the app's two threads busy on both cores updates reached it up to a
    second late. Its reader itself looks for messages every 50 ms: the first text counts that wait."""
    t0, first = time.perf_counter(), None
    job = client.submit(*args, api_name="/generate")
    while not wait([job.future], timeout=tick).done:
        if first is None and any(text for text, _ in job.outputs()):
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    _, stats = job.result()
    return total if first is None else first, total, stats


def sample_py_speed(model_dir: Path, question: str, new: int, precision: str, runs: int = 1) -> tuple[float, str]:
    """(sample.py's own tokens/s, the median of runs answers after a warm-up one; its precision)."""
    out = subprocess.run([sys.executable, "sample.py", f"--out_dir={model_dir}", f"--start={question}",
                          f"--max_new_tokens={new}", f"--precision={precision}", f"--num_samples={runs + 1}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stderr
    _, *speeds = (float(s) for s in re.findall(r"\[\d+ tokens, ([\d.]+) tokens/s", out))
    return statistics.median(speeds), re.search(r", (\w+)\]", out).group(1)


def openai_reply(client, model: str, question: str, new: int, seed: int, **sampling) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the whole reply, its new tokens) of one streamed call of
    the app's /v1/chat/completions with the openai client (usage asked for in the stream)."""
    t0, first, tokens = time.perf_counter(), None, 0
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=new, seed=seed, stream=True, extra_body=sampling,
                                                stream_options={"include_usage": True}):  # top_k: extra_body
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    total = time.perf_counter() - t0
    return total if first is None else first, total, tokens


def random_sft_checkpoint(out_dir: Path) -> None:
    """A 45M checkpoint with random weights that the app and sample.py take for an SFT model."""
    import dataclasses

    import torch

    import checkpoint
    from data.tokenizer import SFT_TEMPLATE, load_tokenizer
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256))
    meta = {"tokenizer": load_tokenizer("gpt2").meta(), "kind": "sft", "block_size": 256, "sft_template": SFT_TEMPLATE}
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out_dir, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                              "data_meta": meta, "config": {}}, best=True)


def evaluate(out_dir, *flags) -> dict:
    """evaluations.py on out_dir with make demo's settings for its kind (a pretrained model: 100
    documents, 64 new tokens; SFT: 200 questions), none of them seen in training; its eval.json."""
    import checkpoint
    pre = checkpoint.mode_of(checkpoint.read(out_dir, mmap=True)) == "generate"
    extra = ["--max_samples=100", "--max_new_tokens=64"] if pre else ["--max_samples=200"]
    subprocess.run([sys.executable, "evaluations.py", f"--out_dir={out_dir}", "--seen_samples=0", *extra, *flags],
                   cwd=ROOT, capture_output=True, check=True)
    return json.loads((Path(out_dir) / "eval.json").read_text(encoding="utf-8"))


def training_run(out_dir, *args) -> dict:
    """train.py *args --out_dir=out_dir, timed and sampled: its ms/step (the mean of the logged
    intervals after the first, which warms up), the peak memory of its process, the parameters it
    trained, the best val loss and the size of its ckpt.pt."""
    import checkpoint
    proc, _, peak = run_sampled([sys.executable, "train.py", *args, f"--out_dir={out_dir}"])
    steps = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_iter"] for r in steps if r["split"] == "train"][1:]
    ckpt = checkpoint.read(out_dir, mmap=True)
    return {"ms_per_step": statistics.mean(ms), "peak_rss_mb": peak, "best_val_loss": ckpt["best_val_loss"],
            "trainable_params": int(re.search(r"parameters, ([\d,]+) trained", proc.stdout).group(1).replace(",", "")),
            "checkpoint_mb": checkpoint.checkpoint_file(out_dir).stat().st_size / 2**20}
