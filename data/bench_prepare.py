"""Parallel tokenization speedup of prepare.py's worker pool, for bench.py.

    python data/bench_prepare.py [--input=data/raw/pretrain.jsonl] [--num_workers=2] [--packing=stream] \
        [--tokenizer=zh]

Times, with --tokenizer (as prepare.py takes it), in one run on the same corpus: (a)
single-threaded encode_ordinary over every document's
cleaned text (read and cleaned before the clock starts), (b) prepare.py's own pool with
--packing (stream by default: no cuts), as prepare.py runs it: workers read their line ranges,
parse the JSON, clean, encode and hash each document (and cut long ones). Also (c) the
machine's own ceiling: N processes each running (a) on a slice of the texts against one
process doing all slices, and (d) the pool's own baseline: the same worker code over the same
tasks in this one process. (b) against (a) mixes two things, the extra work prepare does per
document and how well it spreads over the workers; (b) against (d) is the second alone, to
compare with (c). Prints JSON lines; the units of the speeds also give characters/s (what
compares tokenizers) and the tokenizer's tokens per character. --input is a path relative to the working directory; the
default assumes the repository root.
"""
import json
import os
import signal
import sys
import time
from importlib.util import find_spec
from multiprocessing import Pool
from pathlib import Path

if find_spec("configurator") is None:  # python data/x.py finds the shared modules through pip install -e .
    sys.exit("MiniGLM's modules are not installed in this Python: run pip install -r requirements.txt in its folder")

from configurator import configure
from data.blocks import PACKINGS
from data.encode import _init_worker, bounded_imap, process_task, tasks
from data.records import Report, clean_text, read_records
from data.tokenizer import open_tokenizer

# ----------------------------------------------------------------------------- defaults
input = "data/raw/pretrain.jsonl"
num_workers = min(8, os.cpu_count() or 1)
docs_per_task = 1024
packing = "stream"
tokenizer = "zh"
# -----------------------------------------------------------------------------


def _encode_slice(i: int) -> float:
    """Seconds to encode slice i of the module-level texts (inherited by forked workers)."""
    enc = open_tokenizer(tokenizer).enc
    t0 = time.perf_counter()
    for t in _texts[i::num_workers]:
        enc.encode_ordinary(t)
    return time.perf_counter() - t0


if __name__ == "__main__":
    config = configure(globals())
    if packing not in PACKINGS:
        sys.exit(f"--packing={packing!r}: expected one of {', '.join(PACKINGS)}")
    path = Path(input)
    if not path.is_file():
        sys.exit(f"--input={input!r}: no such file (relative to the working directory {os.getcwd()}). "
                 "The default is what 'python data/fetch_data.py' builds, read from the repository root: "
                 "run from there, or pass a JSONL file with --input=")
    tok = open_tokenizer(tokenizer)
    texts = [clean_text(o["text"], o.get("title")) for _, o in read_records(path, Report())]
    chars = sum(len(t) for t in texts)
    enc = tok.enc
    t0 = time.perf_counter()
    single = sum(len(enc.encode_ordinary(t)) for t in texts)
    t_single = time.perf_counter() - t0
    _texts = texts[:len(texts) // 4]
    t0 = time.perf_counter()
    for i in range(num_workers):
        _encode_slice(i)
    t_one = time.perf_counter() - t0
    with Pool(num_workers) as pool:
        pool.map(abs, range(num_workers))
        t0 = time.perf_counter()
        pool.map(_encode_slice, range(num_workers))
        t_many = time.perf_counter() - t0
    del texts, _texts

    settings = {"packing": packing, "block_size": 256, "tokenizer": tok.meta()}
    _init_worker(settings)
    t0 = time.perf_counter()
    one = sum(int(res["doc_stats"][:, 0].sum()) for res in map(process_task, tasks([path], Report(), docs_per_task)))
    t_one_process = time.perf_counter() - t0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with Pool(num_workers, _init_worker, (settings,)) as pool:
        pool.map(abs, range(num_workers))  # workers started and tokenizers loaded before timing
        t0 = time.perf_counter()
        work = tasks([path], Report(), docs_per_task)
        parallel = sum(int(res["doc_stats"][:, 0].sum())
                       for res in bounded_imap(pool, process_task, work, 4 * num_workers))
        t_parallel = time.perf_counter() - t0
    assert parallel == single == one, f"token counts differ: {parallel}, {single}, {one}"
    per_char = f"{single / chars:.3f} tokens per character of tokenizer {tok.describe()}"
    for name, value, unit in [("encode_ordinary_tokens_per_s", single / t_single,
                               f"tokens/s ({chars / t_single:,.0f} characters/s; {per_char})"),
                              ("prepare_one_process_tokens_per_s", one / t_one_process,
                               f"tokens/s ({chars / t_one_process:,.0f} characters/s)"),
                              ("prepare_pool_tokens_per_s", parallel / t_parallel,
                               f"tokens/s ({chars / t_parallel:,.0f} characters/s; {per_char})"),
                              ("prepare_parallel_speedup", t_single / t_parallel, f"x ({num_workers} workers)"),
                              ("prepare_pool_vs_one_process", t_one_process / t_parallel, f"x ({num_workers} workers)"),
                              ("machine_parallel_ceiling", t_one / t_many, f"x ({num_workers} processes, encode only)")]:
        print(json.dumps({"metric": name, "value": round(value, 3), "unit": unit}, ensure_ascii=False))
