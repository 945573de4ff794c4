"""Paths mean what a user expects from any command line: relative to the current directory. That
holds for --out_dir and --input, for the data_dir a checkpoint recorded at training time (a flag
as the user typed it) and for data/raw/sft_test.jsonl; the data's source files are recorded by
prepare relative to the repository (or absolute outside it), so they are found from anywhere.
When one is missing the message names it. Run from a folder other than the repository's."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import PAIRS, ROOT, write_jsonl

import checkpoint
from data.splits import source_names


def run_in(cwd, script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def project(sft_model, tmp_path):
    """A folder laid out as training left it, with relative paths in the checkpoint: run/ (the
    checkpoint and its metrics), data/ (its data_dir) and sft.jsonl (its data's source)."""
    ckpt = checkpoint.read(sft_model)
    ckpt["config"]["data_dir"] = "data"
    ckpt["data_meta"]["sources"] = source_names([tmp_path / "sft.jsonl"])
    checkpoint.save(tmp_path / "run", ckpt, best=True)
    shutil.copy(sft_model / "metrics.jsonl", tmp_path / "run")
    shutil.copytree(sft_model.parent / "data", tmp_path / "data")
    write_jsonl(tmp_path / "sft.jsonl", PAIRS)
    write_jsonl(tmp_path / "test.jsonl", PAIRS[:4])
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def test_evaluations_and_visualize_read_and_write_relative_to_the_current_directory(project):
    proc = run_in(project, "evaluations.py", "--out_dir=run", "--input=test.jsonl", "--ppl_split=train",
                  "--report=True")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((project / "run" / "eval.json").read_text(encoding="utf-8"))
    assert results["samples"] == 4 and results["ppl_data"] == "data/train.bin" and results["perplexity"] > 1
    assert results["seen"]["samples"] == 4  # the trained-on pairs, from the recorded source sft.jsonl
    assert (project / "run" / "report.md").exists() and (project / "run" / "eval.png").exists()
    proc = run_in(project, "visualize.py", "--out_dir=run", "--save_path=curves.png")
    assert proc.returncode == 0, proc.stderr
    assert (project / "curves.png").exists() and (project / "run" / "eval.png").exists()


def test_missing_relative_paths_are_named(project):
    """From another folder the checkpoint's relative data_dir is not there, while its sources
    (recorded absolute, outside the repository) still are: the trained-on comparison runs. With the
    sources gone the evaluation still runs on --input and says which files are missing."""
    elsewhere = project / "elsewhere"
    proc = run_in(elsewhere, "evaluations.py", "--out_dir=../run", "--input=../test.jsonl", "--ppl_split=train")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((project / "run" / "eval.json").read_text(encoding="utf-8"))
    assert results["perplexity"] is None and results["seen"]["samples"] == 4
    assert f"data split 'train' unavailable (the checkpoint's data_dir, read from {elsewhere})" in results["ppl_note"]
    (project / "sft.jsonl").unlink()
    proc = run_in(elsewhere, "evaluations.py", "--out_dir=../run", "--input=../test.jsonl", "--ppl_split=train")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((project / "run" / "eval.json").read_text(encoding="utf-8"))["seen"] is None
    assert f"source files ({project / 'sft.jsonl'}) are missing" in proc.stderr
    # no --input: the SFT test split, data/raw/sft_test.jsonl, is looked for here too
    proc = run_in(elsewhere, "evaluations.py", "--out_dir=../run")
    assert proc.returncode == 1 and f"data/raw/sft_test.jsonl not found in {elsewhere}" in proc.stderr
    proc = run_in(elsewhere, "evaluations.py", "--out_dir=run")
    assert proc.returncode == 1 and "run/ckpt.pt: no checkpoint here" in proc.stderr
    proc = run_in(elsewhere, "visualize.py", "--out_dir=run")
    assert proc.returncode == 1 and "no metrics.jsonl with records in run" in proc.stderr
    assert "Traceback" not in proc.stderr
