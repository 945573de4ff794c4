"""MiniGLM's speed and memory figures: one JSON object a line, {"metric", "value", "unit"}; every
metric's name, unit and direction (higher or lower is better) is listed in metrics.BENCH.

    python bench.py                  # all groups but packing and lora (builds the default corpus first if missing)
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
           against the OpenAI path (/v1/chat/completions streamed, the openai client) in the same
           app, the two taking turns, same seeds; then the same app sending an update per piece
           (--stream_every=0), each app started,
           measured and stopped alone; sample.py's own tokens/s in the default precision (the
           app's), run between the shipped app's replies (a busier minute slows both), and in fp32.
  precision the quantization table: per precision (fp32, bf16, int8), the 45M SFT checkpoint of the
           ui group and every out_dir in --precision_models (e.g. the demo's out-cpu,out-cpu-sft):
           checkpoint size (int8: sample.py --save_quantized's file), resident memory of a fresh
           sample.py process, first-token latency, tokens/s and characters/s at batch 1 with the
           app's sampling (measure.decode_speed, the precisions taking turns in one process);
           for the trained models also evaluations.py's held-out perplexity, bits per character
           and Rouge-L (its defaults as in make demo) in that precision.
  tokenizer data/train_tokenizer.py on the default corpus at each of tokenizer_vocabs (wall time),
           then held-out tokens per character and single-thread encoding characters/s of GPT-2's
           tokenizer and of each trained one, on prepare.py's val documents (which the trained
           tokenizers never saw); and config/train_cpu.py's model with each one's vocabulary
           (random weights, fp32): training and KV-cache decoding speed in characters of text
           per second (positions or tokens per second x held-out characters per token), the
           models taking turns in one process so that a busy moment slows them alike.
  lora     (only with --only=lora; about 12 minutes on 2 cores) the README's LoRA table: from make
           demo's out-cpu on its SFT data at equal steps, full SFT (config/train_cpu_sft.py) and LoRA
           rank 8, 64, 8 + embeddings (config/train_cpu_lora.py): parameters trained, checkpoint size,
           ms/step, peak memory of train.py, best val loss, held-out Rouge-L and BLEU-4 (evaluations.py),
           and the ratios of size, ms/step and Rouge-L to full SFT's.
  packing  (only with --only=packing; about 15 minutes on 2 cores) the packing-layout question:
           the CPU model of config/train_cpu.py trained for packing_iters steps on stream, aligned
           and packed data (equal compute: same steps, batch and block), then scored on the same
           held-out documents, identically for every layout: mean NLL per token of each document
           and its closing EOT, each scored alone after an EOT.
Figures are measured on the machine that runs this; compare ratios from one run, not seconds
across machines. --corpus is relative to the current directory.
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from configurator import configure
from measure import (
    api_reply,
    cpu_description,
    decode_speed,
    demo_model_speeds,
    document_nll,
    documents,
    evaluate,
    nanogpt_generate,
    openai_reply,
    plain_loop_positions_per_s,
    random_sft_checkpoint,
    run_sampled,
    sample_py_speed,
    serving_rss_mb,
    training_run,
)
from metrics import BENCH

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- defaults
only = ""                                  # a group name, or "" for all but packing and lora
packing_iters = 150
packing_docs = 400                         # held-out documents scored per packing layout
corpus = "data/raw/pretrain.jsonl"
tokenizer_vocabs = "4096,8192,16384"       # the tokenizer group's vocabulary sizes
precision_models = ""                      # the precision group's trained out_dirs ("," between them)
lora_base_model = "out-cpu"                # the lora group's pretrained model and SFT data (make demo's)
lora_data = "data/processed_sft"
lora_iters = 800                           # config/train_cpu_sft.py's steps
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
    import copy

    import torch

    import quant
    from engine import PRECISIONS, pick_precision
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256)).eval()
    prompt = torch.randint(0, 256, (1, 16))
    precision = pick_precision("cpu")  # what sample.py and the app choose here
    auto = copy.deepcopy(model)
    auto = quant.quantize_int8(auto) if precision == "int8" else auto.to(PRECISIONS[precision])
    list(model.generate(prompt, 8, temperature=0))  # warm-up
    list(auto.generate(prompt, 8, temperature=0))
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
        t0 = time.perf_counter()
        rates["auto"] = len(list(auto.generate(prompt, new, temperature=0))) / (time.perf_counter() - t0)
        metric("generate_tokens_per_s_auto_{new}", rates["auto"],
               f"(the same model in the automatic precision, {precision}: batch 1, greedy)", new=new)
        metric("generate_auto_speedup_vs_nanogpt_{new}", rates["auto"] / rates["nanogpt"],
               "(nanoGPT's generate in fp32, the same run)", new=new)


def bench_ui(reps: int = 5) -> None:
    from gradio_client import Client
    from openai import OpenAI

    from engine import SAMPLING_DEFAULTS
    from serving import start_app
    question, new = "成语“画蛇添足”是什么意思？", 256
    defaults = {k: SAMPLING_DEFAULTS[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    sampling = list(defaults.values())  # /generate's order
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "m"
        random_sft_checkpoint(model_dir)
        cli = []  # sample.py in the app's precision (both ""), between the shipped app's replies
        # the app as shipped, then one that sends an update per piece: each started, measured and stopped
        # alone; sample.py runs while the app waits, so that a slower minute of this shared machine slows both
        for name, extra in (("", ()), ("_every_piece", ("--stream_every=0",))):
            app, url = start_app(Path(tmp) / f"app{name}.log", f"--models={model_dir}",
                                 f"--votes_path={tmp}/votes.jsonl", *extra)
            try:
                client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
                client.predict(question, "", 8, api_name="/generate")  # warm-up
                rows, via_openai, v1 = [], [], OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
                openai_reply(v1, str(model_dir), question, 8, 0, **defaults)  # warm-up
                for seed in range(reps):
                    rows.append(api_reply(client, question, "", new, *sampling, "", seed))
                    if not name:
                        via_openai.append(openai_reply(v1, str(model_dir), question, new, seed, **defaults))
                        cli.append(sample_py_speed(model_dir, question, new, ""))
                client.close()
            finally:
                app.terminate()
                app.wait(timeout=30)
            tokens = statistics.median(r[2]["new_tokens"] for r in rows)
            unit = (f"(API, batch 1, 45M, CPU, the app alone, median of {reps} after a warm-up, {tokens:.0f} new tokens"
                    + (", --stream_every=0)" if name else ")"))
            if not name:
                metric("ui_first_token_s", statistics.median(r[0] for r in rows), unit)
                metric("ui_openai_first_token_s", statistics.median(r[0] for r in via_openai), unit)
                speed = statistics.median(r[2] / r[1] for r in via_openai)
                metric("ui_openai_tokens_per_s", speed, unit)
                speed /= statistics.median(r[2]["new_tokens"] / r[1] for r in rows)
                metric("ui_openai_speed_vs_generate", speed, f"(/v1/chat/completions against /generate, {unit[1:]}")
            metric("ui_tokens_per_s{variant}", statistics.median(r[2]["new_tokens"] / r[1] for r in rows), unit,
                   variant=name)
            metric("ui_reply_s{variant}", statistics.median(r[1] for r in rows), f"for the whole reply {unit}", variant=name)
        speed, label = statistics.median(s for s, _ in cli), cli[0][1]
        metric("cli_tokens_per_s{variant}", speed, f"(sample.py, {label}, batch 1, 45M, CPU, median of {reps} runs "
               f"between the app's replies, each its second answer, up to {new} new tokens)", variant="")
        speed, label = sample_py_speed(model_dir, question, new, "fp32", reps)
        metric("cli_tokens_per_s{variant}", speed, f"(sample.py, {label}, batch 1, 45M, CPU, median of {reps} after a "
               f"warm-up, up to {new} new tokens)", variant="_fp32")


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
        docs = documents(val, eot)[:packing_docs]
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


def bench_precision(precisions=("fp32", "bf16", "int8"), rounds: int = 3) -> None:
    import checkpoint
    from engine import load_model
    prompt = "成语“画蛇添足”是什么意思？"
    with tempfile.TemporaryDirectory() as tmp:
        models = {"45m": Path(tmp) / "45m"} | {Path(m).name: Path(m) for m in precision_models.split(",") if m}
        random_sft_checkpoint(models["45m"])
        for name, path in models.items():
            sizes = {"fp32": checkpoint.checkpoint_file(path).stat().st_size}
            int8_file = Path(tmp) / f"{name}-int8" / "ckpt.pt"
            subprocess.run([sys.executable, "sample.py", f"--out_dir={path}", f"--save_quantized={int8_file.parent}"],
                           cwd=ROOT, capture_output=True, check=True)
            sizes["int8"] = int8_file.stat().st_size
            loaded = {p: load_model(path, "cpu", p) for p in precisions}
            speeds = {p: [] for p in precisions}
            for _ in range(rounds):  # the precisions take turns: a busy moment slows them alike
                for p, (model, ckpt) in loaded.items():
                    speeds[p].append(decode_speed(model, ckpt, prompt, 256, rounds=1))
            for p in precisions:
                first, tps, cps = (statistics.median(x[i] for x in speeds[p]) for i in range(3))
                unit = f"({name}, {p}, batch 1, app's sampling, 256 new tokens, CPU)"
                metric("precision_first_token_s_{model}_{precision}", first, unit, model=name, precision=p)
                metric("precision_tokens_per_s_{model}_{precision}", tps, unit, model=name, precision=p)
                metric("precision_chars_per_s_{model}_{precision}", cps, unit, model=name, precision=p)
                metric("precision_rss_mb_{model}_{precision}", serving_rss_mb(sys.executable, path, p),
                       f"(a fresh sample.py process after an 8-token reply, {name}, {p})", model=name, precision=p)
                if p in sizes:
                    metric("precision_checkpoint_mb_{model}_{precision}", sizes[p] / 2**20,
                           "(ckpt.pt as trained: weights, and optimizer state if any)" if p == "fp32" else
                           "(sample.py --save_quantized)", model=name, precision=p)
            if name == "45m":
                continue
            for p in precisions:  # quality: evaluations.py in this precision, into a folder of its own
                out = Path(tmp) / f"{name}-eval-{p}"
                out.mkdir()
                (out / "ckpt.pt").symlink_to(checkpoint.checkpoint_file(path).resolve())
                figures = evaluate(out, f"--precision={p}")
                for key in ("perplexity", "bits_per_char", "rouge_l"):
                    if figures.get(key) is not None:
                        metric("precision_{key}_{model}_{precision}", figures[key], f"(evaluations.py, {name}, {p})",
                               key=key, model=name, precision=p)


def bench_lora() -> None:
    """LoRA against full SFT from the same pretrained model at equal steps (config/train_cpu_sft.py
    and config/train_cpu_lora.py: the same data, batch, steps and schedule; each its learning rate)."""
    runs = {"full": ["config/train_cpu_sft.py"], "lora_r8": ["config/train_cpu_lora.py"],
            "lora_r64": ["config/train_cpu_lora.py", "--lora_rank=64", "--lora_alpha=128"],
            "lora_r8_emb": ["config/train_cpu_lora.py", "--train_embeddings=True"]}
    fig, base = {}, [f"--init_checkpoint={Path(lora_base_model).resolve()}", f"--data_dir={Path(lora_data).resolve()}"]
    with tempfile.TemporaryDirectory() as tmp:
        for run, args in runs.items():
            fig[run] = training_run(Path(tmp) / run, *args, *base, f"--max_iters={lora_iters}", f"--lr_decay_iters={lora_iters}")
            fig[run] |= {k: v for k, v in evaluate(Path(tmp) / run).items() if k in ("rouge_l", "bleu_4")}
    for run, f in fig.items():
        note = f"({run}, {lora_iters} steps from {lora_base_model} on {lora_data})"
        for key in ("trainable_params", "checkpoint_mb", "ms_per_step", "peak_rss_mb", "best_val_loss", "rouge_l", "bleu_4"):
            metric("lora_{key}_{run}", f[key], note, key=key, run=run)
        for key in ("checkpoint_mb", "ms_per_step", "rouge_l") if run != "full" else ():
            metric("lora_{key}_vs_full_{run}", f[key] / fig["full"][key], "(the same run)", key=key, run=run)


GROUPS = {"prepare": bench_prepare, "train": bench_train, "generate": bench_generate, "ui": bench_ui,
          "tokenizer": bench_tokenizer, "packing": bench_packing, "precision": bench_precision, "lora": bench_lora}
DEFAULT = ("prepare", "train", "generate", "ui", "precision", "tokenizer")  # packing and lora: on request

if __name__ == "__main__":
    config = configure(globals())
    if only and only not in GROUPS:
        renamed = " (the group modes is now called packing)" if only == "modes" else ""
        sys.exit(f"--only={only!r}: expected one of {', '.join(GROUPS)}{renamed}")
    print(f"# {cpu_description()}", file=sys.stderr)
    for name, fn in GROUPS.items():
        if only == name or (not only and name in DEFAULT):
            fn()
