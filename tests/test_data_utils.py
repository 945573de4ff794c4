"""data_utils.get_batch on every kind of prepared data: shapes, shift, masks, guards."""
import json
import shutil

import pytest
import torch
from conftest import run_script, write_jsonl
from test_prepare import corpus
from test_prepare_sft import pairs

from data.tokenizer import load_tokenizer
from data_utils import get_batch, load_dataset, load_meta

GPT2 = load_tokenizer("gpt2")
EOT_ID, PAD_ID = GPT2.eot_id, GPT2.pad_id

BLOCK = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    src = write_jsonl(tmp / "docs.jsonl", corpus())
    dirs = {}
    for packing in ("stream", "aligned", "packed"):
        dirs[packing] = tmp / packing
        run_script("data/prepare.py", f"--input={src}", f"--out_dir={dirs[packing]}", f"--packing={packing}",
                   f"--block_size={BLOCK}", "--val_fraction=0.2", "--tokenizer=gpt2")
    dirs["sft"] = tmp / "sft"
    run_script("data/prepare_sft.py", f"--input={write_jsonl(tmp / 'sft.jsonl', pairs())}",
               f"--out_dir={dirs['sft']}", f"--block_size={BLOCK}", "--val_fraction=0.2", "--tokenizer=gpt2")
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
        ends = [i for i, t in enumerate(targets) if t == EOT_ID]  # packed rows hold several answers
        assert all(enc.decode(targets[a + 1:b]) in answers for a, b in zip([-1] + ends, ends))
        first = int(row_m.nonzero()[0])
        assert enc.decode(row_x[:first + 1].tolist()).endswith("\n答："), "first target follows the prompt"


def test_batches_are_reproducible_with_a_generator(prepared):
    ds = load_dataset(prepared["packed"], "val")
    a = get_batch(ds, 4, "cpu", torch.Generator().manual_seed(3))
    b = get_batch(ds, 4, "cpu", torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_truncated_bin_is_refused(prepared, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(prepared["packed"], d)
    with open(d / "train.bin", "r+b") as f:
        f.truncate(BLOCK * 2 * 3 + 10)
    with pytest.raises(ValueError, match="interrupted or mixed-up prepare run"):
        load_dataset(d, "train")
    (d / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="prepare the data first"):
        load_dataset(d, "train")


def test_batches_of_trained_tokenizer_data_mask_its_own_pad(tmp_path, zh_tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus())
    run_script("data/prepare.py", f"--input={src}", f"--out_dir={tmp_path / 'zh'}", "--packing=packed",
               f"--block_size={BLOCK}", "--val_fraction=0.2", f"--tokenizer={zh_tokenizer}")
    ds = load_dataset(tmp_path / "zh", "train")
    tok = ds.tokenizer
    assert tok is load_tokenizer(str(zh_tokenizer)) and tok.pad_id == 511
    x, y, mask = get_batch(ds, 8, "cpu", torch.Generator().manual_seed(0))
    assert int(x.max()) <= tok.pad_id and (y == tok.pad_id).any()
    assert torch.equal(mask, y != tok.pad_id)


def _write_meta(d, meta):
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return d


def test_a_broken_tokenizer_record_is_named_and_old_gpt2_metas_still_load(prepared, tmp_path, zh_tokenizer):
    meta = json.loads((prepared["packed"] / "meta.json").read_text(encoding="utf-8"))
    old = {k: v for k, v in meta.items() if k != "tokenizer"} | {
        "tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256, "pad_id": 50257, "model_vocab_size": 50304,
        "dtype": "uint16"}
    d = tmp_path / "old"
    shutil.copytree(prepared["packed"], d)
    _write_meta(d, old)
    assert load_dataset(d, "train").tokenizer is GPT2
    zh = load_tokenizer(str(zh_tokenizer)).meta()
    for name, record, words in [
            ("unknown", "llama", "tokenizer 'llama' is not one this code knows"),
            ("damaged", zh | {"ranks": zh["ranks"][:-20]}, "do not match their sha256"),
            ("no_ranks", {k: v for k, v in zh.items() if k != "ranks"}, "recorded without its ranks"),
            ("wrong_ids", GPT2.meta() | {"pad_id": 7}, "records pad_id=7"),
            ("old_ids", old | {"eot_id": 0}, "records eot_id=0")]:
        path = _write_meta(tmp_path / name, meta | {"tokenizer": record} if name != "old_ids" else record)
        with pytest.raises(ValueError, match=words) as e:
            load_meta(path)
        assert str(path / "meta.json") in str(e.value) and "re-run the prepare script" in str(e.value)
