"""Every kind of bad user input: a file:line message, a count, no traceback, no half-written output."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, read_meta, run_script, write_jsonl

GOOD = {"title": "好", "text": "这是一篇好文章。它有两句话。"}


def good_lines(n=30):
    return [json.dumps({"title": f"t{i}", "text": f"第{i}篇文章。内容完整。"}, ensure_ascii=False) for i in range(n)]


def prepare(tmp_path, src, check=False, *extra):
    return run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", f"--out_dir={tmp_path / 'out'}",
                      "--block_size=64", "--val_fraction=0.3", *extra, check=check)


def assert_clean_failure(proc, out_dir):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert not list(out_dir.glob("*.bin")) if out_dir.exists() else True
    assert not list(out_dir.glob("*.tmp-*")) if out_dir.exists() else True


BAD_LINES = {
    "invalid_json": (b'{"text": "broken\n', "malformed JSON"),
    "missing_text": (b'{"title": "no text"}\n', 'no "text" field'),
    "bad_text": (b'{"text": 42}\n', '"text" must be a string'),
    "empty_text": ('{"text": "  \\n\\n "}\n'.encode(), "empty after cleaning"),
    "invalid_utf8": (b'{"text": "\xff\xfe bad bytes"}\n', "invalid UTF-8"),
    "not_object": (b'["a", "list"]\n', "expected a JSON object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_is_reported_with_file_line_and_counted(tmp_path, kind):
    bad, message = BAD_LINES[kind]
    lines = good_lines()
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(lines[:5]) + "\n").encode() + bad + ("\n".join(lines[5:]) + "\n").encode())
    proc = prepare(tmp_path, src, True)
    assert f"{src}:6: " in proc.stderr and message in proc.stderr
    assert f"{kind}=1" in proc.stdout
    meta = read_meta(tmp_path / "out")
    assert meta["problems"] == {kind: 1}
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30


def test_bom_and_crlf_are_accepted_and_counted(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(good_lines()).encode() + b"\r\n")
    proc = prepare(tmp_path, src, True)
    meta = read_meta(tmp_path / "out")
    assert meta["problems"] == {"bom_removed": 1, "crlf_lines": 30}
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    assert "byte-order mark" in proc.stderr


def test_crlf_inside_text_is_normalised(tmp_path, enc):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"第{i}行。\r\n第二行。"} for i in range(20)])
    prepare(tmp_path, src, True, "--packing=stream")
    tokens = [t for s in ("train", "val") for t in open(tmp_path / "out" / f"{s}.bin", "rb").read()]
    text = enc.decode([int.from_bytes(bytes(tokens[i:i + 2]), "little") for i in range(0, len(tokens), 2)])
    assert "\r" not in text and text.count("\n第二行") == 20


def test_empty_file_fails_with_a_message(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    proc = prepare(tmp_path, src)
    assert_clean_failure(proc, tmp_path / "out")
    assert f"{src}: file is empty" in proc.stderr
    assert "no usable documents" in proc.stderr and "empty_file=1" in proc.stderr


def test_missing_path_fails_with_a_message(tmp_path):
    proc = prepare(tmp_path, tmp_path / "nope.jsonl")
    assert_clean_failure(proc, tmp_path / "out")
    assert "no such file or folder" in proc.stderr and "fetch_data.py" in proc.stderr
    proc = prepare(tmp_path, tmp_path / "wiki-*.jsonl")
    assert "no file matches this pattern" in proc.stderr


def test_nothing_usable_exits_nonzero_and_writes_nothing(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"title": "x"}\nnot json\n')
    proc = prepare(tmp_path, src)
    assert_clean_failure(proc, tmp_path / "out")
    assert "missing_text=1" in proc.stderr and "invalid_json=1" in proc.stderr


def test_json_array_errors_name_the_line(tmp_path):
    src = tmp_path / "arr.json"
    src.write_text('[\n  {"text": "第一篇。"},\n  {"title": "x"},\n  {"text": "第三篇。"},\n  {"text": oops}\n]',
                   encoding="utf-8")
    proc = prepare(tmp_path, src, False, "--val_fraction=0")
    assert f"{src}:3: record has no \"text\" field" in proc.stderr
    assert f"{src}:5: malformed JSON in array item 3" in proc.stderr
    assert proc.returncode == 0


def test_bad_config_values_name_the_key(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    for arg, message in [("--blok_size=64", "unknown key 'blok_size'"),
                         ("--block_size=big", "block_size expects int"),
                         ("--packing=random", "expected one of stream, aligned, packed"),
                         ("--val_fraction=1.5", "expected 0 <= val_fraction < 1")]:
        proc = run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", arg, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (arg, proc.stderr)
        assert "Traceback" not in proc.stderr
    cfg = tmp_path / "cfg.py"
    cfg.write_text("block_size = 128\nlearning_rate = 1e-3\n")
    proc = run_script("data/prepare.py", str(cfg), check=False)
    assert proc.returncode != 0 and "unknown key 'learning_rate'" in proc.stderr


def test_interrupted_run_leaves_previous_output_valid(tmp_path):
    """SIGINT mid-run: no temp file survives and the previous complete output is untouched."""
    out = tmp_path / "out"
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"第{i}篇。"} for i in range(40)])
    prepare(tmp_path, small, True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = tmp_path / "big.jsonl"
    body = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 40
    big.write_text("".join(json.dumps({"text": f"{i}{body}"}, ensure_ascii=False) + "\n" for i in range(40000)),
                   encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "data/prepare.py"), "--tokenizer=gpt2", f"--input={big}", f"--out_dir={out}",
                             "--block_size=64", "--num_workers=2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob("train.bin.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(out.glob("train.bin.tmp-*")), "prepare never started writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted" in stderr and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_renamed_flag_names_the_new_one(tmp_path):
    """--mode became --packing: the old name exits with the new one, on the command line and in a
    config file, and is not taken as an alias."""
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    proc = run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", f"--out_dir={tmp_path / 'out'}", "--mode=packed",
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "argument '--mode=packed': mode was renamed: use --packing=packed" in proc.stderr
    assert not (tmp_path / "out").exists()
    cfg = tmp_path / "cfg.py"
    cfg.write_text('mode = "stream"\n')
    proc = run_script("data/prepare.py", str(cfg), check=False)
    assert proc.returncode != 0 and f"config file {cfg}: mode was renamed: use packing = 'stream'" in proc.stderr


def test_configurator_renamed_keys():
    from configurator import configure
    g = {"packing": "packed", "RENAMED_KEYS": {"mode": "packing"}}
    with pytest.raises(SystemExit, match="mode was renamed: use --packing=aligned"):
        configure(g, ["--mode=aligned"])
    assert configure(g, ["--packing=aligned"]) == {"packing": "aligned"}, "RENAMED_KEYS is no config key"
    with pytest.raises(SystemExit, match="unknown key 'mode'"):
        configure({"packing": "packed"}, ["--mode=aligned"])


@pytest.mark.parametrize("script", ["data/prepare.py", "data/prepare_sft.py", "data/bench_prepare.py"])
def test_missing_default_input_says_where_to_run(tmp_path, script):
    """The default --input is relative to the working directory: run elsewhere, the message says
    to run from the repository root or to pass --input, and names the directory it looked in."""
    proc = subprocess.run([sys.executable, str(ROOT / script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data/raw/" in proc.stderr and str(tmp_path) in proc.stderr
    assert "repository root" in proc.stderr and "--input=" in proc.stderr
    assert not (tmp_path / "data").exists(), "nothing is written for a run that found no input"
