"""MiniGLM's data code: the tokenizer, the record readers and the prepare/fetch scripts.

The scripts here run as `python data/prepare.py`, which puts data/ (not the repository) first on
sys.path: they find `data`, `configurator`, ... through `pip install -e .` (the last line of
requirements.txt). That install points at one clone; a script of another clone run with the same
Python would silently use the first clone's code, so it stops here and says what to do.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0].endswith(".py") else None
if (_SCRIPT is not None and _SCRIPT.parent.name == "data" and (_SCRIPT.parents[1] / "pyproject.toml").exists()
        and _SCRIPT.parents[1] != _HERE):
    sys.exit(f"{_SCRIPT} belongs to the MiniGLM folder {_SCRIPT.parents[1]}, but this Python imports MiniGLM's "
             f"modules from {_HERE}: run `pip install -r requirements.txt` in {_SCRIPT.parents[1]} "
             "(or use that folder's own .venv)")
