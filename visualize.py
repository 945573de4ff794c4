"""Plots and the report of a run (report.py): loss curves from metrics.jsonl; Rouge-L and the
graders' rates from eval.json / eval_samples.jsonl (evaluations.py); report.md, the material to
hand in.

    python visualize.py --out_dir=out                      # out/loss.png (and out/eval.png once evaluated)
    python visualize.py --out_dir=out-cpu,out-cpu-sft      # several runs in one figure: out-cpu/loss_runs.png
    python visualize.py --out_dir=out-sft --report=True    # also out-sft/report.md

Folders and --save_path are relative to the current directory. Chinese labels need a CJK font
(Debian: apt-get install fonts-noto-cjk); without one the labels are English.
"""
import sys
from pathlib import Path

from configurator import configure
from report import cjk_font, plot_eval, plot_losses, write_report

# ----------------------------------------------------------------------------- defaults
out_dir = "out"             # one run, or several separated by commas
save_path = ""              # "" = out_dir/loss.png (one run) or <first out_dir>/loss_runs.png (several)
report = False              # also write out_dir/report.md (one run)
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    config = configure(globals())
    dirs = [Path(d) for d in out_dir.split(",") if d]
    if not dirs:
        sys.exit("--out_dir: expected one or more run folders, separated by commas")
    if not cjk_font():
        print("no CJK font found: labels are in English (Debian: apt-get install fonts-noto-cjk)", file=sys.stderr)
    save = Path(save_path) if save_path else dirs[0] / ("loss.png" if len(dirs) == 1 else "loss_runs.png")
    try:
        print(f"wrote {plot_losses(dirs, save)}")
    except FileNotFoundError as e:
        sys.exit(str(e))
    for d in dirs:
        if (png := plot_eval(d)) is not None:
            print(f"wrote {png}")
    if report:
        if len(dirs) > 1:
            sys.exit("--report: one --out_dir at a time")
        if not (dirs[0] / "ckpt.pt").exists():
            sys.exit(f"--report: {dirs[0] / 'ckpt.pt'} not found; the report describes a trained checkpoint")
        try:
            print(f"wrote {write_report(dirs[0])}")
        except ValueError as e:  # a checkpoint that is not ours, or is damaged: checkpoint.read says which
            sys.exit(str(e))
