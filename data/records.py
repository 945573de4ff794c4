"""Read the user's JSON/JSONL records with clear messages for every bad line, and count them.

    report = Report()
    for path in expand_inputs("data/wiki-zh-subset-*.jsonl", report):
        for where, obj in read_records(path, report):
            ...   # where is "file:line", obj a dict; bad lines were reported and skipped

conversation_of(obj, where, report) reads a multi-turn record ("messages" or "conversations").
Also the rules every reader and writer of the data shares: the hash that picks the validation
split (split_hash, split_of), the entity of a question (entity_of, what an SFT split holds out),
the one sentence-end rule (SENTENCE_END) and the one atomic writer (atomic_path: temp file, then
os.replace). What the prepare scripts share on the output side is in data/splits.py.

Accepts JSONL (one object a line) and JSON arrays, a UTF-8 BOM, CRLF line ends. Reports
(file:line, what was expected) and counts: malformed JSON, a value that is not an object,
invalid UTF-8, an empty file, a path that does not exist. The caller adds its own kinds
(missing field, empty text, ...) through report.add().
"""
import glob
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
BOM = b"\xef\xbb\xbf"
# The one sentence-end rule: a mark of SENTENCE_MARKS with any closing quotes or brackets after
# it, where a letter, a digit, white space or the end of the text follows. So a run of marks
# ends once, after its last mark ("好?!他", "好。。他"); a mark that other punctuation follows is no
# end ("“好！”，他说" ends nowhere); "." is never one (English abbreviations, "3.5").
# Packing cuts blocks at it (data/blocks.py); fetch_data.py cleans doubled marks with SENTENCE_MARKS.
SENTENCE_MARKS = "。！？!?"
SENTENCE_END = re.compile(rf"[{SENTENCE_MARKS}][”’」』）)》]*(?=[\w\s]|$)")
_DECODER = json.JSONDecoder()


class Report:
    """Counts problems by kind; prints the first few of each kind to stderr as they come.
    With collect=True (in a worker process) it keeps the events for the parent to replay."""

    def __init__(self, max_shown: int = 5, collect: bool = False):
        self.counts = Counter()
        self.max_shown = max_shown
        self.events = [] if collect else None

    def add(self, kind: str, where: str, message: str, n: int = 1) -> None:
        if self.events is not None:
            self.events.append((kind, where, message, n))
            return
        self.counts[kind] += n
        if self.counts[kind] - n < self.max_shown:
            print(f"{where}: {message}", file=sys.stderr)

    def summary(self) -> str:
        if not self.counts:
            return "problems: none"
        return "problems: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


def expand_inputs(spec: str, report: Report, suffixes=(".jsonl", ".json")) -> list[Path]:
    """A file, a folder (its *.jsonl/*.json files) or a glob -> sorted files; nothing found exits."""
    paths = []
    for part in [s for s in spec.split(",") if s.strip()]:
        part = os.path.expanduser(part.strip())
        p = Path(part)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in suffixes and q.is_file())
            if not found:
                report.add("missing_path", part, f"folder has no {'/'.join(suffixes)} files")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(part):
            found = sorted(Path(q) for q in glob.glob(part) if Path(q).is_file())
            if not found:
                report.add("missing_path", part, "no file matches this pattern")
            paths += found
        else:
            report.add("missing_path", part, "no such file or folder")
    return list(dict.fromkeys(paths))


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def read_json_array(path: Path, report: Report):
    """Yield (file:line, dict) for the items of a JSON-array file."""
    data = path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        report.add("invalid_utf8", f"{path}:{line}", f"invalid UTF-8 ({e.reason}); expected a UTF-8 "
                   "JSON array; the whole file was skipped")
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    item = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            report.add("invalid_json", f"{path}:{_line_of(text, pos)}",
                       "JSON array is not closed with ']'")
            return
        if text[pos] == "]":
            return
        where = f"{path}:{_line_of(text, pos)}"
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            report.add("invalid_json", where, f"malformed JSON in array item {item} ({e.msg}); "
                       "the rest of the file was skipped")
            return
        item += 1
        if isinstance(obj, dict):
            yield where, obj
        else:
            report.add("not_object", where, f"expected a JSON object, got {type(obj).__name__}")


def file_format(path: Path, report: Report) -> str:
    """"lines" (JSONL), "array" (a JSON array) or "empty" (reported)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head.strip() == b"" or head.strip() == BOM:
            more = f.read(1 << 20)
            if not more:
                report.add("empty_file", str(path), "file is empty; expected JSON lines or a JSON array")
                return "empty"
            head += more
    if head.startswith(BOM):
        report.add("bom_removed", f"{path}:1", "UTF-8 byte-order mark removed (not an error)")
    return "array" if head.removeprefix(BOM).lstrip().startswith(b"[") else "lines"


def line_ranges(path: Path, lines_per_range: int):
    """(start byte, end byte, first line number) of consecutive runs of a JSONL file's lines."""
    with open(path, "rb") as f:
        start = pos = 0
        first = line = 1
        for raw in f:
            pos += len(raw)
            if line - first + 1 == lines_per_range:
                yield start, pos, first
                start, first = pos, line + 1
            line += 1
        if pos > start:
            yield start, pos, first


def read_records(path: Path, report: Report, start: int = 0, end: int | None = None, first_line: int = 1):
    """Yield (file:line, dict) for every good record of a JSONL or JSON-array file; for JSONL,
    optionally only the lines in bytes [start, end) that begin at line first_line."""
    if end is None:
        fmt = file_format(path, report)
        if fmt == "array":
            yield from read_json_array(path, report)
        if fmt != "lines":
            return
    crlf = 0
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for line_no, raw in enumerate(f, first_line):
            if end is not None and pos >= end:
                break
            pos += len(raw)
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            if raw.endswith(b"\r\n"):
                crlf += 1
            raw = raw.strip()
            if not raw:
                continue
            where = f"{path}:{line_no}"
            try:
                text = raw.decode("utf-8")
                if text.startswith("\ufeff"):
                    raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
                obj, stop = _DECODER.raw_decode(text)  # json.loads without its per-call wrapping
                if stop != len(text):
                    raise json.JSONDecodeError("Extra data", text, len(text) - len(text[stop:].lstrip()))
            except UnicodeDecodeError as e:
                report.add("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} ({e.reason}); "
                           "line skipped")
                continue
            except json.JSONDecodeError as e:
                report.add("invalid_json", where, f"malformed JSON ({e.msg} at column {e.colno}); "
                           "expected one JSON object per line; line skipped")
                continue
            if isinstance(obj, dict):
                yield where, obj
            else:
                report.add("not_object", where, f"expected a JSON object, got {type(obj).__name__}; "
                           "line skipped")
    if crlf:
        report.add("crlf_lines", str(path), f"{crlf} CRLF line ends read as LF (not an error)", n=crlf)


def string_field(obj: dict, key: str, where: str, report: Report, required: bool = True):
    """obj[key] as a str, or None after reporting why it is unusable."""
    value = obj.get(key)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return None
    if value is None:
        report.add(f"missing_{key}", where, f"record has no \"{key}\" field "
                   f"(keys: {', '.join(list(obj)[:6]) or 'none'}); skipped")
    else:
        report.add(f"bad_{key}", where, f"\"{key}\" must be a string, got {type(value).__name__}; skipped")
    return None


# Multi-turn records: who may speak, under OpenAI's "role" and ShareGPT's "from" (mapped to OpenAI's names).
SPEAKERS = {"role": {"system": "system", "user": "user", "assistant": "assistant"},
            "from": {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}}
CONVERSATION_KEYS = ("messages", "conversations")
EXPECTED_TURNS = "an optional system message, then user and assistant in turn, ending with assistant"
JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
              dict: "an object"}


def conversation_of(obj: dict, where: str, report: Report):
    """(system text or "", [(question, answer), ...]) of a multi-turn record, or None after
    reporting why it is unusable: {"messages": [{"role", "content"}, ...]} (OpenAI's shape) or
    {"conversations": [...]} of those items or of ShareGPT's {"from", "value"}; EXPECTED_TURNS,
    every text a non-empty string (CRLF read as LF, outer white space stripped)."""
    keys = [k for k in (*CONVERSATION_KEYS, "question", "answer") if k in obj]
    if len(keys) != 1:
        report.add("ambiguous_record", where, f"record has {', '.join(map(repr, keys))}: expected one of "
                   '"messages", "conversations" or a "question"/"answer" pair; skipped')
        return None
    key, items = keys[0], obj[keys[0]]

    def bad(problem: str) -> None:
        report.add(f"bad_{key}", where, f"{problem}; expected {EXPECTED_TURNS}; skipped")

    if not isinstance(items, list) or not items:
        return bad(f'"{key}" is {"empty" if items == [] else "not a list"}')
    roles, texts = [], []
    for i, item in enumerate(items):
        share_gpt = key == "conversations" and isinstance(item, dict) and "from" in item
        speaker, text_key = ("from", "value") if share_gpt else ("role", "content")
        if not isinstance(item, dict):
            got = JSON_TYPES.get(type(item), "null")
            return bad(f'{key}[{i}] is {got}, not an object with "{speaker}" and "{text_key}"')
        if not isinstance(item.get(speaker), str) or item[speaker] not in SPEAKERS[speaker]:
            got = json.dumps(item.get(speaker), ensure_ascii=False)
            return bad(f'{key}[{i}]: "{speaker}" is {got}, not one of {", ".join(SPEAKERS[speaker])}')
        text = item.get(text_key)
        if not isinstance(text, str) or not text.strip():
            got = "missing" if text is None else "empty" if isinstance(text, str) else JSON_TYPES[type(text)]
            return bad(f'{key}[{i}]: "{text_key}" is {got}, expected a non-empty string')
        roles.append(SPEAKERS[speaker][item[speaker]])
        texts.append(text.replace("\r\n", "\n").strip())
    first = int(roles[0] == "system")
    for i in range(first, len(roles)):
        want = ("user", "assistant")[(i - first) % 2]
        if roles[i] != want:
            return bad(f"{key}[{i}] is {roles[i]} where {want} comes")
    if roles[-1] != "assistant":
        return bad(f"{key} ends without an assistant answer")
    return (texts[0] if first else ""), list(zip(texts[first::2], texts[first + 1::2]))


_EMPTY_BRACKETS = re.compile(r"（[\s，,；;、]*）|\([\s，,；;、]*\)|\[[\s，,；;、]*\]|【\s*】")
_BLANK_RUNS = re.compile(r"\n[ \t\u3000]*\n(?:[ \t\u3000]*\n)+")
_TRAILING_SPACE = re.compile(r"[ \t\u3000]+\n")


def clean_text(text: str, title: str | None) -> str:
    """Normalise line ends, drop a leading line that repeats the title (wiki style), remove
    empty brackets left by stripped markup, fold runs of blank lines. (Each step runs only when
    its characters occur: a quick scan is cheaper than a regex call, for every document.)"""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\ufeff" in text or "\u200b" in text:
        text = text.replace("\ufeff", "").replace("\u200b", "")
    if title and title.strip():
        first, sep, rest = text.lstrip().partition("\n")
        if sep and first.strip() == title.strip():
            text = rest
    if "（" in text or "(" in text or "[" in text or "【" in text:
        text = _EMPTY_BRACKETS.sub("", text)
    if "\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
        if "\n\n" in text:  # after the step above, every blank run holds "\n\n"
            text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def split_hash(key: str) -> float:
    """A fixed pseudo-random number in [0, 1) for a key: it decides the key's split."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def in_val(key: str, fraction: float) -> bool:
    """Deterministic split: the fraction of keys whose hash falls below it go to validation."""
    return split_hash(key) < fraction


_SUBJECT = re.compile(r"“([^“”]+)”|《([^《》]+)》|「([^「」]+)」|\"([^\"]+)\"")


def entity_of(question: str) -> str:
    """What a question is about, the unit of a held-out split: the first quoted subject of the
    question (“…”, 《…》, 「…」 or "…") when there is one, else the question itself. "成语“画蛇添足”是什么
    意思？" and "请用成语“画蛇添足”造一个句子。" are both about 画蛇添足, so they land on one side."""
    m = _SUBJECT.search(question)
    subject = next(g for g in m.groups() if g is not None).strip() if m else ""
    return subject or question


def pair_entity(obj: dict, question: str) -> str:
    """The entity of a question/answer record: its "entity" field (data/fetch_data.py writes one),
    else entity_of(question). prepare_sft.py splits by it; evaluations.py finds the trained-on pairs by it."""
    entity = obj.get("entity")
    return entity.strip() if isinstance(entity, str) and entity.strip() else entity_of(question)


def split_of(h: float, meta: dict) -> str:
    """"val" or "train": where a prepare script put the item with split hash h, by its meta.json
    (val_fraction, and the hashes ValReserve moved to the other split for small data)."""
    moved = meta.get("moved_hashes", {})
    for split in ("val", "train"):
        if h in moved.get(split, ()):
            return split
    return "val" if h < meta.get("val_fraction", 0) else "train"


def temp_path(path) -> Path:
    """Where path is written before it is complete: next to it, named for this process. A run
    removes those its killed predecessors left (remove_stale_temp_files)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


TEMP_GLOB = "*.tmp-*"


def remove_stale_temp_files(folder, pattern: str = TEMP_GLOB) -> None:
    """A kill between writing a temp file and os.replace leaves it behind (temp_path: name.tmp-PID);
    remove those in folder whose process is gone (a live one may still be writing)."""
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there
        return
    for p in sorted(Path(folder).glob(pattern)):
        pid = p.name.rpartition("-")[2]
        try:
            os.kill(int(pid), 0)  # raises ProcessLookupError once the process is gone
        except ProcessLookupError:
            p.unlink()
            print(f"removed {p}: left by an interrupted write of process {pid}, which is gone")
        except (ValueError, PermissionError):  # not a PID; a live process of another user
            pass


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """The one way this project writes a file: yield a temp path next to path (same folder, so
    os.replace is atomic); when the block ends without an error the temp file replaces path,
    otherwise it is removed. An interruption leaves the old file or none, never half a file.

        with atomic_path(out / "ckpt.pt") as tmp:
            torch.save(state, tmp)
    """
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2))


def write_jsonl_atomic(path: Path, records) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
