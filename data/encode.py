"""The pretraining tokenizer's workers (data/prepare.py runs them in a process pool): read the
input in batches of documents, encode each batch in one tokenizer call, cut the documents into
pieces for the packing layout, and return the tokens with per-document statistics and split hashes.
data/bench_prepare.py times the same functions.
"""
from collections import Counter
from pathlib import Path

import numpy as np

from data.blocks import document_pieces
from data.records import (Report, clean_text, file_format, line_ranges, read_json_array, read_records,
                          split_hash, string_field)
from data.tokenizer import EOT_TOKEN, Tokenizer, tokenizer_of

SPLITS = ("train", "val")
# doc_stats columns: tokens without / with EOT (after cuts), dropped tokens, 1 if cut short, characters
DOC_STATS = ("doc_tokens", "tokens", "dropped_tokens", "truncated_documents", "characters")
COUNT_KEYS = ("documents",) + DOC_STATS


def _init_worker(settings: dict) -> None:
    """Pool initializer: settings are prepare.py's packing, block_size and "tokenizer" (its
    meta(), ranks included), so every worker rebuilds the very tokenizer the parent chose."""
    global _worker_settings, _worker_tok
    _worker_settings = settings
    _worker_tok = tokenizer_of(settings, "prepare.py's worker settings")


def encode_documents(tok: Tokenizer, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lens): each text's ordinary encoding followed by EOT, end to end (uint16), and
    each text's token count without its EOT. One tokenizer call for the whole batch (a call costs
    about 2 us on top of the BPE, for every document): the texts are joined by the EOT token's
    text with EOT allowed as a special token. tiktoken finds allowed special tokens first and runs
    the split pattern and BPE on the text between them alone, so with any tokenizer (GPT-2's or
    a trained one's pattern) no piece and no merge crosses a seam, and every text gets the tokens
    it gets alone (tests/test_prepare.py checks it on tricky seams). A batch with a text that
    holds the EOT text itself (plain text to the model) is encoded text by text."""
    if not texts:
        return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
    if any(EOT_TOKEN in t for t in texts):
        arrays = [tok.encode_array(t) for t in texts]
        lens = np.array([len(a) for a in arrays], dtype=np.int64)
        eot = np.array([tok.eot_id], dtype=np.uint16)
        return np.concatenate([x for a in arrays for x in (a, eot)]), lens
    tokens = tok.enc.encode_to_numpy(EOT_TOKEN.join(texts) + EOT_TOKEN, allowed_special={EOT_TOKEN},
                                     disallowed_special=()).astype(np.uint16)
    ends = np.flatnonzero(tokens == tok.eot_id)
    return tokens, np.diff(ends, prepend=-1) - 1


def process_docs(docs: list) -> dict:
    """Worker: a batch of (where, title, text) -> one compact result, cheap to send back:
    tokens (every piece of every document, each document's last piece followed by EOT, end to
    end, uint16), piece_len and piece_doc (the document's index) per piece, doc_hash (the split
    hash of the text) and doc_stats (DOC_STATS) per usable document, forced-cut kinds and
    problems. A document shorter than a block (and every document in stream packing) is one
    piece; the longer ones go through document_pieces."""
    s, tok = _worker_settings, _worker_tok
    eot = np.array([tok.eot_id], dtype=np.uint16)
    wheres, texts, problems, cuts = [], [], [], Counter()
    for where, title, text in docs:
        text = clean_text(text, title)
        if text:
            wheres.append(where)
            texts.append(text)
        else:
            problems.append(("empty_text", where, "text is empty after cleaning; skipped", 1))
    tokens, lens = encode_documents(tok, texts)
    starts = np.cumsum(lens + 1) - (lens + 1)
    dropped = np.zeros(len(texts), dtype=np.int64)
    chunks, piece_len, piece_doc, done = [], [], [], 0   # documents before done are in chunks
    long = np.flatnonzero(lens >= s["block_size"]).tolist() if s["packing"] != "stream" else []
    for d in long:
        pieces, kinds, dropped[d] = document_pieces(tokens[starts[d]:starts[d] + lens[d]], s["packing"],
                                                    s["block_size"], tok)
        chunks += [tokens[starts[done]:starts[d]]] + pieces + [eot]
        piece_len += [lens[done:d] + 1, np.array([len(p) for p in pieces[:-1]] + [len(pieces[-1]) + 1])]
        piece_doc += [np.arange(done, d), np.full(len(pieces), d)]
        done = d + 1
        cuts.update(kinds)
        forced = Counter(k for k in kinds if k != "sentence")
        if forced:
            problems.append(("no_sentence_end", wheres[d],
                             f"document of {lens[d]} tokens has no sentence end (。！？) within "
                             f"block_size={s['block_size']}; cut at " + ", ".join(
                                 f"{n} {k} boundar{'y' if n == 1 else 'ies'}" for k, n in forced.items()), 1))
    if long:
        chunks.append(tokens[starts[done]:] if done < len(texts) else tokens[:0])
        tokens = np.concatenate(chunks)
        piece_len = np.concatenate(piece_len + [lens[done:] + 1])
        piece_doc = np.concatenate(piece_doc + [np.arange(done, len(texts))])
    else:
        piece_len, piece_doc = lens + 1, np.arange(len(texts))
    chars = np.array([len(t) for t in texts], dtype=np.int64)
    doc_stats = np.stack([lens, lens + 1 - dropped, dropped, dropped > 0, chars], axis=1).astype(np.int64)
    return {"tokens": tokens, "piece_len": piece_len, "piece_doc": piece_doc,
            "doc_hash": np.array([split_hash(t) for t in texts], dtype=np.float64),
            "doc_stats": doc_stats.reshape(-1, len(DOC_STATS)), "cuts": cuts, "problems": problems}


def document_of(res: dict, d: int):
    """(tokens, piece lengths, stats) of document d of a worker result (its pieces are adjacent)."""
    first, last = np.flatnonzero(res["piece_doc"] == d)[[0, -1]]
    ends = np.cumsum(res["piece_len"])
    lens = res["piece_len"][first:last + 1]
    return res["tokens"][ends[last] - lens.sum():ends[last]].copy(), lens, res["doc_stats"][d].tolist()


def documents(records, report: Report) -> list:
    """(where, title, text) of every record with a usable "text"; the others are reported."""
    docs = []
    for where, obj in records:
        text = string_field(obj, "text", where, report)
        if text is not None:
            title = obj.get("title")
            docs.append((where, title if isinstance(title, str) else None, text))
    return docs


def tasks(paths, report: Report, batch: int):
    """Work for the pool: line ranges of JSONL files (the workers read and parse them), or
    already parsed documents of JSON-array files."""
    for path in paths:
        fmt = file_format(path, report)
        if fmt == "lines":
            for start, end, first_line in line_ranges(path, batch):
                yield ("lines", str(path), start, end, first_line)
        elif fmt == "array":
            docs = documents(read_json_array(path, report), report)
            for i in range(0, len(docs), batch):
                yield ("docs", docs[i:i + batch])


def cleaned_texts(paths, report: Report, batch: int = 1024):
    """The text of every usable document of the input files, cleaned as prepare.py cleans it, in
    file order, in the parent process (data/train_tokenizer.py, bench.py); the others are reported."""
    for task in tasks(paths, report, batch):
        if task[0] == "lines":
            _, path, start, end, first_line = task
            docs = documents(read_records(Path(path), report, start, end, first_line), report)
        else:
            docs = task[1]
        for where, title, text in docs:
            text = clean_text(text, title)
            if text:
                yield text
            else:
                report.add("empty_text", where, "text is empty after cleaning; skipped")


def process_task(task) -> dict:
    """Worker: read a line range (or take parsed documents), then process_docs them."""
    rep = Report(collect=True)
    if task[0] == "lines":
        _, path, start, end, first_line = task
        docs = documents(read_records(Path(path), rep, start, end, first_line), rep)
    else:
        docs = task[1]
    res = process_docs(docs)
    res["problems"] = rep.events + res["problems"]
    return res


def bounded_imap(pool, fn, batches, in_flight: int):
    """pool.imap that reads ahead at most in_flight batches (Pool.imap would read all input)."""
    pending = []
    for b in batches:
        pending.append(pool.apply_async(fn, (b,)))
        if len(pending) >= in_flight:
            yield pending.pop(0).get()
    for p in pending:
        yield p.get()
