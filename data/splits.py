"""What prepare.py and prepare_sft.py share on the output side, written once.

    report, paths, out, tok = start_prepare(config, "your files")   # checks, inputs, tokenizer, out_dir
    writers = {s: SplitWriter(out / f"{s}.bin") for s in ("train", "val")}
    reserve = ValReserve("documents", val_fraction)            # small data still gets both splits
    ...
    commit_outputs(out, writers.values(), meta)                 # .bin files, then meta.json last

A split is written as it comes to a temp file (data.records.temp_path) and only moved into
place when the run completes, so an interruption leaves the previous output or none.
"""
import json
import os
import sys
from collections import Counter
from pathlib import Path

from data.records import ROOT, Report, expand_inputs, remove_stale_temp_files, temp_path, write_json_atomic
from data.tokenizer import Tokenizer, open_tokenizer


class ValReserve:
    """Small data must still get both splits. Keeps back, in arrival order, the train items
    whose split hash is the lowest so far and the val items whose hash is the highest so far
    (about ln(n) items each, plus copies with the same hash). At the end, if no item is in val,
    those with the lowest hash of all go there; if none is in train, those with the highest go
    there; a single item goes to train. So two or more usable items always give two non-empty
    splits. What is kept depends only on the items' order, not on batch sizes or worker counts."""

    def __init__(self, unit: str, val_fraction: float):
        self.unit = unit          # "documents", "pairs": for the messages
        self.val_fraction = val_fraction
        self.low, self.high = 2.0, -1.0
        self.items = []           # (hash, item)
        self.moved = {"val": 0, "train": 0}  # items settle moved out of their own split
        self.moved_hashes = {"val": [], "train": []}  # their split hashes, for split_of

    def keep(self, h: float, item) -> bool:
        """Keep item back; False: write it now to its split (val when h < val_fraction)."""
        if self.val_fraction == 0:
            return False
        if h < self.val_fraction:
            if h < self.high:
                return False
            self.high = h
        else:
            if h > self.low:
                return False
            self.low = h
        self.items.append((h, item))
        return True

    def settle(self, n_train: int, n_val: int) -> tuple[list, list]:
        """(items for val, items for train), each in arrival order, given the numbers of items
        already written to each split; prints what it did."""
        if self.val_fraction == 0:  # no val split asked for: nothing was kept
            return [], []
        is_val = [h < self.val_fraction for h, _ in self.items]
        n_train += is_val.count(False)
        n_val += is_val.count(True)
        n_items, move, to = n_train + n_val, set(), ""
        if n_items == 1:
            move, to = {i for i, v in enumerate(is_val) if v}, "train"
            print(f"warning: only 1 usable {self.unit.removesuffix('s')}: wrote train only, the val "
                  "split is empty (training then picks checkpoints by train loss)", file=sys.stderr)
        elif n_items and (n_val == 0 or n_train == 0):
            to, edge = ("val", self.low) if n_val == 0 else ("train", self.high)
            move = {i for i, (h, _) in enumerate(self.items) if h == edge}
            same = len(move) == n_items
            if same:
                move = {min(move)}
            print(f"note: no {self.unit} fell in {to} (val_fraction={self.val_fraction}, {n_items} "
                  f"{self.unit}); moved {len(move)} with the {'lowest' if to == 'val' else 'highest'} "
                  f"split hash there" + ("; they all share one split key, so val repeats train" if same else ""),
                  file=sys.stderr)
        split = [to if i in move else "val" if v else "train" for i, v in enumerate(is_val)]
        for (h, _), where, v in zip(self.items, split, is_val):
            if where != ("val" if v else "train"):
                self.moved[where] += 1
                self.moved_hashes[where].append(h)
        return ([item for (_, item), s in zip(self.items, split) if s == "val"],
                [item for (_, item), s in zip(self.items, split) if s == "train"])


def start_prepare(config: dict, hint: str) -> tuple[Report, list[Path], Path, Tokenizer]:
    """The start both prepare scripts share: check block_size and val_fraction, print the config,
    find the --input files (none: exit saying what to pass, hint), open --tokenizer (exit with the
    message) and make --out_dir, without the temp files a killed earlier run left. The path flags
    are relative to the working directory."""
    block_size, val_fraction = config["block_size"], config["val_fraction"]
    if not 16 <= block_size <= 65536:
        sys.exit(f"--block_size={block_size}: expected 16..65536")
    if not 0 <= val_fraction < 1:
        sys.exit(f"--val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    print(json.dumps(config, ensure_ascii=False))
    report = Report()
    paths = expand_inputs(config["input"], report)
    if not paths:
        sys.exit(f"no input files found for --input={config['input']!r} (relative to the working directory "
                 f"{os.getcwd()}). The default input is what 'python data/fetch_data.py' builds, read from "
                 f"the repository root: run from there, or pass {hint} with --input=")
    tok = open_tokenizer(config["tokenizer"])
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    return report, paths, out, tok


def source_names(paths) -> list[str]:
    """The input files as meta.json records them, for evaluations.py to find again from any
    working directory: relative to the repository root when inside it, else absolute."""
    names = []
    for p in paths:
        p = Path(p).resolve()
        names.append(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p))
    return names


def source_paths(names) -> list[Path]:
    """The files a meta.json's "sources" names (source_names), wherever the reader runs."""
    return [ROOT / n for n in names]  # an absolute name stays itself: ROOT / "/x" is "/x"


def commit_outputs(out: Path, writers, meta: dict) -> None:
    """Move finished .bin files into place, meta.json last: without meta.json the .bin files
    are never used, so an interruption at any point leaves nothing that looks valid."""
    (out / "meta.json").unlink(missing_ok=True)
    for w in writers:
        w.commit()
    write_json_atomic(out / "meta.json", meta)


class SplitWriter:
    """Writes one split as it comes to its temp file (temp_path); commit() moves the finished
    file into place, discard() removes it: the streaming form of atomic_path."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = temp_path(path)
        self.f = open(self.tmp, "wb")
        self.stats = Counter()

    def write(self, arr) -> None:
        self.f.write(arr.tobytes())
        self.stats["file_tokens"] += len(arr)

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)
