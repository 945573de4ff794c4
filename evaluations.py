"""Evaluate a MiniGLM checkpoint: perplexity on the held-out split, answers scored with Rouge
(rouge-chinese over jieba words, the course metric) and the graders' checks; --report=True
writes the report to hand in.

    python evaluations.py --out_dir=out-sft                    # SFT: every question of the SFT test split
    python evaluations.py --out_dir=out                        # pretrained: continue held-out documents
    python evaluations.py --out_dir=out-sft --input=my_test.json --max_samples=200 --report=True

SFT checkpoints answer each question of data/raw/sft_test.jsonl (or --input: a JSON array or
JSONL of {"question", "answer"}), and every turn after the first of the held-out dialogues
(data/raw/sft_dialogues_test.jsonl, or multi-turn records of --input), each given the dialogue's
earlier turns: scored apart, under "followup" in eval.json (eval_cases.py). Pretrained
checkpoints continue the first sentence of held-out documents (the val documents of the sources the checkpoint's data was prepared from, chosen by
the same hash as prepare.py; or --input: JSON/JSONL of {"text"}), scored against the rest of the
document (its first max_reference_chars characters). Perplexity: exp of the summed NLL over the
counted tokens of ppl_split (masked positions excluded) divided once by their number. Bits per
character: the same summed NLL / ln 2 / the characters those tokens decode to; perplexity is per
token, so only bits per character compares models with different tokenizers.

The graders' checks on every answer (metrics.py, with every metric's definition): empty;
garbled ("\ufffd", control or unassigned characters); repetitive (the same 2-20 characters three
times in a row, one character five times, or spans of 5+ characters copied from earlier in the
answer making up a third of it); truncated (no EOT within max_new_tokens; SFT only: a
continuation has no end to reach, so its rate is n/a); rare_chars (a Han character outside the
common set of the checkpoint's training text: the Han characters that make up 99.9% of the
train split's, read when this runs; n/a without that data). Each answer is also scored with
character BLEU-4 as ChatGLM's P-Tuning evaluation computes it (metrics.bleu_4). Rouge of an empty answer, or of a text
over rouge_max_words words, is 0 with a flag instead of an error (rouge-chinese refuses the one
and is very slow on the other).
Beside the held-out scores, the same number of questions (documents) the model was trained on
are answered and scored alike (--seen_samples): memorisation and generalisation are different
claims. Writes out_dir/eval.json (held-out figures at the top level, trained-on ones under
"seen") and out_dir/eval_samples.jsonl (each with "set": held_out or seen) and prints a table;
with --report=True also out_dir/loss.png, out_dir/eval.png and out_dir/report.md (report.py).
Paths are relative to the current directory: --out_dir, --input, and the paths the checkpoint
recorded at training time (its data_dir, its data's sources; data/raw/sft_test.jsonl), which
assume the repository's folder, where make demo runs.
"""
import logging
import math
import random
import sys
import time
from pathlib import Path

import jieba
import numpy as np
import torch
from tqdm import tqdm

import checkpoint
from configurator import configure
from data.records import Report, write_json_atomic, write_jsonl_atomic
from data.tokenizer import Tokenizer, check_same, complete_prefix
from data_utils import batch_at, load_dataset
from engine import RENAMED_DTYPE, SAMPLING_DEFAULTS, exit_on_bad_flags, load_model_or_exit, reply_batch
from eval_cases import load_cases
from metrics import (COMMON_SHARE, FLAGS, HAN, HAN_RANGES, SPLIT_ONLY, bleu_4, char_counts, common_chars,
                     distinct_2, flags_of, rare_chars, rouge, table_rows)
from report import write_report

# ----------------------------------------------------------------------------- defaults
out_dir = "out-sft"         # relative to the current directory, like every path here
input = ""                  # "" = the SFT test split (SFT) or the held-out documents (pretrained)
max_samples = 0             # 0 = all; else that many, chosen by --seed, kept in file order
seen_samples = -1           # also answer this many trained-on questions (documents), scored alike;
                            # -1 = as many as the held-out ones, 0 = none
# The sampling settings are engine.SAMPLING's except three, on purpose: greedy decoding scores the
# answer the model finds most likely (and makes a run repeatable); greedy decoding of a small
# model loops, so a stronger repetition penalty (1.5, chosen on the SFT val questions among 1.1,
# 1.3, 1.5 and sampling; README has the table); and 128 new tokens hold any reference answer of the
# default data while keeping a run short.
max_new_tokens = 128
temperature = 0.0           # 0 = greedy
top_k = SAMPLING_DEFAULTS["top_k"]
top_p = SAMPLING_DEFAULTS["top_p"]
repetition_penalty = 1.5    # --repetition_penalty=1.1 for the web app's value
seed = 1337
max_reference_chars = 200   # pretrained: the reference is this much of the document after the prompt
ppl_split = "val"           # the split of the checkpoint's data_dir scored for perplexity
ppl_max_blocks = 400        # evenly spaced blocks of it (0 = all)
batch_size = 16             # perplexity: blocks per forward pass
gen_batch_size = 64         # answers: questions generated together (engine.reply_batch; the same answers
                            # as one at a time in float32); 64 measured fastest on a 2-core CPU (README)
rouge_max_words = 1000
report = False              # also draw the plots and write out_dir/report.md
device = ""                 # "" = cuda, then mps, then cpu
precision = "fp32"          # the model as trained, the same figures on every CPU; bf16, fp16, int8, or ""
                            # (what sample.py and the web app pick here) measure what they serve
lora_base = ""              # a LoRA checkpoint's base (ckpt.pt or out_dir), if it is no longer where it was
# -----------------------------------------------------------------------------
RENAMED_KEYS = {"dtype": RENAMED_DTYPE}  # --dtype is training's autocast type; generation has --precision

def lead_bytes(tok: Tokenizer, size: int) -> np.ndarray:
    """The characters each token id begins, (max(size, PAD + 1),): the UTF-8 lead bytes (bytes
    not in 0x80..0xBF) of its bytes, so a character split across tokens counts once, in the token
    holding its first byte, whatever the tokenizer. The special ids (EOT, PAD) begin no
    character, nor do the model's padding rows."""
    lead = np.zeros(max(size, tok.pad_id + 1), dtype=np.int64)
    for t in range(tok.eot_id):  # the ordinary tokens: every id below EOT
        lead[t] = sum(not 0x80 <= b <= 0xBF for b in tok.token_bytes(t))
    return lead


def perplexity(model, ds, batch_size: int = 16, max_blocks: int = 0, device: str = "cpu") -> dict:
    """exp(sum of NLL over the counted targets / their number) over evenly spaced blocks of a split
    (windows for stream data), each batch's summed NLL added up in float64; and bits per character:
    the same sum / ln 2 / the characters the counted targets begin (lead_bytes of the data's
    tokenizer). EOT's NLL is in the sum (ending the text is part of predicting it) though it
    begins no character."""
    T = ds.block_size
    chars_of = torch.from_numpy(lead_bytes(ds.tokenizer, model.config.vocab_size)).to(device)
    starts = list(range(0, ds.n_tokens - (0 if ds.aligned else 1) - T + 1, T))
    if max_blocks and len(starts) > max_blocks:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_blocks).round().astype(int)]
    nll, count, chars = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            x, y, mask = batch_at(ds, starts[i:i + batch_size], device)
            n = int(mask.sum())
            if n:
                _, loss = model(x, y, mask, return_logits=False, reduction="sum")  # summed NLL of the n targets
                nll += float(loss)
                count += n
                chars += int(chars_of[y][mask].sum())
    return {"perplexity": math.exp(nll / count) if count else None, "nll": nll / count if count else None,
            "tokens": count, "blocks": len(starts), "chars": chars,
            "bits_per_char": nll / math.log(2) / chars if chars else None}


def train_char_counts(ds, chunk_tokens: int = 1 << 20) -> np.ndarray:
    """metrics.char_counts of a split's text: its ordinary tokens (not EOT or PAD: the ids below
    EOT of the data's tokenizer) decoded chunk_tokens at a time, so memory stays bounded; the
    bytes of a character cut by a chunk's end are carried over to the next chunk."""
    tok = ds.tokenizer
    data = np.memmap(ds.path, dtype=np.uint16, mode="r")
    counts, pending = np.zeros(0x110000, dtype=np.int64), b""
    for i in range(0, ds.n_tokens, chunk_tokens):
        ids = np.asarray(data[i:i + chunk_tokens])
        raw = pending + tok.enc.decode_bytes(ids[ids < tok.eot_id].tolist())
        cut = complete_prefix(raw)
        counts += char_counts(raw[:cut].decode("utf-8", errors="replace"))
        pending = raw[cut:]
    return counts


def parent_data_dir(ckpt: dict) -> Path | None:
    """The pretraining data_dir of a fine-tuned checkpoint (init_from=pretrained, or a resumed run
    of one: its config still names the parent), read from its parent checkpoint's config; None
    when there is no parent or it is gone."""
    cfg = ckpt["config"]
    if cfg.get("init_from") not in ("pretrained", "resume") or not cfg.get("init_checkpoint"):
        return None
    try:
        return Path(checkpoint.read(cfg["init_checkpoint"], mmap=True)["config"]["data_dir"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def evaluate(model, ckpt: dict, mode: str, cases: list, settings: dict, label: str = "",
             common: frozenset | None = None) -> tuple[list, dict]:
    """Answer every case; (samples with scores and flags, the summary written to eval.json).
    Truncation (no EOT) is an SFT check: a continuation has no end to reach, so it is n/a there.
    Rare characters are checked against `common` (the training text's common set; None: n/a);
    rare_char_rate counts characters over all answers, rare_answer_rate the answers flagged."""
    samples, seconds = [], 0.0
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")
    chat, size = mode == "chat", settings["gen_batch_size"]
    bar = tqdm(total=len(cases), desc=f"answering{label}", unit="q", file=sys.stderr)
    for start in range(0, len(cases), size):  # question i samples with its own generator, seeded seed + i
        chunk, t0 = cases[start:start + size], time.perf_counter()
        gens = [torch.Generator().manual_seed(settings["seed"] + start + j) for j in range(len(chunk))]
        answers = reply_batch(model, ckpt, [c["prompt"] for c in chunk], mode, gens, **{k: settings[k] for k in keys},
                              histories=[c.get("history", ()) for c in chunk], systems=[c.get("system", "") for c in chunk])
        seconds += time.perf_counter() - t0
        bar.update(len(chunk))
        for case, (prediction, stats) in zip(chunk, answers):
            scores, rouge_flag = rouge(prediction, case["reference"], settings["rouge_max_words"])
            scores["bleu_4"] = bleu_4(prediction, case["reference"])
            flags = flags_of(prediction, stats["stopped_at_eot"], check_truncation=chat, common=common)
            samples.append({"question": case["prompt"], "reference": case["reference"], "prediction": prediction,
                            **{k: round(v, 4) for k, v in scores.items()}, "flags": flags + [rouge_flag] * bool(rouge_flag),
                            "han_chars": len(HAN.findall(prediction)),
                            "rare_chars": None if common is None else rare_chars(prediction, common),
                            "distinct_2": distinct_2(prediction), "chars": len(prediction),
                            "new_tokens": stats["new_tokens"], "seconds": round(stats["seconds"], 3)})
    bar.close()
    n = len(samples)

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    summary = {k: mean(s[k] for s in samples) for k in ("rouge_1", "rouge_2", "rouge_l", "bleu_4")}
    summary |= {rate: sum(f in s["flags"] for s in samples) / n for f, rate in FLAGS.items()}
    summary["truncation_rate"] = summary["truncation_rate"] if chat else None
    han = sum(s["han_chars"] for s in samples)
    summary |= {"han_chars": han, "rare_answer_rate": summary["rare_answer_rate"] if common is not None else None,
                "rare_char_rate": sum(map(len, (s["rare_chars"] for s in samples))) / han
                if common is not None and han else None}
    summary |= {"rouge_unscored_rate": sum(any(f.startswith("rouge_") for f in s["flags"]) for s in samples) / n,
                "distinct_2": mean(s["distinct_2"] for s in samples), "mean_chars": mean(s["chars"] for s in samples),
                "tokens_per_s": sum(s["new_tokens"] for s in samples) / max(seconds, 1e-9), "samples": n}
    return samples, summary


def print_table(results: dict) -> None:
    """Held-out scores beside the scores on questions (documents) the model was trained on."""
    seen = results.get("seen") or {}
    print(f"{'':<20}{'held out':>12}{'trained on':>12}")
    for key, m in table_rows():
        values = (results.get(key), seen.get(key) if key not in SPLIT_ONLY else None)
        shown = [m.show(v) for v in values]
        fail = f"  FAIL: above {m.limit:g}" if any(m.fails(v) for v in values) else ""
        print(f"{m.label:<20}{shown[0]:>12}{shown[1] if seen else '-':>12}{fail}")


if __name__ == "__main__":
    config = configure(globals())
    jieba.setLogLevel(logging.WARNING)
    exit_on_bad_flags(config)  # engine.SAMPLING's ranges and engine.PRECISIONS
    for key, ok in [("max_samples", max_samples >= 0), ("seen_samples", seen_samples >= -1),
                    ("ppl_max_blocks", ppl_max_blocks >= 0),
                    ("batch_size", batch_size >= 1), ("gen_batch_size", gen_batch_size >= 1),
                    ("rouge_max_words", rouge_max_words >= 1)]:
        if not ok:
            sys.exit(f"--{key}={config[key]}: out of range (see --help)")
    settings = {k: config[k] for k in config if k not in ("report",)}
    out = Path(out_dir)
    model, ckpt, device, precision = load_model_or_exit(out, device, precision, lora_base)
    mode = checkpoint.mode_of(ckpt)
    settings |= {"mode": mode, "device": device, "precision": precision, "iter_num": ckpt.get("iter_num")}
    print(f"[{out_dir}: mode {mode}, {model.num_params() / 1e6:.1f}M parameters, {device}, {precision}]",
          file=sys.stderr)

    results = {"perplexity": None, "bits_per_char": None, "ppl_note": ""}
    # data_dir as given at training time, relative to the directory training ran in (normally
    # the repository's folder), so read from the current directory
    data_dir = Path(ckpt["config"].get("data_dir", ""))

    def checked_split(split: str):
        """A split of data_dir; ValueError naming both if it was prepared again with another tokenizer."""
        split_ds = load_dataset(data_dir, split)
        check_same(checkpoint.tokenizer(ckpt), f"checkpoint {out_dir}", split_ds.tokenizer,
                   f"its data_dir {data_dir} (prepared again since?)")  # ValueError: skipped with the note
        return split_ds

    try:
        ds = checked_split(ppl_split)
        t0 = time.perf_counter()
        ppl = perplexity(model, ds, batch_size, ppl_max_blocks, device)
        results |= {"perplexity": ppl["perplexity"], "bits_per_char": ppl["bits_per_char"], "ppl_nll": ppl["nll"],
                    "ppl_tokens": ppl["tokens"], "ppl_chars": ppl["chars"], "ppl_blocks": ppl["blocks"],
                    "ppl_data": str(ds.path)}
        print(f"perplexity {ppl['perplexity']:.3f}, {ppl['bits_per_char']:.3f} bits per character over "
              f"{ppl['tokens']:,} tokens ({ppl['chars']:,} characters) of {ds.path} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    except (FileNotFoundError, ValueError, KeyError) as e:
        where = "" if data_dir.is_absolute() else f" (the checkpoint's data_dir, read from {Path.cwd()})"
        results["ppl_note"] = f"no perplexity: {data_dir} split {ppl_split!r} unavailable{where} ({e})"
        print(results["ppl_note"], file=sys.stderr)
    common, results["rare_note"] = None, ""
    try:  # the common Han characters of the training text (a fine-tuned model's parent's too), for rare_chars
        t0 = time.perf_counter()
        train_ds = checked_split("train")
        counts, paths = train_char_counts(train_ds), [train_ds.path]
        parent_dir = parent_data_dir(ckpt)
        if parent_dir is not None and parent_dir != data_dir:
            try:
                parent_ds = load_dataset(parent_dir, "train")
                check_same(checkpoint.tokenizer(ckpt), f"checkpoint {out_dir}", parent_ds.tokenizer,
                           f"its parent's data_dir {parent_dir}")
                counts, paths = counts + train_char_counts(parent_ds), paths + [parent_ds.path]
            except (FileNotFoundError, ValueError, KeyError) as e:
                print(f"note: the common set leaves out the parent model's data ({e})", file=sys.stderr)
        common = common_chars(counts)
        results |= {"common_chars": len(common),
                    "train_han_chars": sum(int(counts[a:b + 1].sum()) for a, b in HAN_RANGES)}
        print(f"common set: {len(common):,} Han characters make up {COMMON_SHARE:.1%} of the "
              f"{results['train_han_chars']:,} in {' + '.join(map(str, paths))} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    except (FileNotFoundError, ValueError, KeyError) as e:
        results["rare_note"] = f"no rare-character check: {data_dir} split 'train' unavailable ({e})"
        print(results["rare_note"], file=sys.stderr)

    def subset(cases: list, n: int) -> list:
        """n cases chosen by --seed, kept in file order (all when n is 0 or more than there are)."""
        if not n or len(cases) <= n:
            return cases
        return [cases[i] for i in sorted(random.Random(seed).sample(range(len(cases)), n))]

    bad = Report()
    cases = load_cases(mode, input, ckpt["data_meta"], bad, max_reference_chars)
    follow = subset([c for c in cases if "history" in c], max_samples)  # dialogue turns after the first: apart
    cases = subset([c for c in cases if "history" not in c], max_samples)
    if bad.counts:
        print(f"test cases: {bad.summary()}", file=sys.stderr)
    if not cases and not follow:
        sys.exit("no test cases to answer (see the messages above)")
    samples, summary = evaluate(model, ckpt, mode, cases, settings, common=common) if cases else ([], {})
    samples = [s | {"set": "held_out"} for s in samples]
    results |= summary | {"settings": settings, "skipped_cases": dict(bad.counts), "seen": None}
    if follow:
        more, results["followup"] = evaluate(model, ckpt, mode, follow, settings, " (follow-ups)", common)
        samples += [s | {"set": "followup", "history_turns": len(c["history"])} for s, c in zip(more, follow)]
    if seen_samples:
        quiet = Report(max_shown=0)  # the training files' problems were shown when they were prepared
        seen = load_cases(mode, "", ckpt["data_meta"], quiet, max_reference_chars, seen=True)
        seen = subset(seen, len(cases) if seen_samples < 0 else seen_samples)
        if seen:
            more, results["seen"] = evaluate(model, ckpt, mode, seen, settings, " (trained on)", common)
            samples += [s | {"set": "seen"} for s in more]
        else:
            print("no trained-on questions to compare with: the checkpoint's source files "
                  f"({', '.join(ckpt['data_meta'].get('sources', [])) or 'none recorded'}) are missing", file=sys.stderr)
    write_json_atomic(out / "eval.json", results)
    write_jsonl_atomic(out / "eval_samples.jsonl", samples)
    print_table(results)
    if follow:
        f = results["followup"]
        print(f"follow-up turns of held-out dialogues (each given the dialogue so far): {f['samples']}, "
              f"Rouge-L {f['rouge_l']:.4f}, repetitive {f['repetition_rate']:.1%}, truncated {f['truncation_rate']:.1%}")
    print(f"wrote {out / 'eval.json'} and {out / 'eval_samples.jsonl'}", file=sys.stderr)
    if report:
        print(f"wrote {write_report(out)}", file=sys.stderr)
