"""data_utils.get_batch on every kind of prepared data: shapes, shift, masks, guards."""
import pytest
import torch
from conftest import run_script, write_jsonl
from test_prepare import corpus
from test_prepare_sft import pairs

from data.tokenizer import EOT_ID, PAD_ID
from data_utils import get_batch, load_dataset

BLOCK = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    src = write_jsonl(tmp / "docs.jsonl", corpus())
    dirs = {}
    for packing in ("stream", "aligned", "packed"):
        dirs[packing] = tmp / packing
        run_script("data/prepare.py", f"--input={src}", f"--out_dir={dirs[packing]}", f"--packing={packing}",
                   f"--block_size={BLOCK}", "--val_fraction=0.2")
    dirs["sft"] = tmp / "sft"
    run_script("data/prepare_sft.py", f"--input={write_jsonl(tmp / 'sft.jsonl', pairs())}",
               f"--out_dir={dirs['sft']}", f"--block_size={BLOCK}", "--val_fraction=0.2")
    return dirs


@pytest.mark.parametrize("packing", ["stream", "aligned", "packed", "sft"])
def test_batch_shapes_shift_and_dtypes(prepared, packing):
    ds = load_dataset(prepared[packing], "train")
    g = torch.Generator().manual_seed(0)
    x, y, mask = get_batch(ds, 8, "cpu", g)
    assert x.shape == y.shape == mask.shape == (8, BLOCK)
    assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1]), "y is x shifted by one"
    assert int(x.max()) <= PAD_ID
    if packing == "stream":
        assert mask.all()
    elif packing in ("aligned", "packed"):
        assert torch.equal(mask, y != PAD_ID)
        assert not mask[:, -1].any()


def test_sft_mask_selects_answer_and_eot(prepared, enc):
    ds = load_dataset(prepared["sft"], "train")
    x, y, mask = get_batch(ds, 16, "cpu", torch.Generator().manual_seed(1))
    answers = {p["answer"] for p in pairs()}
    for row_y, row_m, row_x in zip(y, mask, x):
        targets = row_y[row_m].tolist()
        assert targets[-1] == EOT_ID
        assert enc.decode(targets[:-1]) in answers
        first = int(row_m.nonzero()[0])
        assert enc.decode(row_x[:first + 1].tolist()).endswith("\n答："), "first target follows the prompt"


def test_batches_are_reproducible_with_a_generator(prepared):
    ds = load_dataset(prepared["packed"], "val")
    a = get_batch(ds, 4, "cpu", torch.Generator().manual_seed(3))
    b = get_batch(ds, 4, "cpu", torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_truncated_bin_is_refused(prepared, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(prepared["packed"], d)
    with open(d / "train.bin", "r+b") as f:
        f.truncate(BLOCK * 2 * 3 + 10)
    with pytest.raises(ValueError, match="interrupted or mixed-up prepare run"):
        load_dataset(d, "train")
    (d / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="prepare the data first"):
        load_dataset(d, "train")
