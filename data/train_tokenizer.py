"""Train a byte-level BPE tokenizer on the pretraining corpus, with rustbpe (nanochat's trainer).

    python data/train_tokenizer.py                       # the default corpus -> data/tokenizer/zh.tiktoken
    python data/train_tokenizer.py --input="data/wiki-zh-subset-*.jsonl" --vocab_size=16384 \\
        --out_path=data/tokenizer/wiki.tiktoken

--input takes what prepare.py takes (a file, a folder, a glob or a comma-separated list of JSONL
files or JSON arrays of {"text"} objects), cleans each document as prepare.py does, and leaves
out the documents prepare.py puts in val (the same hash rule and --val_fraction), so held-out
text stays unseen by the tokenizer too. Bad records are reported and counted as prepare.py does.
Writes --out_path (tiktoken's ranks format: one "base64(token bytes) rank" a line; split pattern
data.tokenizer.TRAINED_PATTERN; EOT and PAD follow as special tokens, so the vocabulary is
--vocab_size) and out_path.sha256, through a temp file. The same input gives the same file.
Loading it needs only tiktoken (data.tokenizer.read_ranks, trained_encoding).
"""
import base64
import hashlib
import sys
import time
from importlib.util import find_spec
from pathlib import Path

if find_spec("configurator") is None:  # python data/x.py finds the shared modules through pip install -e .
    sys.exit("MiniGLM's modules are not installed in this Python: run pip install -r requirements.txt in its folder")

import rustbpe

from configurator import configure
from data.encode import cleaned_texts
from data.records import Report, atomic_path, expand_inputs, split_hash, write_text_atomic
from data.tokenizer import TRAINED_PATTERN, read_ranks, trained_encoding

# ----------------------------------------------------------------------------- defaults
input = "data/raw/pretrain.jsonl"
out_path = "data/tokenizer/zh.tiktoken"
vocab_size = 8192           # tokens, EOT and PAD included
val_fraction = 0.01         # as prepare.py: those documents are held out from the tokenizer too
# -----------------------------------------------------------------------------


def corpus(paths, report: Report, val_fraction: float, counts: dict):
    """The cleaned text of every usable training document (prepare.py's val left out), in file order."""
    for text in cleaned_texts(paths, report):
        if split_hash(text) < val_fraction:
            counts["held_out"] += 1
        else:
            counts["documents"] += 1
            counts["characters"] += len(text)
            yield text


if __name__ == "__main__":
    config = configure(globals())
    if not 258 <= vocab_size <= 65536:
        sys.exit(f"--vocab_size={vocab_size}: expected 258..65536 (256 bytes + EOT + PAD at least; "
                 "the .bin files hold uint16 ids)")
    if not 0 <= val_fraction < 1:
        sys.exit(f"--val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    report = Report()
    paths = expand_inputs(input, report)
    if not paths:
        sys.exit(f"no input files found for --input={input!r} (relative to the working directory {Path.cwd()}); "
                 "the default is what 'python data/fetch_data.py' builds: run from the repository root")
    counts = {"documents": 0, "held_out": 0, "characters": 0}
    t0 = time.time()
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(corpus(paths, report, val_fraction, counts), vocab_size - 2, pattern=TRAINED_PATTERN)
    seconds = time.time() - t0
    if counts["documents"] == 0:
        sys.exit(f"no usable documents in {len(paths)} file(s); {report.summary()}")
    ranks = {bytes(token): rank for token, rank in tokenizer.get_mergeable_ranks()}
    if len(ranks) < vocab_size - 2:
        print(f"note: the text has only enough distinct pairs for {len(ranks)} ranks (asked {vocab_size - 2})",
              file=sys.stderr)
    text = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="ascii")
        trained_encoding(read_ranks(tmp), out.stem)  # what loaders will do, before the file is in place
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()
    write_text_atomic(out.with_name(out.name + ".sha256"), f"{digest}  {out.name}\n")
    print(report.summary())
    print(f"trained on {counts['documents']:,} documents ({counts['characters']:,} characters; "
          f"{counts['held_out']:,} held out as val) in {seconds:.1f}s")
    print(f"wrote {out} ({len(ranks) + 2} tokens with EOT and PAD), sha256 {digest}")
