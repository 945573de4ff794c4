"""MiniGLM's speed and memory figures: one JSON object a line, {"metric", "value", "unit"}; every
metric's name, unit and direction (higher or lower is better) is listed in metrics.BENCH.

    python bench.py                  # all groups but packing (builds the default corpus first if missing)
    python bench.py --only=prepare   # one group

Groups:
  prepare  prepare.py on the whole default corpus: tokens/s, wall time and the peak memory of
           its whole process tree (parent + workers, sampled from /proc), and its speedup over
           the same run with --num_workers=1; then
           data/bench_prepare.py: the pool's speedup over single-threaded encode_ordinary on the
           same text, and this machine's own 2-process ceiling, measured in the same run.
  train    the course's 45M model, batch 8 x 256, fp32, CPU: train.py's own loop (a subprocess,
           its logged positions/s, and its tokens/s that count only targets whose loss counts)
           against a plain nanoGPT-style loop on the same model, eager and under torch.compile,
           in the same run (positions against positions: the same work).
  generate batch 1, 45M model: KV-cache decoding (model.generate) against the same generate with
           use_cache=False (the same cropping rule: the fair baseline), and against nanoGPT's
           generate, which runs the whole sequence (its last block_size tokens) through the model
           every step (its block-overflow rule differs); 256 and 512 new tokens.
  ui       the web app and sample.py on a 45M SFT checkpoint with random weights, batch 1, 256
           new tokens, default sampling (engine.SAMPLING_DEFAULTS), CPU:
           sample_gradio.py in a subprocess called through its API (/generate, gradio_client):
           time to the first streamed text and tokens/s end to end, median of 5 after a warm-up,
           against the same app sending an update per piece (--stream_every=0), called in turn;
           sample.py's own tokens/s in the default precision and in fp32, in the same run.
  tokenizer data/train_tokenizer.py on the default corpus at each of tokenizer_vocabs (wall time),
           then held-out tokens per character and single-thread encoding characters/s of GPT-2's
           tokenizer and of each trained one, on prepare.py's val documents (which the trained
           tokenizers never saw); and config/train_cpu.py's model with each one's vocabulary
           (random weights, fp32): training and KV-cache decoding speed in characters of text
           per second (positions or tokens per second x held-out characters per token), the
           models taking turns in one process so that a busy moment slows them alike.
  packing  (only with --only=packing; about 15 minutes on 2 cores) the packing-layout question:
           the CPU model of config/train_cpu.py trained for packing_iters steps on stream, aligned
           and packed data (equal compute: same steps, batch and block), then scored on the same
           held-out documents, identically for every layout: mean NLL per token of each document
           and its closing EOT, each scored alone after an EOT.
Figures are measured on the machine that runs this; compare ratios from one run, not seconds
across machines. --corpus is relative to the current directory.
"""
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from configurator import configure
from measure import (
    demo_model_speeds,
    document_nll,
    nanogpt_generate,
    plain_loop_positions_per_s,
    run_sampled,
)
from metrics import BENCH

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- defaults
only = ""                                  # a group name, or "" for all but packing
packing_iters = 150
packing_docs = 400                         # held-out documents scored per packing layout
corpus = "data/raw/pretrain.jsonl"
tokenizer_vocabs = "4096,8192,16384"       # the tokenizer group's vocabulary sizes
# -----------------------------------------------------------------------------
RENAMED_KEYS = {"modes_iters": "packing_iters", "modes_docs": "packing_docs"}
DEFAULT_CORPUS = ROOT / "data/raw/pretrain.jsonl"  # what data/fetch_data.py builds


def metric(name: str, value: float, note: str = "", **fields) -> None:
    """Print one figure of metrics.BENCH: name is its row ({fields} filled in), the unit comes from
    the row and note (what was measured, how) follows it."""
    if name not in BENCH:
        raise ValueError(f"metric {name!r} is not in metrics.BENCH: add it there (unit, direction, description)")
    m = BENCH[name]
    print(json.dumps({"metric": name.format(**fields), "value": round(value, m.digits),
                      "unit": f"{m.unit} {note}" if note else m.unit}), flush=True)


def ensure_corpus() -> None:
    """The default corpus (data/fetch_data.py), the zh tokenizer trained on it and its prepared
    blocks with each tokenizer, built if missing."""
    if not Path(corpus).exists():
        if Path(corpus).resolve() != DEFAULT_CORPUS:
            sys.exit(f"--corpus={corpus}: not found in {Path.cwd()}")
        subprocess.run([sys.executable, "data/fetch_data.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not (ROOT / "data/tokenizer/zh.tiktoken").exists():
        subprocess.run([sys.executable, "data/train_tokenizer.py"], cwd=ROOT, check=True, capture_output=True)
    if not (ROOT / "data/processed_pretrain/meta.json").exists():
        subprocess.run([sys.executable, "data/prepare.py"], cwd=ROOT, check=True, capture_output=True)
    if not (ROOT / "data/processed_pretrain_gpt2/meta.json").exists():  # config/train_config.py's (the train group)
        subprocess.run([sys.executable, "data/prepare.py", "--tokenizer=gpt2", "--out_dir=data/processed_pretrain_gpt2"],
                       cwd=ROOT, check=True, capture_output=True)


def bench_prepare() -> None:
    ensure_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "data/prepare.py", f"--input={Path(corpus).resolve()}", f"--out_dir={tmp}"]
        _, seconds, peak = run_sampled(cmd)
        meta = json.loads((Path(tmp) / "meta.json").read_text(encoding="utf-8"))
        _, seconds_one, _ = run_sampled(cmd + ["--num_workers=1"])
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    metric("prepare_tokens_per_s", tokens / seconds, f"({tokens:,} tokens, packing {meta['packing']})")
    metric("prepare_seconds", seconds)
    metric("prepare_peak_rss_mb", peak, "(parent + workers)")
    metric("prepare_workers_speedup", seconds_one / seconds, "(default workers vs --num_workers=1)")
    result = subprocess.run([sys.executable, "data/bench_prepare.py", f"--input={Path(corpus).resolve()}"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():  # its own lines, held to the same table
        if json.loads(line)["metric"] not in BENCH:
            sys.exit(f"data/bench_prepare.py printed {line}: a metric not in metrics.BENCH")
        print(line, flush=True)


def bench_train() -> None:
    import torch

    from model import GPT, GPTConfig
    steps, batch, block = 6, 8, 256
    ensure_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "train.py", "config/train_config.py", f"--out_dir={tmp}",
                        f"--batch_size={batch}", "--gradient_accumulation_steps=1", f"--max_iters={steps + 2}",
                        "--eval_interval=100000", "--eval_iters=1", "--log_interval=2", "--compile=False",
                        "--device=cpu", "--dtype=float32"], cwd=ROOT, check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "train"][1:]  # the first interval warms up
    ours, counted = (sum(r[k] for r in logged) / len(logged) for k in ("positions_per_s", "tokens_per_s"))
    torch.manual_seed(0)
    plain = plain_loop_positions_per_s(GPT(GPTConfig(block_size=block)), steps, batch, block)
    compiled = plain_loop_positions_per_s(torch.compile(GPT(GPTConfig(block_size=block))), steps, batch, block)
    metric("train_positions_per_s", ours, "(train.py, 45M, 8x256, fp32, CPU: every position computed)")
    metric("train_tokens_per_s", counted, "(the same run: targets whose loss counts, padding excluded)")
    metric("train_plain_loop_positions_per_s", plain, "(nanoGPT-style loop, same model, no padding)")
    metric("train_compiled_loop_positions_per_s", compiled, "(same loop, torch.compile)")
    metric("train_vs_plain_loop", ours / plain, "(positions/s)")


def bench_generate() -> None:
    import torch

    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256)).eval()
    prompt = torch.randint(0, 256, (1, 16))
    list(model.generate(prompt, 8, temperature=0))  # warm-up
    for new in (256, 512):
        rates = {}
        for name, use_cache in (("kv", True), ("nocache", False)):  # same model, same cropping rule
            t0 = time.perf_counter()
            n = len(list(model.generate(prompt, new, temperature=0, use_cache=use_cache)))
            rates[name] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        rates["nanogpt"] = (nanogpt_generate(model, prompt, new).size(1) - prompt.size(1)) / (time.perf_counter() - t0)
        metric("generate_tokens_per_s_kv_{new}", rates["kv"], "(batch 1, 45M, fp32, CPU, greedy)", new=new)
        metric("generate_tokens_per_s_nocache_{new}", rates["nocache"],
               "(the same generate with use_cache=False: same cropping rule)", new=new)
        metric("generate_tokens_per_s_nanogpt_{new}", rates["nanogpt"],
               "(nanoGPT's generate: whole last block every step)", new=new)
        metric("generate_kv_speedup_{new}", rates["kv"] / rates["nocache"], "(vs use_cache=False)", new=new)
        metric("generate_kv_speedup_vs_nanogpt_{new}", rates["kv"] / rates["nanogpt"], new=new)


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


def bench_ui(reps: int = 5) -> None:
    import statistics

    from gradio_client import Client

    from engine import SAMPLING_DEFAULTS
    from serving import start_app
    question, new = "成语“画蛇添足”是什么意思？", 256
    sampling = [SAMPLING_DEFAULTS[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")]  # /generate's order
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "m"
        random_sft_checkpoint(model_dir)
        # the app as shipped, and one that sends an update per piece, called in turn in the same run
        apps = {name: start_app(Path(tmp) / f"app{name}.log", f"--models={model_dir}",
                                f"--votes_path={tmp}/votes.jsonl", *extra)
                for name, extra in (("", ()), ("_every_piece", ("--stream_every=0",)))}
        clients = {name: Client(url, verbose=False, download_files=False, analytics_enabled=False)
                   for name, (_, url) in apps.items()}
        runs = {name: [] for name in apps}
        try:
            for client in clients.values():
                client.predict(question, "", 8, api_name="/generate")  # warm-up
            for seed in range(reps):
                for name, client in clients.items():
                    t0, first = time.perf_counter(), None
                    for text, stats in client.submit(question, "", new, *sampling, "", seed,
                                                     api_name="/generate"):
                        if text and first is None:
                            first = time.perf_counter() - t0
                    total = time.perf_counter() - t0
                    runs[name].append((first, stats["new_tokens"] / total, total, stats["new_tokens"]))
        finally:
            for app, _ in apps.values():
                app.terminate()
                app.wait(timeout=30)
        for name, rows in runs.items():
            first, tps, total, tokens = (statistics.median(r[i] for r in rows) for i in range(4))
            unit = f"(API, batch 1, 45M, CPU, median of {reps}, {tokens:.0f} new tokens)"
            if not name:
                metric("ui_first_token_s", first, unit)
            metric("ui_tokens_per_s{variant}", tps, unit + (", --stream_every=0" if name else ""), variant=name)
            metric("ui_reply_s{variant}", total, f"for the whole reply {unit}" + (", --stream_every=0" if name else ""),
                   variant=name)
        for precision in ("", "fp32"):
            out = subprocess.run([sys.executable, "sample.py", f"--out_dir={model_dir}", f"--start={question}",
                                  f"--max_new_tokens={new}", f"--precision={precision}"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stderr
            n, speed = re.search(r"\[(\d+) tokens, ([\d.]+) tokens/s", out).groups()
            label = re.search(r", (\w+)\]", out).group(1)
            metric("cli_tokens_per_s{variant}", float(speed), f"(sample.py, {label}, {n} new tokens, batch 1, 45M, CPU)",
                   variant=f"_{precision}" if precision else "")


def bench_packing() -> None:
    import numpy as np
    ensure_corpus()
    from checkpoint import load
    from data.tokenizer import tokenizer_of
    layouts = ("stream", "aligned", "packed")
    with tempfile.TemporaryDirectory() as tmp:
        for packing in layouts:
            subprocess.run([sys.executable, "data/prepare.py", f"--input={Path(corpus).resolve()}",
                            f"--out_dir={tmp}/{packing}", f"--packing={packing}"], cwd=ROOT, check=True,
                           capture_output=True)
        val = np.fromfile(f"{tmp}/stream/val.bin", dtype=np.uint16).tolist()
        eot = tokenizer_of(json.loads(Path(f"{tmp}/stream/meta.json").read_text(encoding="utf-8"))).eot_id
        docs, cur = [], []
        for t in val:
            if t == eot:
                docs.append(cur)
                cur = []
            else:
                cur.append(t)
        docs = docs[:packing_docs]
        for packing in layouts:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "train.py", "config/train_cpu.py", f"--data_dir={tmp}/{packing}",
                            f"--out_dir={tmp}/out-{packing}", f"--max_iters={packing_iters}",
                            f"--lr_decay_iters={packing_iters}", f"--eval_interval={packing_iters}",
                            "--eval_iters=5"], cwd=ROOT, check=True, capture_output=True)
            model, ckpt = load(f"{tmp}/out-{packing}")
            nll = document_nll(model, docs, ckpt["model_args"]["block_size"], eot)
            metric("packing_{packing}_heldout_nll", nll, f"({len(docs)} held-out documents, "
                   f"{packing_iters} steps, {time.perf_counter() - t0:.0f}s)", packing=packing)


def bench_tokenizer() -> None:
    from data.encode import cleaned_texts
    from data.records import Report, split_hash
    from data.tokenizer import load_tokenizer
    ensure_corpus()
    held = [t for t in cleaned_texts([Path(corpus)], Report(max_shown=0)) if split_hash(t) < 0.01]  # prepare's val
    chars = sum(map(len, held))
    toks = {"gpt2": load_tokenizer("gpt2")}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in [int(v) for v in tokenizer_vocabs.split(",") if v]:
            out = Path(tmp) / f"zh{vocab}.tiktoken"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "data/train_tokenizer.py", f"--input={Path(corpus).resolve()}",
                            f"--out_path={out}", f"--vocab_size={vocab}"], cwd=ROOT, check=True, capture_output=True)
            metric("tokenizer_train_seconds_{vocab}", time.perf_counter() - t0, "(the whole default corpus but val)",
                   vocab=vocab)
            toks[f"zh{vocab}"] = load_tokenizer(str(out))
    chars_per_token = {}
    for name, tok in toks.items():
        t0 = time.perf_counter()
        tokens = sum(len(ids) for ids in tok.enc.encode_ordinary_batch(held, num_threads=1))
        seconds = time.perf_counter() - t0
        chars_per_token[name] = chars / tokens
        metric("tokens_per_char_{tokenizer}", tokens / chars, f"({len(held):,} held-out documents, {chars:,} characters)",
               tokenizer=name)
        metric("encode_chars_per_s_{tokenizer}", chars / seconds, "(one thread)", tokenizer=name)
    speeds = demo_model_speeds({name: tok.model_vocab_size for name, tok in toks.items()})
    for name, (train_positions, decode_tokens) in speeds.items():
        shape = f"(config/train_cpu.py's model, {toks[name].model_vocab_size} vocabulary rows: "
        metric("train_chars_per_s_{tokenizer}", train_positions * chars_per_token[name],
               shape + f"{train_positions:.0f} positions/s x held-out characters per token)", tokenizer=name)
        metric("decode_chars_per_s_{tokenizer}", decode_tokens * chars_per_token[name],
               shape + f"{decode_tokens:.0f} tokens/s, KV cache, batch 1, greedy, x held-out characters per token)",
               tokenizer=name)


GROUPS = {"prepare": bench_prepare, "train": bench_train, "generate": bench_generate, "ui": bench_ui,
          "tokenizer": bench_tokenizer, "packing": bench_packing}
DEFAULT = ("prepare", "train", "generate", "ui", "tokenizer")

if __name__ == "__main__":
    config = configure(globals())
    if only and only not in GROUPS:
        renamed = " (the group modes is now called packing)" if only == "modes" else ""
        sys.exit(f"--only={only!r}: expected one of {', '.join(GROUPS)}{renamed}")
    for name, fn in GROUPS.items():
        if only == name or (not only and name in DEFAULT):
            fn()
