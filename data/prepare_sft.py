"""Tokenize question/answer pairs into block-aligned SFT .bin files with a loss mask.

    python data/prepare_sft.py                          # default: data/raw/sft_train.jsonl
    python data/prepare_sft.py --input=my_sft.json --block_size=256
    python data/prepare_sft.py --tokenizer=gpt2 --out_dir=data/processed_sft_gpt2

--tokenizer: zh (data/tokenizer/zh.tiktoken, made by python data/train_tokenizer.py), gpt2 or a
tokenizer file's path, as data/prepare.py takes it; use the one the pretraining data used (the
model fine-tuned on this data was trained on that). meta.json records the whole tokenizer.

--input takes a file, folder, glob or comma-separated list; each file is a JSON array or JSONL
of {"question", "answer"} objects (the course's format). Each pair is encoded as

    tokens: encode("问：{question}\\n答：") + encode(answer) + [EOT]
    mask:   0 ...                         1 ...              1

--pack=True (default): the train pairs, in a fixed shuffled order (data.blocks.ShuffledPieces: a
hash of each pair; pairs about one entity sit together in the source), are packed whole into
blocks (best fit, data.blocks.BestFitPacker; the rest of a block is PAD with mask 0). A short
pair would waste most of its own block on padding: on the default data with zh, 68% of the
positions at --block_size=128, and packed a step trains on about three times as many answers. A
pair is never split across blocks; a later pair in a block attends to the earlier, unrelated
ones. val.bin keeps one pair per block, as the model sees a question when answering, so its loss
compares runs packed or not. --pack=False: every train pair gets its own block, as before.

Prompt and answer are tokenized separately, exactly as the sampler tokenizes a question, so
a question that contains "答：" or "<|endoftext|>" (encoded as plain text) changes nothing.
Policy for a pair longer than a block: it is dropped, counted and reported (a truncated answer
would teach the model to stop mid-sentence without EOT).
Validation split by entity, what a pair is about: a fixed hash of the entity puts about
--val_fraction of the entities in val.bin, with all their pairs. The entity is the pair's
"entity" field when it has one (data/fetch_data.py writes the idiom, "author《title》" of a
poem, the poet), else data.records.entity_of(question): the first quoted subject of the question
(“…” or 《…》), else the question itself. So "成语“画蛇添足”是什么意思？" and "请用成语“画蛇添足”
造一个句子。" are on one side. (Held-out test pairs belong in their own file.) Small data: when
no entity falls in val, the one with the lowest hash goes there (when none falls in train, the
one with the highest; a note says so), so two or more usable pairs always give two splits; a
single pair is written to train only, with a warning.
Writes out_dir/{train,val}.bin (uint16 tokens), {train,val}_mask.bin (uint8, 1 = this token is a
trained target) and meta.json. --input and --out_dir are relative to the working directory; the
defaults assume the repository root.
"""
import sys
from collections import Counter
from importlib.util import find_spec

if find_spec("configurator") is None:  # python data/x.py finds the shared modules through pip install -e .
    sys.exit("MiniGLM's modules are not installed in this Python: run pip install -r requirements.txt in its folder")

import numpy as np

from configurator import configure
from data.blocks import BestFitPacker, ShuffledPieces
from data.records import pair_entity, read_records, split_hash, string_field
from data.splits import SplitWriter, ValReserve, commit_outputs, source_names, start_prepare
from data.tokenizer import SFT_TEMPLATE, encode_pair, sft_prompt

# ----------------------------------------------------------------------------- defaults
input = "data/raw/sft_train.jsonl"
tokenizer = "zh"         # zh, gpt2 or a tokenizer file's path
out_dir = "data/processed_sft"
block_size = 256
val_fraction = 0.02
pack = True              # pack several whole train pairs into a block (val: one pair per block)
# -----------------------------------------------------------------------------


if __name__ == "__main__":
    config = configure(globals())
    report, paths, out, tok = start_prepare(config, 'your own JSON/JSONL of {"question", "answer"}')
    writers = {name: SplitWriter(out / f"{name}.bin") for name in ("train", "val", "train_mask", "val_mask")}
    counts = {s: Counter(pairs=0, tokens=0, answer_tokens=0, characters=0) for s in ("train", "val")}
    reserve = ValReserve("pairs", val_fraction)

    packed = ShuffledPieces()  # the train pairs as token | mask << 16, packed at the end when --pack

    def write_block(split: str, tokens: np.ndarray, mask: np.ndarray) -> None:
        tok_block = np.full(block_size, tok.pad_id, dtype=np.uint16)
        mask_block = np.zeros(block_size, dtype=np.uint8)
        tok_block[:len(tokens)], mask_block[:len(mask)] = tokens, mask
        writers[split].write(tok_block)
        writers[f"{split}_mask"].write(mask_block)

    def emit(split: str, item) -> None:
        tokens, mask, n_chars = item
        if split == "train" and pack:
            packed.add(tokens.astype(np.uint32) | (mask.astype(np.uint32) << 16))
        else:
            write_block(split, tokens, mask)
        counts[split].update(pairs=1, tokens=len(tokens), answer_tokens=int(mask.sum()), characters=n_chars)

    def write_packed(block: np.ndarray) -> None:  # uint32: token id in the low 16 bits, mask bit above
        write_block("train", (block & 0xFFFF).astype(np.uint16), (block >> 16).astype(np.uint8))

    committed = False
    try:
        for path in paths:
            for where, obj in read_records(path, report):
                q = string_field(obj, "question", where, report)
                a = string_field(obj, "answer", where, report) if q is not None else None
                entity = string_field(obj, "entity", where, report, required=False) if a is not None else None
                if a is None or (entity is None and obj.get("entity") is not None):
                    continue
                q = q.replace("\r\n", "\n").strip()
                a = a.replace("\r\n", "\n").strip()
                if not q or not a:
                    report.add("empty_question" if not q else "empty_answer", where,
                               f"{'question' if not q else 'answer'} is empty; pair skipped")
                    continue
                tokens, mask = encode_pair(tok, q, a)
                if len(tokens) > block_size:
                    report.add("too_long", where, f"pair is {len(tokens)} tokens, block_size={block_size}; "
                               "dropped (policy: drop, never truncate an answer)")
                    continue
                item = (tokens, mask, len(sft_prompt(q)) + len(a))
                h = split_hash(pair_entity(obj, q))
                if not reserve.keep(h, item):
                    emit("val" if h < val_fraction else "train", item)
        n_pairs = counts["train"]["pairs"] + counts["val"]["pairs"] + len(reserve.items)
        if n_pairs == 0:
            sys.exit(f"no usable question/answer pairs in {len(paths)} file(s); {report.summary()}")
        to_val, to_train = reserve.settle(counts["train"]["pairs"], counts["val"]["pairs"])
        for split, items in (("val", to_val), ("train", to_train)):
            for item in items:
                emit(split, item)
        packer = BestFitPacker(block_size, tok.pad_id, write_packed, dtype=np.uint32)
        for piece in packed:
            packer.add(piece)
        packer.close()
        splits = {}
        for s, c in counts.items():
            file_tokens = writers[s].stats["file_tokens"]
            splits[s] = dict(c) | {"blocks": file_tokens // block_size, "file_tokens": file_tokens,
                                   "padding_fraction": round(1 - c["tokens"] / max(1, file_tokens), 4)}
        meta = {
            "tokenizer": tok.meta(), "kind": "sft", "packing": "sft_packed" if pack else "sft",
            "block_size": block_size, "block_aligned": True,
            "sft_template": SFT_TEMPLATE, "overflow_policy": "drop", "val_fraction": val_fraction,
            "moved_to": reserve.moved, "moved_hashes": reserve.moved_hashes,
            "splits": splits, "problems": dict(report.counts), "sources": source_names(paths),
        }
        commit_outputs(out, writers.values(), meta)
        committed = True
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written (the previous output, if any, is untouched)")
    finally:
        if not committed:
            for w in writers.values():
                w.discard()
    for s, c in splits.items():
        print(f"{s}: {c.get('pairs', 0):,} pairs in {c['blocks']:,} blocks, {c.get('answer_tokens', 0):,} answer tokens, "
              f"padding {c['padding_fraction']:.1%}")
    print(report.summary())
    n_tokens = sum(c["tokens"] - c["pairs"] for c in splits.values())  # each pair's EOT not counted
    n_chars = sum(c["characters"] for c in splits.values())
    print(f"tokenizer {tok.describe()}: {n_tokens / max(1, n_chars):.3f} tokens per character "
          f"(prompts and answers: {n_tokens:,} tokens for {n_chars:,} characters)")
    print(f"wrote {out}/train.bin, train_mask.bin, val.bin, val_mask.bin, meta.json")
