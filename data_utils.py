"""Batches for train.py from the .bin files of data/prepare.py and data/prepare_sft.py.

    from data_utils import load_dataset, get_batch
    ds = load_dataset("data/processed_pretrain", "train")
    x, y, loss_mask = get_batch(ds, batch_size=8, device="cpu")   # (B, T) each
    x, y, loss_mask = batch_at(ds, [0, 256], device="cpu")        # the blocks at these offsets

x holds token ids, y is x shifted left by one (the next token), loss_mask (bool, aligned with y)
says which targets count:
  stream            random windows of block_size + 1 tokens; every target counts
  aligned / packed  whole blocks; a target counts unless it is PAD (all after a block's last EOT)
  sft, sft_packed   whole blocks of one pair (sft_packed: several whole pairs a train block); a
                    target counts where the prepare step marked an answer token or its closing
                    EOT; questions, the "答：" prompts and padding never do
The files are opened as np.memmap afresh for every batch, so RAM does not grow with the corpus.
"""
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import Tokenizer, tokenizer_of


@dataclass
class Dataset:
    path: Path            # the tokens .bin
    mask_path: Path | None
    meta: dict
    n_tokens: int

    @property
    def block_size(self) -> int:
        return self.meta["block_size"]

    @property
    def aligned(self) -> bool:
        return self.meta["block_aligned"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the data was made with, rebuilt from meta.json's record."""
        return tokenizer_of(self.meta, self.path.with_name("meta.json"))


def load_meta(data_dir) -> dict:
    """meta.json of a prepared folder; its tokenizer record must rebuild (tokenizer_of: a
    ValueError naming the file if not). Folders prepared before the tokenizer was recorded whole
    ("tokenizer": "gpt2" beside flat ids) still load."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: prepare the data first (python data/prepare.py "
                                f"or python data/prepare_sft.py with --out_dir={data_dir}, and the --tokenizer "
                                "the config names, if it names one)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}; re-run the prepare script")
    try:
        tokenizer_of(meta, path)
    except ValueError as e:
        raise ValueError(f"{e}; re-run the prepare script") from None
    return meta


def load_dataset(data_dir, split: str) -> Dataset:
    """One split of a prepared folder; checks that the files match meta.json."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    mask_path = Path(data_dir) / f"{split}_mask.bin" if meta["kind"] == "sft" else None
    want = meta["splits"][split]["file_tokens"]
    if not path.exists() or path.stat().st_size != 2 * want:
        have = path.stat().st_size // 2 if path.exists() else "no file"
        raise ValueError(f"{path}: {have} tokens on disk, meta.json says {want}: an interrupted or "
                         "mixed-up prepare run; re-run it")
    if mask_path is not None and (not mask_path.exists() or mask_path.stat().st_size != want):
        raise ValueError(f"{mask_path}: missing or not {want} bytes as meta.json says; re-run prepare_sft")
    if meta["block_aligned"] and want % meta["block_size"]:
        raise ValueError(f"{path}: {want} tokens is not a whole number of {meta['block_size']}-token blocks")
    need = meta["block_size"] + 1 if not meta["block_aligned"] else meta["block_size"]
    if want < need:
        raise ValueError(f"{path}: {want} tokens, fewer than one block of {need}; use more data")
    return Dataset(path, mask_path, meta, want)


def batch_starts(ds: Dataset, batch_size: int, generator: torch.Generator | None = None) -> list:
    """Token offsets of a random batch: whole blocks (aligned data) or windows (stream)."""
    if ds.aligned:
        starts = torch.randint(ds.n_tokens // ds.block_size, (batch_size,), generator=generator) * ds.block_size
    else:
        starts = torch.randint(ds.n_tokens - ds.block_size, (batch_size,), generator=generator)
    return starts.tolist()


def get_batch(ds: Dataset, batch_size: int, device="cpu", generator: torch.Generator | None = None):
    """A random batch (x, y, loss_mask), each (B, T) with T = the data's block_size, on device."""
    return batch_at(ds, batch_starts(ds, batch_size, generator), device)


def batch_at(ds: Dataset, starts: list, device="cpu"):
    """The batch (x, y, loss_mask) of the blocks (aligned data) or windows (stream) at these token
    offsets; evaluations.py walks a split with it, get_batch draws random ones."""
    T, B = ds.block_size, len(starts)
    data = np.memmap(ds.path, dtype=np.uint16, mode="r")
    if ds.aligned:
        x = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))
        # (B, T): the target of the last position is PAD, i.e. never counted
        pad_id = ds.tokenizer.pad_id
        y = torch.cat([x[:, 1:], torch.full((B, 1), pad_id, dtype=torch.int64)], dim=1)
        if ds.mask_path is not None:
            marks = np.memmap(ds.mask_path, dtype=np.uint8, mode="r")
            m = np.stack([marks[s + 1:s + T] for s in starts])  # mark of each target token
            mask = torch.cat([torch.from_numpy(m.astype(np.bool_)), torch.zeros(B, 1, dtype=torch.bool)], dim=1)
        else:
            mask = y != pad_id
    else:
        windows = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts]).astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        mask = torch.ones_like(y, dtype=torch.bool)
    device = torch.device(device)
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y, mask))
    return x.to(device), y.to(device), mask.to(device)
