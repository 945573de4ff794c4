"""Where things are: the data code under one import name, the library modules installable.

A script in data/ runs as `python data/prepare.py`, which puts data/ first on sys.path, so a bare
`from records import ...` there would still work, and load a second copy of the module beside
data.records (two Report classes, two caches). These tests keep every import on the one name.
"""
import ast
import os
import shutil
import json
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT, write_jsonl

# Scripts: run, never imported (STYLE.md 15). Every other top-level .py file is a library module.
SCRIPTS = {"train", "sample", "sample_gradio", "evaluations", "visualize", "bench", "export"}
DATA_MODULES = sorted(p.stem for p in (ROOT / "data").glob("*.py") if p.stem != "__init__")


def python_files():
    skip = {".venv", ".git", "__pycache__", "node_modules"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def bare_data_imports(path) -> list[str]:
    """'file:line: import X' for every import of a data/ module by its bare name in path."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in DATA_MODULES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name!r}; "
                             f"write data.{name}")
    return found


def test_data_modules_are_found():
    assert {"records", "tokenizer", "blocks", "prepare", "prepare_sft", "fetch_data"} <= set(DATA_MODULES)
    assert len(python_files()) > 10


def test_no_file_imports_a_data_module_by_its_bare_name():
    found = [f for p in python_files() for f in bare_data_imports(p)]
    assert not found, "\n".join(found)


def test_a_data_script_loads_each_module_once(tmp_path):
    """python data/prepare.py, run the way users run it: -X importtime lists every module it
    imports; none of data/'s modules may appear under its bare name."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"第{i}篇。内容完整。"} for i in range(4)])
    proc = subprocess.run([sys.executable, "-X", "importtime", "data/prepare.py", "--tokenizer=gpt2", f"--input={src}",
                           f"--out_dir={tmp_path / 'out'}", "--num_workers=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
    assert "data.records" in imported and "data.tokenizer" in imported and "data.blocks" in imported
    twice = sorted(set(imported) & set(DATA_MODULES))
    assert not twice, f"data/prepare.py loads {twice} under a bare name beside data.*"
    assert json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))["kind"] == "pretrain"


def test_library_modules_are_listed_in_pyproject():
    """pip install -e . makes only what pyproject.toml lists importable from outside the repo root
    (a data/ script, the web app): every top-level module that is not a script must be there."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(setuptools["py-modules"])
    present = {p.stem for p in ROOT.glob("*.py")}
    missing = sorted(present - SCRIPTS - listed)
    print("library modules:", sorted(present - SCRIPTS), "listed:", sorted(listed))
    assert not missing, f"add to pyproject.toml's py-modules: {missing}"
    assert not listed & SCRIPTS, f"scripts are not library modules: {sorted(listed & SCRIPTS)}"
    assert not listed - present, f"listed but not present: {sorted(listed - present)}"
    assert "data" in setuptools["packages"]


def test_data_modules_define_the_sentence_end_rule_once():
    """data.records.SENTENCE_END is the one sentence-end rule; no other data/ module compiles its own."""
    copies = []
    for path in sorted((ROOT / "data").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            copies += [f"{path.name}:{node.lineno}: {t.id}" for t in targets
                       if isinstance(t, ast.Name) and "SENTENCE_END" in t.id and path.name != "records.py"]
    assert not copies, copies


def imported_modules(path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every absolute import in path, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_scripts_are_leaves():
    """No script or library module imports a script (train, sample, ..., data/prepare.py): they
    import library modules only (STYLE.md 15). Tests may import a script's functions to test them."""
    data_scripts = {p.stem for p in (ROOT / "data").glob("*.py") if "__main__" in p.read_text(encoding="utf-8")}
    code = [p for p in python_files() if p.parent != ROOT / "tests"]
    found = [f"{p.relative_to(ROOT)}:{line}: imports the script {name}"
             for p in code for line, name in imported_modules(p) if name in SCRIPTS]
    found += [f"{p.relative_to(ROOT)}:{node.lineno}: imports the script data/{node.module[5:]}.py"
              for p in code for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
              if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("data.")
              and node.module[5:] in data_scripts]
    assert not found, "\n".join(found)


def test_files_are_short_enough_to_read_in_one_sitting():
    """STYLE.md 14 and issue 11: no file over 400 lines; sample.py, a thin CLI over engine.py, at most 150."""
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in python_files()}
    assert sizes["sample.py"] <= 150, sizes["sample.py"]
    long = {name: n for name, n in sizes.items() if n > 400}
    assert not long, long


@pytest.mark.parametrize("script", ["data/prepare.py", "data/prepare_sft.py", "data/fetch_data.py", "data/train_tokenizer.py",
                                    "data/bench_prepare.py"])
def test_a_data_script_without_the_install_says_what_to_do(script):
    """python -S: no site-packages, as in a Python where requirements.txt (and its -e .) was never installed."""
    proc = subprocess.run([sys.executable, "-S", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "MiniGLM's modules are not installed in this Python" in proc.stderr


def test_a_data_script_of_another_clone_refuses_this_clones_modules(tmp_path):
    """The editable install points at one folder: a second clone's data script run with the same
    Python would run the first clone's code; it stops and names both folders."""
    (tmp_path / "data").mkdir()
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    shutil.copy(ROOT / "data" / "prepare_sft.py", tmp_path / "data" / "prepare_sft.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "data/prepare_sft.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"belongs to the MiniGLM folder {tmp_path}" in proc.stderr and str(ROOT) in proc.stderr
