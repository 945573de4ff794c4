"""The plots and the report of a run, for evaluations.py --report and visualize.py.

    from report import plot_losses, write_report
    plot_losses([Path("out-cpu"), Path("out-cpu-sft")], Path("out-cpu/loss_runs.png"))
    write_report(Path("out-sft"))        # out-sft/report.md, with out-sft/loss.png and eval.png

Loss curves come from metrics.jsonl (train.py); Rouge-L and the graders' rates from eval.json and
eval_samples.jsonl (evaluations.py); the evaluation table's rows from metrics.EVAL, a failed
graders' check (above its limit, such as rare_char_rate over 1%) marked in it, and each sample
answer's rare characters shown beside it. Chinese labels
use a CJK font when one is installed (Noto Sans CJK from Debian's fonts-noto-cjk, WenQuanYi,
Source Han, SimHei, Microsoft YaHei, PingFang); without one the labels are English so the figures
still draw. Headless (the Agg backend): files only.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager  # noqa: E402

import checkpoint  # noqa: E402
from data.records import Report, atomic_path, read_records, write_text_atomic  # noqa: E402
from metrics import COMMON_SHARE, EVAL, FLAGS, SPLIT_ONLY, show, table_rows  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")
LABELS = {
    True: {"iter": "迭代步数", "loss": "损失", "lr": "学习率", "train": "训练", "val": "验证",
           "title": "训练曲线", "rouge": "Rouge-L F1", "count": "样本数", "rate": "比例",
           "hist": "Rouge-L 分布", "rates": "评审检查", "empty_rate": "空回答", "garbled_rate": "乱码",
           "repetition_rate": "重复", "truncation_rate": "截断", "rare_answer_rate": "罕见字"},
    False: {"iter": "iteration", "loss": "loss", "lr": "learning rate", "train": "train", "val": "val",
            "title": "training curves", "rouge": "Rouge-L F1", "count": "answers", "rate": "rate",
            "hist": "Rouge-L distribution", "rates": "graders' checks", "empty_rate": "empty",
            "garbled_rate": "garbled", "repetition_rate": "repetitive", "truncation_rate": "truncated",
            "rare_answer_rate": "rare chars"},
}


def cjk_font() -> str | None:
    """The first installed CJK font of CJK_FONTS, made matplotlib's sans-serif; None if there is none."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    name = next((f for f in CJK_FONTS if f in installed), None)
    if name:
        plt.rcParams["font.sans-serif"] = [name, "DejaVu Sans"]
        plt.rcParams["axes.unicode_minus"] = False
    return name


def labels() -> dict:
    return LABELS[cjk_font() is not None]


def read_metrics(path: Path) -> tuple[list, list]:
    """(train records, val records) of a metrics.jsonl; bad lines are reported with file:line."""
    report, train, val = Report(), [], []
    for where, r in read_records(path, report):
        if r.get("split") == "train" and isinstance(r.get("loss"), (int, float)) and isinstance(r.get("iter"), int):
            train.append(r)
        elif r.get("split") == "val" and isinstance(r.get("iter"), int):
            val.append(r)
        else:
            report.add("bad_metric", where,
                       "expected {\"iter\", \"split\": \"train\" with \"loss\" or \"val\"}; skipped")
    if report.counts:
        print(f"{path}: {report.summary()}", file=sys.stderr)
    return train, val


def plot_losses(out_dirs: list, save: Path) -> Path:
    """Train (thin) and val (dots) loss against iteration for each run; the learning rate of the
    first run on a second axis. FileNotFoundError if no run has a metrics.jsonl with records."""
    t = labels()
    fig, ax = plt.subplots(figsize=(9, 5))
    lr_ax = ax.twinx()
    drawn = 0
    for k, d in enumerate(out_dirs):
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            print(f"{path}: not found (train.py writes it); run skipped", file=sys.stderr)
            continue
        train, val = read_metrics(path)
        color, name = f"C{k}", Path(d).name
        if train:
            ax.plot([r["iter"] for r in train], [r["loss"] for r in train], color=color, lw=1, alpha=0.8,
                    label=f"{name} {t['train']}")
        points = [(r["iter"], r["val_loss"]) for r in val if isinstance(r.get("val_loss"), (int, float))]
        if points:
            ax.plot(*zip(*points, strict=True), "o--", color=color, ms=4, label=f"{name} {t['val']}")
        if k == 0 and train:
            lr_ax.plot([r["iter"] for r in train], [r["lr"] for r in train], color="gray", lw=0.8, alpha=0.5)
        drawn += bool(train or points)
    if not drawn:
        plt.close(fig)
        raise FileNotFoundError(f"no metrics.jsonl with records in {', '.join(map(str, out_dirs))}")
    ax.set(xlabel=t["iter"], ylabel=t["loss"], title=t["title"])
    lr_ax.set_ylabel(t["lr"], color="gray")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, save)


def plot_eval(out: Path) -> Path | None:
    """out/eval.png: the Rouge-L histogram of eval_samples.jsonl and the rates of eval.json."""
    if not (out / "eval.json").exists() or not (out / "eval_samples.jsonl").exists():
        return None
    t = labels()
    results = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    scores = [s["rouge_l"] for s in held_out_samples(out) if isinstance(s.get("rouge_l"), (int, float))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.hist(scores, bins=20, range=(0, 1), color="C0")
    left.set(xlabel=t["rouge"], ylabel=t["count"], title=f"{t['hist']} (n={len(scores)})")
    names = list(FLAGS.values())
    rates = [results.get(n) for n in names]  # None: n/a (truncation of a continuation, rare chars without data)
    bars = right.bar([t[n] for n in names], [r or 0 for r in rates], color=["C1", "C3", "C4", "C2", "C5"])
    right.bar_label(bars, labels=["n/a" if r is None else f"{r:.1%}" for r in rates])
    right.set(ylim=(0, 1), ylabel=t["rate"], title=t["rates"])
    fig.tight_layout()
    return save_figure(fig, out / "eval.png")


def held_out_samples(out: Path) -> list:
    """The held-out answers of eval_samples.jsonl (not those to questions the model trained on)."""
    path = out / "eval_samples.jsonl"
    return [s for _, s in read_records(path, Report()) if s.get("set", "held_out") == "held_out"] \
        if path.exists() else []


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix[1:])  # the temp name's suffix is not .png
    plt.close(fig)
    return path


def one_line(text: str) -> str:
    """Text for a Markdown list item: line breaks shown as " / "."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def write_report(out: Path) -> Path:
    """out/report.md: data, training, evaluation, sample answers good and bad, and the plots."""
    out = Path(out)
    ckpt = checkpoint.read(out, mmap=True)  # the metadata only: the weights stay on disk
    meta, cfg, args = ckpt["data_meta"], ckpt["config"], ckpt["model_args"]
    with torch.device("meta"):
        n_params = GPT(GPTConfig(**args)).num_params()
    train, val = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else ([], [])
    loss_png = plot_losses([out], out / "loss.png") if train or val else None
    eval_png = plot_eval(out)
    lines = [f"# MiniGLM 实验报告：`{out.name}`", "",
             f"检查点 `{out.name}/ckpt.pt`，{'SFT（问答）' if meta.get('kind') == 'sft' else '预训练（续写）'}模型。",
             "",
             "## 数据", "", f"- 来源：{', '.join(map(str, meta.get('sources', []))) or '未记录'}",
             f"- 分词器 {checkpoint.tokenizer(ckpt).describe()}，模型词表 {args['vocab_size']} 行，块长 {meta.get('block_size')}，"
             f"打包方式 {meta.get('packing', meta.get('mode'))}，验证集比例 {meta.get('val_fraction')}", "",
             "| 划分 | 文档/问答对 | tokens | 块 | 填充比例 |", "|---|---|---|---|---|"]
    for split, s in meta.get("splits", {}).items():
        docs = s.get("documents", s.get("pairs", 0))
        lines.append(f"| {split} | {docs:,} | {s.get('tokens', 0):,} | {s.get('blocks', 0):,} | "
                     f"{show(s.get('padding_fraction'))} |")
    lines += ["", "## 训练", "",
              f"- 模型：{args['n_layer']} 层，{args['n_embd']} 宽，{args['n_head']} 头，块长 {args['block_size']}，"
              f"{n_params / 1e6:.1f}M 参数",
              f"- 设置：init_from={cfg.get('init_from')}，batch_size={cfg.get('batch_size')} × "
              f"gradient_accumulation_steps={cfg.get('gradient_accumulation_steps')}，learning_rate={cfg.get('learning_rate')}，"
              f"max_iters={cfg.get('max_iters')}，device={cfg.get('device') or 'auto'}，data_dir={cfg.get('data_dir')}",
              f"- 训练步数 {ckpt.get('iter_num')}，用时 {show((train or val or [{}])[-1].get('time'), 0)} 秒",
              f"- 最终训练损失 {show(train[-1]['loss'] if train else None)}，最终验证损失 "
              f"{show(val[-1].get('val_loss') if val else None)}，最佳验证损失 {show(ckpt.get('best_val_loss'))}", ""]
    if "lora" in ckpt:  # what trained, and the base the adapters need
        lo, trained = ckpt["lora"], sum(t.numel() for t in ckpt["model"].values())
        lines[-1:] = [f"- LoRA：rank {lo['rank']}，alpha {lo['alpha']:g}，作用于 {', '.join(lo['targets'])}"
                      f"{'，并训练嵌入矩阵' if lo['train_embeddings'] else ''}；训练的参数 {trained:,} 个"
                      f"（全部的 {trained / n_params:.2%}）；基座 `{lo['base']['path']}`（sha256 {lo['base']['sha256'][:12]}…）", ""]
    if loss_png:
        lines += [f"![训练曲线]({loss_png.name})", ""]
    lines += ["## 评测", ""]
    if (out / "eval.json").exists():
        r = json.loads((out / "eval.json").read_text(encoding="utf-8"))
        st = r.get("settings", {})
        seen = r.get("seen") or {}
        lines += ["| 指标 | 留出集 | 训练过的问题（文档） |", "|---|---|---|"]
        def cell(m, value):
            return m.show(value) + (f" ✗（超过 {m.limit:g}）" if m.fails(value) else "")

        for key, m in table_rows():
            lines.append(f"| {m.label_zh} | {cell(m, r.get(key))} | "
                         f"{cell(m, seen.get(key)) if seen and key not in SPLIT_ONLY else '-'} |")
        lines += ["", f"设置：max_new_tokens={st.get('max_new_tokens')}，temperature={st.get('temperature')}，"
                  f"top_k={st.get('top_k')}，top_p={st.get('top_p')}，repetition_penalty={st.get('repetition_penalty')}，"
                  f"seed={st.get('seed')}，max_samples={st.get('max_samples')}，{st.get('device')} {st.get('precision', st.get('dtype'))}。"
                  + " ".join(r[k] for k in ("ppl_note", "rare_note") if r.get(k)), ""]
        if r.get("common_chars") is not None:
            rate = EVAL["rare_char_rate"]
            lines += [f"罕见字：训练文本的 {r.get('train_han_chars', 0):,} 个汉字里，"
                      f"最常见的 {r['common_chars']:,} 个字占了 {COMMON_SHARE:.1%}；回答里不在其中的汉字算罕见字。"
                      "模型还没学会哪些字节组合是真正的汉字时，会编造出合法却罕见的字"
                      f"（{rate.label_zh}超过 {rate.limit:.0%} 即不合格）。", ""]
        if eval_png:
            lines += [f"![评测]({eval_png.name})", ""]
        lines += ["留出集：模型没有训练过的问题（或文档）；训练过的问题：从它的训练数据里抽取的样本，同样打分。"
                  "两列相差越大，模型越是在背诵训练数据，而不是举一反三。", ""]
        f = r.get("followup")
        if f:
            lines += [f"多轮对话：留出的对话里第二轮起的 {f['samples']} 个追问（如“它出自哪里？”），每个都带着前面的对话作答："
                      + "，".join(f"{EVAL[k].label_zh} {EVAL[k].show(f.get(k))}"
                                 for k in ("rouge_l", "repetition_rate", "truncation_rate"))
                      + "（与上表的单轮问题分开计算）。", ""]
        samples = held_out_samples(out)
        ranked = sorted(samples, key=lambda s: (-len(s.get("flags", [])), s.get("rouge_l", 0)))
        good = sorted((s for s in samples if not s.get("flags")), key=lambda s: -s.get("rouge_l", 0))[:3]
        for title, chosen in (("## 较好的回答", good), ("## 较差的回答", ranked[:3])):
            lines += [title, ""]
            for s in chosen:
                lines += [f"- **问/提示**：{one_line(s['question'])}", f"  - 参考：{one_line(s['reference'])}",
                          f"  - 模型：{one_line(s['prediction']) or '（空）'}",
                          f"  - Rouge-L {show(s.get('rouge_l'))}，BLEU-4 {show(s.get('bleu_4'))}；"
                          f"问题：{'、'.join(s.get('flags', [])) or '无'}"
                          + (f"；罕见字：{''.join(dict.fromkeys(s['rare_chars']))}"
                             if s.get("rare_chars") else "")]
            lines.append("" if chosen else "（没有）\n")
    else:
        lines += ["还没有评测结果：先运行 `python evaluations.py --out_dir=...`。", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


