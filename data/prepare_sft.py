"""Tokenize question/answer pairs and multi-turn conversations into block-aligned SFT .bin files
with a loss mask.

    python data/prepare_sft.py                          # default: the pairs and the dialogues of data/raw
    python data/prepare_sft.py --input=my_sft.json --block_size=256
    python data/prepare_sft.py --tokenizer=gpt2 --out_dir=data/processed_sft_gpt2

--tokenizer: zh (data/tokenizer/zh.tiktoken, made by python data/train_tokenizer.py), gpt2 or a
tokenizer file's path, as data/prepare.py takes it; use the one the pretraining data used (the
model fine-tuned on this data was trained on that). meta.json records the whole tokenizer.

--input takes a file, folder, glob or comma-separated list (default: data/raw/sft_train.jsonl and
data/raw/sft_dialogues_train.jsonl, what data/fetch_data.py builds); each file is a JSON array or
JSONL of records, one of (in one file they can mix):
    {"question", "answer"}                                  a pair (the course's format)
    {"messages": [{"role", "content"}, ...]}                a conversation, OpenAI's shape
    {"conversations": [{"from", "value"}, ...]}             the same, ShareGPT's / minimind's shape
A conversation's roles are "system" (optional, first), then "user" and "assistant" in turn,
ending with "assistant" ("conversations" items may also be {"role", "content"}; "from" may say
"human" for user and "gpt" for assistant); every text a non-empty string. Anything else is
reported with its file:line and what was expected, counted, and skipped. Each record is encoded
by data.tokenizer.conversation_ids, the one chat template of training and inference:

    tokens: [encode("系统：{system}\n")] encode("问：{q1}\n答：") encode(a1) EOT  encode("问：{q2}\n答：") ...
    mask:   0 ...                      0 ...                     1 ...      1    0 ...

so a pair is exactly encode("问：{question}\n答：") + encode(answer) + [EOT], as before.

--pack=True (default): the train examples (pairs and conversations), in a fixed shuffled order
(data.blocks.ShuffledPieces: a hash of each; pairs about one entity sit together in the source),
are packed whole into blocks (best fit, data.blocks.BestFitPacker; the rest of a block is PAD
with mask 0). A short pair would waste most of its own block on padding: on the default data
with zh, 68% of the positions at --block_size=128, and packed a step trains on about three times
as many answers. An example is never split across blocks; a later one in a block attends to the
earlier, unrelated ones. val.bin keeps one example per block, as the model sees a question when
answering, so its loss compares runs packed or not. --pack=False: every train example gets its
own block, as before.

Prompt and answer are tokenized separately, exactly as the sampler tokenizes a question, so
a question that contains "答：" or "<|endoftext|>" (encoded as plain text) changes nothing.
Policy for an example longer than a block, never a cut answer (a truncated answer would teach the
model to stop mid-sentence without EOT): a conversation keeps its newest turns whole, as many as
fit with the system text, the oldest dropped (counted as turns_dropped); if the last turn fits
only without the system text, that goes (system_dropped), as engine.fit_prompt drops old turns,
then the system text, at inference. A pair, or a conversation whose last turn alone is longer
than a block, is dropped, counted and reported (too_long).
Validation split by entity, what a record is about: a fixed hash of the entity puts about
--val_fraction of the entities in val.bin, with all their records. The entity is the record's
"entity" field when it has one (data/fetch_data.py writes the idiom, "author《title》" of a
poem, the poet), else data.records.entity_of(its first question): the first quoted subject of
the question (“…” or 《…》), else the question itself. So "成语“画蛇添足”是什么意思？" and "请用成语“画蛇添足”
造一个句子。" are on one side. (Held-out test pairs belong in their own file.) Small data: when
no entity falls in val, the one with the lowest hash goes there (when none falls in train, the
one with the highest; a note says so), so two or more usable records always give two splits; a
single record is written to train only, with a warning. meta.json counts pairs, conversations
and turns (answers) per split and records the templates (sft_template, system_template).
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
from data.records import CONVERSATION_KEYS, conversation_of, pair_entity, read_records, split_hash, string_field
from data.splits import SplitWriter, ValReserve, commit_outputs, source_names, start_prepare
from data.tokenizer import SFT_TEMPLATE, SYSTEM_TEMPLATE, conversation_ids, sft_prompt

# ----------------------------------------------------------------------------- defaults
input = "data/raw/sft_train.jsonl,data/raw/sft_dialogues_train.jsonl"
tokenizer = "zh"         # zh, gpt2 or a tokenizer file's path
out_dir = "data/processed_sft"
block_size = 256
val_fraction = 0.02
pack = True              # pack several whole train examples into a block (val: one per block)
# -----------------------------------------------------------------------------


if __name__ == "__main__":
    config = configure(globals())
    report, paths, out, tok = start_prepare(config, 'your own JSON/JSONL of {"question", "answer"} or {"messages"}')
    writers = {name: SplitWriter(out / f"{name}.bin") for name in ("train", "val", "train_mask", "val_mask")}
    counts = {s: Counter(pairs=0, conversations=0, turns=0, tokens=0, answer_tokens=0, characters=0)
              for s in ("train", "val")}
    reserve = ValReserve("records", val_fraction)

    packed = ShuffledPieces()  # the train examples as token | mask << 16, packed at the end when --pack

    def write_block(split: str, tokens: np.ndarray, mask: np.ndarray) -> None:
        tok_block = np.full(block_size, tok.pad_id, dtype=np.uint16)
        mask_block = np.zeros(block_size, dtype=np.uint8)
        tok_block[:len(tokens)], mask_block[:len(mask)] = tokens, mask
        writers[split].write(tok_block)
        writers[f"{split}_mask"].write(mask_block)

    def emit(split: str, item) -> None:
        tokens, mask, n_chars, n_turns, unit = item
        if split == "train" and pack:
            packed.add(tokens.astype(np.uint32) | (mask.astype(np.uint32) << 16))
        else:
            write_block(split, tokens, mask)
        counts[split].update({unit: 1, "turns": n_turns, "tokens": len(tokens), "answer_tokens": int(mask.sum()),
                              "characters": n_chars})

    def write_packed(block: np.ndarray) -> None:  # uint32: token id in the low 16 bits, mask bit above
        write_block("train", (block & 0xFFFF).astype(np.uint16), (block >> 16).astype(np.uint8))

    def read_example(obj: dict, where: str):
        """(system, turns, entity, "pairs" | "conversations") of a record, or None after reporting why not."""
        unit = "conversations" if any(k in obj for k in CONVERSATION_KEYS) else "pairs"
        if unit == "conversations":
            conversation = conversation_of(obj, where, report)
            if conversation is None:
                return None
            system, turns = conversation
        else:
            q = string_field(obj, "question", where, report)
            a = string_field(obj, "answer", where, report) if q is not None else None
            if a is None:
                return None
            q, a = (s.replace("\r\n", "\n").strip() for s in (q, a))
            if not q or not a:
                report.add("empty_question" if not q else "empty_answer", where,
                           f"{'question' if not q else 'answer'} is empty; pair skipped")
                return None
            system, turns = "", [(q, a)]
        entity = string_field(obj, "entity", where, report, required=False)
        if entity is None and obj.get("entity") is not None:
            return None
        return system, turns, pair_entity(obj, turns[0][0]), unit

    def fit(system: str, turns: list, where: str):
        """The tokens and mask of the example, or of its newest whole turns (and the system text if
        it fits with them) when it is longer than a block; None (reported) if even the last turn is."""
        ids, mask = conversation_ids(tok, turns, system=system)
        if len(ids) > block_size:
            sizes = [len(conversation_ids(tok, [t])[0]) for t in turns]
            for keep_system, head in ((system, len(conversation_ids(tok, [], system=system)[0])), ("", 0)):
                k = len(turns)
                while k > 0 and head + sum(sizes[k - 1:]) <= block_size:
                    k -= 1
                if k < len(turns):
                    break
            else:
                what = "pair" if len(turns) == 1 and not system else "conversation's last turn"
                report.add("too_long", where, f"{what} is {sizes[-1]} tokens, block_size={block_size}; "
                           "dropped (policy: drop, never truncate an answer)")
                return None
            if k:
                report.add("turns_dropped", where, f"conversation is {len(ids)} tokens, block_size={block_size}: "
                           f"its {k} oldest turn(s) dropped, {len(turns) - k} kept whole", n=k)
            if system and not keep_system:
                report.add("system_dropped", where, "the system text does not fit with the last turn: dropped")
            system, turns = keep_system, turns[k:]
            ids, mask = conversation_ids(tok, turns, system=system)
        n_chars = sum(len(sft_prompt(q)) + len(a) for q, a in turns)
        n_chars += len(SYSTEM_TEMPLATE.format(system=system)) if system else 0
        return np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8), n_chars, len(turns)

    committed = False
    try:
        for path in paths:
            for where, obj in read_records(path, report):
                example = read_example(obj, where)
                fitted = example and fit(*example[:2], where)
                if not fitted:
                    continue
                item = (*fitted, example[3])
                h = split_hash(example[2])
                if not reserve.keep(h, item):
                    emit("val" if h < val_fraction else "train", item)
        n_written = {s: c["pairs"] + c["conversations"] for s, c in counts.items()}
        if sum(n_written.values()) + len(reserve.items) == 0:
            sys.exit(f"no usable question/answer pairs or conversations in {len(paths)} file(s); {report.summary()}")
        to_val, to_train = reserve.settle(n_written["train"], n_written["val"])
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
            "sft_template": SFT_TEMPLATE, "system_template": SYSTEM_TEMPLATE,
            "overflow_policy": "drop", "conversation_overflow": "drop_oldest_turns", "val_fraction": val_fraction,
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
        print(f"{s}: {c['pairs']:,} pairs and {c['conversations']:,} conversations ({c['turns']:,} answers) in "
              f"{c['blocks']:,} blocks, {c['answer_tokens']:,} answer tokens, padding {c['padding_fraction']:.1%}")
    print(report.summary())
    n_tokens = sum(c["tokens"] - c["turns"] for c in splits.values())  # each answer's EOT not counted
    n_chars = sum(c["characters"] for c in splits.values())
    print(f"tokenizer {tok.describe()}: {n_tokens / max(1, n_chars):.3f} tokens per character "
          f"(prompts and answers: {n_tokens:,} tokens for {n_chars:,} characters)")
    print(f"wrote {out}/train.bin, train_mask.bin, val.bin, val_mask.bin, meta.json")
