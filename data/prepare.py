"""Tokenize pretraining text into uint16 .bin files for train.py.

    python data/prepare.py                     # the default corpus, data/raw/pretrain.jsonl
    python data/prepare.py --input="data/wiki-zh-subset-*.jsonl" --packing=packed --block_size=256
    python data/prepare.py --tokenizer=gpt2 --out_dir=data/processed_pretrain_gpt2

--tokenizer: zh (data/tokenizer/zh.tiktoken, trained on the corpus by python
data/train_tokenizer.py), gpt2 (GPT-2's BPE), or the path of a file data/train_tokenizer.py
wrote. meta.json records the whole tokenizer (a trained one with its ranks), so train.py and
every later script rebuild it from the data or the checkpoint, never from the file.

--input takes a file, a folder (its .jsonl/.json files), a glob or a comma-separated list of
them; each file is JSONL or a JSON array of objects with "text" (and optional "title", "id"),
like the course's wiki-zh-subset files. Writes to --out_dir (default data/processed_pretrain):
train.bin, val.bin (uint16 token ids) and meta.json (tokenizer, block_size, packing, counts).
Both paths are relative to the working directory; the defaults assume the repository root.

Packing layouts (--packing; it was called --mode before):
  stream   documents joined by EOT, no padding; train.py samples random windows (course baseline)
  aligned  one document per block, cut at the last sentence end (。！？) that fits, then EOT,
           then PAD; the rest of a long document is dropped (counted)
  packed   whole documents packed best-fit into blocks with EOT after each; long documents are
           split at sentence ends. Little padding, and no block starts mid-sentence.
In aligned and packed files every block is block_size tokens; PAD targets are never trained on.
Validation documents are chosen by a hash of their text (--val_fraction), so the split is
deterministic, independent of file order and worker count, and duplicates never straddle it.
Small data: when no document falls in val, the one with the lowest hash goes there (when none
falls in train, the one with the highest; a note says so, and meta.json's moved_hashes records
it for evaluations.py), so two or more usable documents always give two splits (if they are
all one text, a copy of it then sits on each side: the note says that too); a single document
is written to train only, with a warning.
"""
import os
import signal
import sys
import time
from collections import Counter
from importlib.util import find_spec
from multiprocessing import Pool

if find_spec("configurator") is None:  # python data/x.py finds the shared modules through pip install -e .
    sys.exit("MiniGLM's modules are not installed in this Python: run pip install -r requirements.txt in its folder")

import numpy as np

from configurator import configure
from data.blocks import PACKINGS, BestFitPacker, pad_block
from data.encode import COUNT_KEYS, SPLITS, _init_worker, bounded_imap, document_of, process_task, tasks
from data.splits import SplitWriter, ValReserve, commit_outputs, source_names, start_prepare

# ----------------------------------------------------------------------------- defaults
input = "data/raw/pretrain.jsonl"
tokenizer = "zh"         # zh, gpt2 or a tokenizer file's path
out_dir = "data/processed_pretrain"
block_size = 256
packing = "packed"       # lowest held-out loss at equal compute (README, bench.py --only=packing)
val_fraction = 0.01
num_workers = min(8, os.cpu_count() or 1)
docs_per_task = 1024     # documents a worker gets at once (the pool costs the parent ~0.3 ms a task)
max_open_blocks = 256    # packed: blocks kept open for best fit (bounds memory)
# -----------------------------------------------------------------------------
RENAMED_KEYS = {"mode": "packing"}  # the configurator answers the old flag with the new name

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    config = configure(globals())
    if packing not in PACKINGS:
        sys.exit(f"--packing={packing!r}: expected one of {', '.join(PACKINGS)}")
    report, paths, out, tok = start_prepare(config, "your wiki-zh-subset-*.jsonl files")
    writers = {s: SplitWriter(out / f"{s}.bin") for s in SPLITS}
    packers = {s: BestFitPacker(block_size, tok.pad_id, writers[s].write, max_open_blocks) for s in writers}
    cut_kinds = Counter()
    counts = {s: Counter(dict.fromkeys(COUNT_KEYS, 0)) for s in writers}
    reserve = ValReserve("documents", val_fraction)
    settings = {"packing": packing, "block_size": block_size, "tokenizer": tok.meta()}

    def place(split: str, tokens: np.ndarray, lens: np.ndarray) -> None:
        """Write the pieces (lens) that tokens holds end to end into a split."""
        if packing == "stream":
            writers[split].write(tokens)
            return
        for end, length in zip(np.cumsum(lens).tolist(), lens.tolist()):
            if packing == "aligned":
                writers[split].write(pad_block([tokens[end - length:end]], block_size, tok.pad_id))
            else:
                packers[split].add(tokens[end - length:end])

    t0 = last = time.time()
    # Workers ignore Ctrl-C (they inherit SIG_IGN): the parent catches it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pool = Pool(num_workers, _init_worker, (settings,)) if num_workers > 1 else None
    if pool is None:
        _init_worker(settings)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    committed = False
    try:
        work = tasks(paths, report, docs_per_task)
        results = (bounded_imap(pool, process_task, work, 4 * num_workers) if pool
                   else map(process_task, work))
        for res in results:
            for event in res["problems"]:
                report.add(*event)
            cut_kinds.update(res["cuts"])
            hashes = res["doc_hash"]
            doc_split = (hashes < val_fraction).astype(np.int8)  # 0 train, 1 val, 2 kept back
            if val_fraction > 0:  # the candidates ValReserve.keep may keep back
                edge = np.where(doc_split == 1, hashes >= reserve.high, hashes <= reserve.low)
                for d in np.flatnonzero(edge).tolist():
                    if reserve.keep(hashes[d], document_of(res, d)):
                        doc_split[d] = 2
            piece_split = doc_split[res["piece_doc"]]
            for i, split in enumerate(SPLITS):
                rows = res["doc_stats"][doc_split == i]
                counts[split].update(dict(zip(COUNT_KEYS, [len(rows)] + rows.sum(0).tolist())))
                chosen = piece_split == i
                place(split, res["tokens"][np.repeat(chosen, res["piece_len"])], res["piece_len"][chosen])
            if time.time() - last > 5:
                last = time.time()
                n = counts["train"]["tokens"] + counts["val"]["tokens"]
                print(f"  {counts['train']['documents'] + counts['val']['documents']:,} documents, "
                      f"{n:,} tokens, {n / (last - t0):,.0f} tokens/s", file=sys.stderr)
        n_docs = counts["train"]["documents"] + counts["val"]["documents"] + len(reserve.items)
        if n_docs == 0:
            sys.exit(f"no usable documents in {len(paths)} file(s); {report.summary()}")
        to_val, to_train = reserve.settle(counts["train"]["documents"], counts["val"]["documents"])
        for split, docs in (("val", to_val), ("train", to_train)):
            for tokens, lens, stats in docs:
                place(split, tokens, lens)
                counts[split].update(dict(zip(COUNT_KEYS, [1] + stats)))
        for p in packers.values():
            p.close()
        splits = {}
        for s, w in writers.items():
            c = dict(counts[s]) | dict(w.stats)
            c["blocks"] = c.get("file_tokens", 0) // block_size if packing != "stream" else None
            c["padding_fraction"] = round(1 - c.get("tokens", 0) / max(1, c.get("file_tokens", 0)), 4)
            splits[s] = c
        meta = {
            "tokenizer": tok.meta(), "kind": "pretrain", "packing": packing, "block_size": block_size,
            "block_aligned": packing != "stream", "val_fraction": val_fraction, "moved_to": reserve.moved,
            "moved_hashes": reserve.moved_hashes,
            "splits": splits, "cuts": dict(cut_kinds), "problems": dict(report.counts),
            "sources": source_names(paths),
        }
        commit_outputs(out, writers.values(), meta)
        committed = True
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written (the previous output, if any, is untouched)")
    finally:
        if pool is not None:
            pool.close() if committed else pool.terminate()
            pool.join()
        if not committed:
            for w in writers.values():
                w.discard()
    dt = time.time() - t0
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    chars = splits["train"]["characters"] + splits["val"]["characters"]
    doc_tokens = splits["train"]["doc_tokens"] + splits["val"]["doc_tokens"]
    for s, c in splits.items():
        print(f"{s}: {c['documents']:,} documents, {c['tokens']:,} tokens, "
              f"{c['blocks'] if c['blocks'] is not None else '-'} blocks, "
              f"padding {c['padding_fraction']:.1%}, truncated documents {c['truncated_documents']:,}")
    print(report.summary())
    print(f"tokenizer {tok.describe()}: {doc_tokens / max(1, chars):.3f} tokens per character "
          f"({doc_tokens:,} tokens, EOT not counted, for {chars:,} characters)")
    print(f"wrote {out}/train.bin, val.bin, meta.json in {dt:.1f}s ({total / dt:,.0f} tokens/s, "
          f"{chars / dt:,.0f} characters/s)")
