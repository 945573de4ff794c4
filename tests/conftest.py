"""Shared helpers: run a repo script in a subprocess, write small JSON/JSONL inputs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """python <script> args..., from the repo root, with this interpreter."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_meta(out_dir: Path) -> dict:
    return json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))


def read_bin(path: Path, dtype=np.uint16) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


@pytest.fixture(scope="session")
def enc():
    from data.tokenizer import get_tokenizer
    return get_tokenizer()
