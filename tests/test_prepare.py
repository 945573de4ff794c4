"""data/prepare.py end to end on corpora the tests write: alignment, packings, splits, cleaning."""
import json

import numpy as np
import pytest
from conftest import read_bin, read_meta, run_script, write_jsonl

from data.records import clean_text, split_hash
from data.tokenizer import load_tokenizer

GPT2 = load_tokenizer("gpt2")

BLOCK = 64


def corpus(n=60):
    """Documents of varied length; some longer than a block, all with sentence ends."""
    docs = []
    for i in range(n):
        body = "".join(f"第{i}篇第{j}句，春风又绿江南岸。" for j in range(1 + i % 9))
        docs.append({"id": str(i), "title": f"标题{i}", "text": f"标题{i}\n\n{body}"})
    return docs


def expected_texts(docs):
    return [clean_text(d["text"], d["title"]) for d in docs]


def segments(tokens, tok=GPT2):
    """Split a token array on EOT, dropping PAD: the EOT-terminated runs."""
    runs, cur = [], []
    for t in tokens.tolist():
        if t == tok.pad_id:
            continue
        if t == tok.eot_id:
            runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs, cur


def prepare(tmp_path, docs, packing, tokenizer="gpt2", **overrides):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / f"out_{packing}"
    args = [f"--input={src}", f"--out_dir={out}", f"--packing={packing}", f"--block_size={BLOCK}",
            "--val_fraction=0.2", f"--tokenizer={tokenizer}"] + [f"--{k}={v}" for k, v in overrides.items()]
    run_script("data/prepare.py", *args)
    return out


def test_clean_text_removes_title_line_debris_and_blank_runs():
    text = "经济学\r\n\r\n经济学（）是一门学科()。[]\n\n\n\n它研究【 】选择。  \n"
    assert clean_text(text, "经济学") == "经济学是一门学科。\n\n它研究选择。"
    assert clean_text("正文第一行\n第二行", "别的标题") == "正文第一行\n第二行"


@pytest.mark.parametrize("packing", ["aligned", "packed"])
def test_block_alignment(tmp_path, packing, tokenizer):
    spec, tok = tokenizer
    out = prepare(tmp_path, corpus(), packing, spec)
    meta = read_meta(out)
    assert meta["tokenizer"] == tok.meta() and "vocab_size" not in meta and "pad_id" not in meta
    assert meta["block_aligned"] and meta["block_size"] == BLOCK
    assert meta["packing"] == packing and "mode" not in meta
    for split in ("train", "val"):
        size = (out / f"{split}.bin").stat().st_size
        assert size % (2 * BLOCK) == 0
        assert size // 2 == meta["splits"][split]["file_tokens"]
        assert meta["splits"][split]["blocks"] == size // (2 * BLOCK)


def test_aligned_block_decodes_to_the_start_of_one_document(tmp_path, tokenizer):
    spec, tok = tokenizer
    docs = corpus()
    out = prepare(tmp_path, docs, "aligned", spec)
    texts = set(expected_texts(docs))
    n = 0
    for split in ("train", "val"):
        for block in read_bin(out / f"{split}.bin").reshape(-1, BLOCK):
            runs, tail = segments(block, tok)
            assert len(runs) == 1 and not tail, "one document, one EOT per block"
            text = tok.decode(runs[0])
            matches = [t for t in texts if t.startswith(text)]
            assert len(matches) == 1
            assert text == matches[0] or text.endswith("。"), "a cut falls on a sentence end"
            pad = block[len(runs[0]) + 1:]
            assert (pad == tok.pad_id).all()
            n += 1
    assert n == len(docs)


def test_packed_blocks_hold_whole_documents_and_lose_nothing(tmp_path, tokenizer):
    spec, tok = tokenizer
    enc = tok.enc
    docs = corpus()
    out = prepare(tmp_path, docs, "packed", spec)
    texts = expected_texts(docs)
    pieces = []
    for split in ("train", "val"):
        for block in read_bin(out / f"{split}.bin").reshape(-1, BLOCK):
            body = block[block != tok.pad_id]
            assert (block[len(body):] == tok.pad_id).all(), "padding only at the end of a block"
            first = enc.decode(body[:8].tolist())
            assert first.startswith("第"), f"block starts mid-sentence: {first!r}"
            pieces.append(enc.decode(body.tolist()))
    joined = "".join(pieces)
    for t in texts:  # a document that fits a block sits whole in one block, followed by EOT
        if len(enc.encode_ordinary(t)) < BLOCK:
            assert sum(p.count(t + "<|endoftext|>") for p in pieces) == 1
    meta = read_meta(out)
    total = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    assert total == sum(len(enc.encode_ordinary(t)) + 1 for t in texts)
    assert joined.count("<|endoftext|>") == len(texts)


def test_stream_packing_keeps_every_token(tmp_path, tokenizer):
    spec, tok = tokenizer
    docs = corpus()
    out = prepare(tmp_path, docs, "stream", spec)
    got = []
    for split in ("train", "val"):
        runs, tail = segments(read_bin(out / f"{split}.bin"), tok)
        assert not tail
        got += [tok.decode(r) for r in runs]
    assert sorted(got) == sorted(expected_texts(docs))
    meta = read_meta(out)
    assert not meta["block_aligned"]
    assert meta["splits"]["train"]["padding_fraction"] == 0
    chars = sum(len(t) for t in expected_texts(docs))
    assert sum(meta["splits"][s]["characters"] for s in ("train", "val")) == chars


def test_train_and_val_are_disjoint_and_deterministic(tmp_path, enc):
    docs = corpus(80) + corpus(10)  # ten duplicates: a duplicate never straddles the split
    out1 = prepare(tmp_path, docs, "stream", num_workers=1)
    out2 = tmp_path / "again"
    run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={tmp_path / 'in.jsonl'}", f"--out_dir={out2}",
               "--packing=stream", f"--block_size={BLOCK}", "--val_fraction=0.2", "--num_workers=2",
               "--docs_per_task=7")
    split_texts = {}
    for split in ("train", "val"):
        a, b = (out1 / f"{split}.bin").read_bytes(), (out2 / f"{split}.bin").read_bytes()
        assert a == b, "output depends on the worker count"
        runs, _ = segments(read_bin(out1 / f"{split}.bin"))
        split_texts[split] = {enc.decode(r) for r in runs}
    assert split_texts["train"] and split_texts["val"]
    assert not split_texts["train"] & split_texts["val"]
    assert split_texts["train"] | split_texts["val"] == set(expected_texts(docs))


def test_input_accepts_folders_globs_and_json_arrays(tmp_path):
    docs = corpus(40)
    d = tmp_path / "wiki"
    d.mkdir()
    write_jsonl(d / "wiki-zh-subset-AA.jsonl", docs[:20])
    (d / "wiki-zh-subset-AB.json").write_text(json.dumps(docs[20:], ensure_ascii=False, indent=1), encoding="utf-8")
    for spec in (str(d), str(d / "wiki-zh-subset-*"), f"{d / 'wiki-zh-subset-AA.jsonl'},{d / 'wiki-zh-subset-AB.json'}"):
        out = tmp_path / "o"
        run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={spec}", f"--out_dir={out}", "--val_fraction=0.2",
                   f"--block_size={BLOCK}")
        meta = read_meta(out)
        assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
        assert len(meta["sources"]) == 2


def test_long_document_without_sentence_end_is_cut_and_reported(tmp_path, tokenizer):
    spec, tok = tokenizer
    long_doc = {"title": "无句号", "text": "，".join(["一二三四五六七八九十"] * 30)}
    no_punct = {"title": "无标点", "text": "长" * 400}
    out = tmp_path / "o"
    src = write_jsonl(tmp_path / "in.jsonl", corpus(20) + [long_doc, no_punct])
    proc = run_script("data/prepare.py", f"--tokenizer={spec}", f"--input={src}", f"--out_dir={out}", "--packing=packed",
                      f"--block_size={BLOCK}", "--val_fraction=0.2")
    assert f"{src}:21: document of" in proc.stderr and "no sentence end" in proc.stderr
    assert f"{src}:22: document of" in proc.stderr
    meta = read_meta(out)
    assert meta["problems"]["no_sentence_end"] == 2
    assert meta["cuts"]["clause"] >= 1 and meta["cuts"]["hard"] >= 1
    text = tok.decode([t for s in ("train", "val") for t in read_bin(out / f"{s}.bin").tolist() if t != tok.pad_id])
    assert "\ufffd" not in text, "a cut split a character"
    assert text.count("长") == 400


def test_packer_bounds_open_blocks():
    from data.blocks import BestFitPacker
    written = []
    p = BestFitPacker(10, GPT2.pad_id, written.append, max_open=2)
    for n in (6, 6, 6, 3, 4, 4):
        p.add(np.full(n, 1, dtype=np.uint16))
        assert len(p.open) <= 2
    p.close()
    lengths = sorted(int((b != GPT2.pad_id).sum()) for b in written)
    assert sum(lengths) == 29 and all(len(b) == 10 for b in written)
    # 6,6 open two blocks; the third 6 forces the fullest out (6); 3 joins a 6 (9); the first 4
    # fills the other 6 (10, written at once); the last 4 opens a block of its own.
    assert lengths == [4, 6, 9, 10]


@pytest.mark.parametrize("packing", ["stream", "aligned", "packed"])
def test_ten_documents_get_a_val_split(tmp_path, packing, tokenizer):
    """A first try with a sample file: ten documents, none of which the hash puts in val; one
    worker and two (each rebuilding the tokenizer) write the same files."""
    spec, tok = tokenizer
    docs = corpus(10)
    assert all(split_hash(t) >= 0.01 for t in expected_texts(docs))
    out = prepare(tmp_path, docs, packing, spec, val_fraction=0.01, num_workers=1)
    (tmp_path / "w").mkdir()
    again = prepare(tmp_path / "w", docs, packing, spec, val_fraction=0.01, num_workers=2, docs_per_task=3)
    meta = read_meta(out)
    assert meta["splits"]["val"]["documents"] == meta["moved_to"]["val"] == 1
    assert meta["splits"]["train"]["documents"] == 9
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == (again / f"{split}.bin").read_bytes()
    if packing == "stream":
        got = [tok.decode(r) for s in ("train", "val") for r in segments(read_bin(out / f"{s}.bin"), tok)[0]]
        assert sorted(got) == sorted(expected_texts(docs))


def test_small_data_messages(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(10))
    proc = run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", f"--out_dir={tmp_path / 'a'}", f"--block_size={BLOCK}")
    assert "note: no documents fell in val (val_fraction=0.01, 10 documents); moved 1" in proc.stderr
    src = write_jsonl(tmp_path / "same.jsonl", corpus(1) * 3)
    proc = run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", f"--out_dir={tmp_path / 'b'}", f"--block_size={BLOCK}")
    assert "share one split key, so val repeats train" in proc.stderr
    assert read_meta(tmp_path / "b")["splits"]["val"]["documents"] == 1
    src = write_jsonl(tmp_path / "one.jsonl", corpus(1))
    assert split_hash(expected_texts(corpus(1))[0]) < 0.9, "the hash alone would put it in val"
    for fraction in (0.01, 0.9):
        out = tmp_path / f"c{fraction}"
        proc = run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", f"--out_dir={out}", f"--block_size={BLOCK}",
                          f"--val_fraction={fraction}")
        assert "warning: only 1 usable document: wrote train only" in proc.stderr
        meta = read_meta(out)
        assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 0


def test_one_tokenizer_call_per_batch_encodes_each_text_as_alone(tokenizer):
    """encode_documents joins a batch for one call; every text must get exactly its own tokens
    with either tokenizer (GPT-2's split pattern and the trained one's, which glues a leading
    punctuation or space character onto a letter run), whatever its first and last characters
    (letters, digits, punctuation, contractions, CJK, emoji, white space, special-token text)."""
    from data.encode import encode_documents
    _, tok = tokenizer
    edges = ["abc", "'s", "123", "。", "!?", "<|pad|>", "中文", "😀", "a b", "x\ny", "\x0b", "\u3000\n", " ", "\n"]
    texts = [a + "中" + b for a in edges for b in edges] + ["12", "34", "'t", "ll", "。", "文", "\n\n", "x"]
    for batch in (texts, texts + [" leading space"], texts + ["尾 "], texts + ["<|endoftext|>inside"],
                  texts[:1], []):
        tokens, lens = encode_documents(tok, batch)
        want = [tok.encode(t) + [tok.eot_id] for t in batch]
        assert tokens.dtype == np.uint16 and tokens.tolist() == [i for w in want for i in w]
        assert lens.tolist() == [len(w) - 1 for w in want]


def test_one_sentence_end_rule():
    """Packing cuts at data.records.SENTENCE_END, the one rule (tests/test_layout.py: no copies)."""
    from data import records
    ends = lambda text: [m.end() for m in records.SENTENCE_END.finditer(text)]  # noqa: E731
    assert ends("他说：“好。”然后走了。") == [7, 12], "closing quotes belong to the end"
    assert ends("真的?!他问") == [4] and ends("好。。他") == [3], "a run of marks ends once, after its last"
    assert ends("“好！”，他说") == [], "a mark that other punctuation follows ends nothing"
    assert ends("约3.5米. Mr. Li") == [], "a full stop is never a sentence end"


def test_bench_prepare_takes_the_packing_and_tokenizer_flags(tmp_path, zh_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(40))
    proc = run_script("data/bench_prepare.py", f"--input={src}", "--num_workers=2", "--packing=packed",
                      f"--tokenizer={zh_tokenizer}")
    lines = {m["metric"]: m for m in map(json.loads, proc.stdout.splitlines())}
    assert "characters/s" in lines["prepare_pool_tokens_per_s"]["unit"]
    assert "tokenizer tiny (511 ids" in lines["prepare_pool_tokens_per_s"]["unit"]
    proc = run_script("data/bench_prepare.py", f"--input={src}", "--packing=blocks", check=False)
    assert proc.returncode != 0 and "expected one of stream, aligned, packed" in proc.stderr
