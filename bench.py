"""MiniGLM's speed and memory figures: one JSON object a line, {"metric", "value", "unit"}.

    python bench.py                  # everything (builds the default corpus first if missing)
    python bench.py --only=prepare   # one group

Groups:
  prepare  prepare.py on the whole default corpus: tokens/s, wall time and the peak memory of
           its whole process tree (parent + workers, sampled from /proc), and its speedup over
           the same run with --num_workers=1; then
           data/bench_prepare.py: the pool's speedup over single-threaded encode_ordinary on the
           same text, and this machine's own 2-process ceiling, measured in the same run.
Figures are measured on the machine that runs this; compare ratios from one run, not seconds
across machines.
"""
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- defaults
only = ""                                  # a group name, or "" for all
corpus = "data/raw/pretrain.jsonl"
# -----------------------------------------------------------------------------


def metric(name: str, value: float, unit: str) -> None:
    print(json.dumps({"metric": name, "value": round(value, 3), "unit": unit}), flush=True)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc (Linux)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024


def run_sampled(cmd: list) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd, sampling its process tree's memory; returns (result, seconds, peak MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds, peak[0]


def bench_prepare() -> None:
    if not (ROOT / corpus).exists():
        subprocess.run([sys.executable, "data/fetch_data.py"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "data/prepare.py", f"--input={corpus}", f"--out_dir={tmp}"]
        _, seconds, peak = run_sampled(cmd)
        meta = json.loads((Path(tmp) / "meta.json").read_text(encoding="utf-8"))
        _, seconds_one, _ = run_sampled(cmd + ["--num_workers=1"])
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    metric("prepare_tokens_per_s", tokens / seconds, f"tokens/s ({tokens:,} tokens, mode {meta['mode']})")
    metric("prepare_seconds", seconds, "s")
    metric("prepare_peak_rss_mb", peak, "MB (parent + workers)")
    metric("prepare_workers_speedup", seconds_one / seconds, "x (default workers vs --num_workers=1)")
    result = subprocess.run([sys.executable, "data/bench_prepare.py", f"--input={corpus}"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    print(result.stdout, end="", flush=True)


GROUPS = {"prepare": bench_prepare}

if __name__ == "__main__":
    exec(open(ROOT / "configurator.py", encoding="utf-8").read())
    if only and only not in GROUPS:
        sys.exit(f"--only={only!r}: expected one of {', '.join(GROUPS)}")
    for name, fn in GROUPS.items():
        if not only or only == name:
            fn()
