"""The metric definitions and the graders' checks, in one place.

    from metrics import EVAL, BENCH, rouge, is_repetitive
    EVAL["rouge_l"].better                     # "higher": what a larger number means
    rouge("床前明月光", "床前明月光")            # ({"rouge_1": 1.0, ...}, None)

EVAL lists every number evaluations.py writes in eval.json (at the top level and under "seen");
its printed table and report.md show the rows that have a label, in this order. BENCH lists
every metric bench.py prints ({"metric", "value", "unit"}); a name with {braces} is a family
(generate_tokens_per_s_kv_{new} is _256 and _512). bench.metric refuses a name not listed here,
and tests/test_evaluations.py holds eval.json and bench.py to these tables.

The graders' checks flag each answer: empty; garbled ("\ufffd", control or unassigned
characters); repetitive (a short loop, or copies of earlier spans making up REPEAT_SHARE of
it); truncated (no EOT within max_new_tokens; evaluations.py applies it to SFT answers only);
rare_chars (a Han character outside the common set of the training text, common_chars: a model
that has not learned which byte sequences are real characters invents valid but rare ones).
"""
import re
import unicodedata
from dataclasses import dataclass

import jieba
import numpy as np
from rouge_chinese import Rouge


@dataclass(frozen=True)
class Metric:
    better: str             # "higher" or "lower" is better; "" for a count or a size, not a score
    unit: str
    description: str
    label: str = ""         # the row label of evaluations.py's printed table ("" = not a row)
    label_zh: str = ""      # the row label of report.md
    digits: int = 4         # decimals shown (a float; whole numbers are shown as they are)
    limit: float | None = None  # a graders' check fails above this (the table marks it)

    def show(self, value) -> str:
        return show(value, self.digits)

    def fails(self, value) -> bool:
        return self.limit is not None and value is not None and value > self.limit


def show(value, digits: int = 4) -> str:
    """A figure as text: "n/a" for None (not applicable), a float with digits decimals, else as it is."""
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# The graders' flags and the eval.json rate that counts each (the share of answers flagged).
FLAGS = {"empty": "empty_rate", "garbled": "garbled_rate", "repetitive": "repetition_rate",
         "truncated": "truncation_rate", "rare_chars": "rare_answer_rate"}
# Figures of ppl_split, not of answers: the table has no trained-on column for them.
SPLIT_ONLY = ("perplexity", "bits_per_char")

# Han characters: the CJK Unified Ideographs (U+4E00-9FFF), extension A (U+3400-4DBF), the
# supplementary ideographic planes (extensions B-I and the compatibility supplement, U+20000-2FA1F;
# G and H, U+30000-323AF) and the compatibility ideographs (U+F900-FAFF): regex's \p{Han} without
# the radicals and the few symbols (々, 〇) it also counts.
HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F), (0x30000, 0x323AF))
HAN = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in HAN_RANGES) + "]")
# The common set of the training text covers this share of its Han characters (common_chars).
COMMON_SHARE = 0.999

EVAL = {
    "perplexity": Metric("lower", "", "exp(summed NLL over the counted tokens of ppl_split / their number); "
                         "masked positions (SFT prompts, padding) are not counted", "perplexity", "困惑度 perplexity"),
    "bits_per_char": Metric("lower", "bits/character", "summed NLL of the same counted targets / ln 2 / the "
                            "characters they decode to (ppl_chars); unlike perplexity (per token) comparable "
                            "across tokenizers", "bits per char", "每字符比特数 bits/char"),
    "rouge_1": Metric("higher", "", "Rouge-1 F1 over jieba words (rouge-chinese), mean over answers",
                      "Rouge-1 F1", "Rouge-1 F1"),
    "rouge_2": Metric("higher", "", "Rouge-2 F1 over jieba words, mean over answers", "Rouge-2 F1", "Rouge-2 F1"),
    "rouge_l": Metric("higher", "", "Rouge-L F1 (longest common subsequence) over jieba words, mean over answers",
                      "Rouge-L F1", "Rouge-L F1"),
    "bleu_4": Metric("higher", "", "BLEU-4 over characters, smoothed (nltk sentence_bleu, SmoothingFunction()."
                     "method3, as ChatGLM's P-Tuning evaluation), mean over answers; 0..1 (ChatGLM prints it x100)",
                     "BLEU-4 (chars)", "BLEU-4（按字）"),
    "empty_rate": Metric("lower", "", "share of answers that are empty or only whitespace", "empty rate", "空回答比例"),
    "garbled_rate": Metric("lower", "", "share of answers with \"\\ufffd\" or a control, unassigned, private-use or "
                           "surrogate character (is_garbled)", "garbled rate", "乱码比例"),
    "rare_char_rate": Metric("lower", "", "share of the generated Han characters (HAN) that are outside the training "
                             "text's common set (common_chars: the most frequent Han characters making up "
                             f"{COMMON_SHARE:.1%} of its Han characters); null without the training data",
                             "rare char rate", "罕见字比例（生成的汉字中）", limit=0.01),
    "rare_answer_rate": Metric("lower", "", "share of answers with at least one rare Han character (flag rare_chars)",
                               "rare-char answers", "含罕见字的回答比例"),
    "repetition_rate": Metric("lower", "", "share of answers that loop or copy themselves (is_repetitive)",
                              "repetition rate", "重复比例"),
    "truncation_rate": Metric("lower", "", "share of answers with no EOT within max_new_tokens; SFT only "
                              "(null for a continuation, which has no end to reach)",
                              "truncation rate", "截断比例（没有生成结束符）"),
    "distinct_2": Metric("higher", "", "distinct character bigrams / all character bigrams, mean over answers",
                         "distinct-2", "distinct-2"),
    "mean_chars": Metric("", "characters", "mean answer length", "mean answer chars", "平均回答字数"),
    "tokens_per_s": Metric("higher", "tokens/s", "new tokens / generation seconds over all answers",
                           "tokens/s", "生成速度 tokens/s"),
    "samples": Metric("", "answers", "number of answers scored", "samples", "样本数"),
    "rouge_unscored_rate": Metric("lower", "", "share of answers Rouge could not score (empty, or over "
                                  "rouge_max_words words): scored 0 and flagged"),
    "ppl_nll": Metric("lower", "nats/token", "the mean NLL behind perplexity"),
    "ppl_tokens": Metric("", "tokens", "counted targets scored for perplexity"),
    "ppl_blocks": Metric("", "blocks", "blocks (windows) of ppl_split scored for perplexity"),
    "ppl_chars": Metric("", "characters", "characters the counted targets decode to: UTF-8 lead bytes of their "
                        "bytes (special tokens such as EOT count none)"),
    "han_chars": Metric("", "characters", "Han characters in all answers: rare_char_rate's denominator"),
    "common_chars": Metric("", "characters", "size of the common set of the training text's Han characters"),
    "train_han_chars": Metric("", "characters", "Han characters in the training text the common set was built from"),
}

BENCH = {
    # prepare: prepare.py on the whole default corpus, then data/bench_prepare.py
    "prepare_tokens_per_s": Metric("higher", "tokens/s", "prepare.py on the default corpus, default workers", digits=3),
    "prepare_seconds": Metric("lower", "s", "prepare.py's wall time", digits=3),
    "prepare_peak_rss_mb": Metric("lower", "MB", "peak resident memory of prepare.py's process tree", digits=3),
    "prepare_workers_speedup": Metric("higher", "x", "prepare.py's time with one worker over its time "
                                      "with the default workers", digits=3),
    "encode_ordinary_tokens_per_s": Metric("higher", "tokens/s", "single-threaded encode_ordinary", digits=3),
    "prepare_one_process_tokens_per_s": Metric("higher", "tokens/s", "prepare's worker code in one process", digits=3),
    "prepare_pool_tokens_per_s": Metric("higher", "tokens/s", "prepare's worker pool", digits=3),
    "prepare_parallel_speedup": Metric("higher", "x", "the pool against single-threaded encode_ordinary", digits=3),
    "prepare_pool_vs_one_process": Metric("higher", "x", "the pool against its own code in one process", digits=3),
    "machine_parallel_ceiling": Metric("higher", "x", "N processes encoding against one: this machine's ceiling",
                                       digits=3),
    # train: the 45M model, batch 8 x 256, fp32, CPU
    "train_positions_per_s": Metric("higher", "positions/s", "train.py's loop: every position computed", digits=3),
    "train_tokens_per_s": Metric("higher", "tokens/s", "train.py's loop: targets whose loss counts", digits=3),
    "train_plain_loop_positions_per_s": Metric("higher", "positions/s", "a nanoGPT-style loop, same model", digits=3),
    "train_compiled_loop_positions_per_s": Metric("higher", "positions/s", "the same loop under torch.compile",
                                                  digits=3),
    "train_vs_plain_loop": Metric("higher", "x", "train.py's positions/s over the plain loop's", digits=3),
    # generate: batch 1, 45M, greedy; {new} new tokens
    "generate_tokens_per_s_kv_{new}": Metric("higher", "tokens/s", "model.generate with the KV cache", digits=3),
    "generate_tokens_per_s_nocache_{new}": Metric("higher", "tokens/s", "the same generate, use_cache=False",
                                                  digits=3),
    "generate_tokens_per_s_nanogpt_{new}": Metric("higher", "tokens/s", "nanoGPT's generate (whole block each step)",
                                                  digits=3),
    "generate_kv_speedup_{new}": Metric("higher", "x", "KV cache over use_cache=False", digits=3),
    "generate_kv_speedup_vs_nanogpt_{new}": Metric("higher", "x", "KV cache over nanoGPT's generate", digits=3),
    "generate_tokens_per_s_auto_{new}": Metric("higher", "tokens/s", "model.generate in the automatic precision",
                                               digits=3),
    "generate_auto_speedup_vs_nanogpt_{new}": Metric("higher", "x", "the automatic precision over nanoGPT's generate",
                                                     digits=3),
    # precision: {model} 45m (random weights) or a trained out_dir's name, {precision} fp32, bf16, int8
    "precision_first_token_s_{model}_{precision}": Metric("lower", "s", "the prompt's forward pass and one token",
                                                          digits=3),
    "precision_tokens_per_s_{model}_{precision}": Metric("higher", "tokens/s", "batch-1 decoding", digits=3),
    "precision_chars_per_s_{model}_{precision}": Metric("higher", "chars/s", "batch-1 decoding, decoded characters",
                                                        digits=3),
    "precision_rss_mb_{model}_{precision}": Metric("lower", "MB", "resident memory of sample.py", digits=3),
    "precision_checkpoint_mb_{model}_{precision}": Metric("lower", "MB", "checkpoint file", digits=3),
    "precision_{key}_{model}_{precision}": Metric("", "", "evaluations.py's figure of that name (metrics.EVAL)",
                                                  digits=4),
    # ui: the web app through its API and sample.py; {variant} "" as shipped, "_every_piece" --stream_every=0
    "ui_first_token_s": Metric("lower", "s", "time to the first streamed text through the app's API", digits=3),
    "ui_tokens_per_s{variant}": Metric("higher", "tokens/s", "new tokens / reply time through the app's API",
                                       digits=3),
    "ui_reply_s{variant}": Metric("lower", "s", "time for the whole reply through the app's API", digits=3),
    "ui_openai_first_token_s": Metric("lower", "s", "time to the first streamed text through /v1/chat/completions",
                                      digits=3),
    "ui_openai_tokens_per_s": Metric("higher", "tokens/s", "new tokens / reply time through /v1/chat/completions",
                                     digits=3),
    "ui_openai_speed_vs_generate": Metric("higher", "x", "/v1/chat/completions' tokens/s over /generate's, the same "
                                          "app and run, taking turns", digits=3),
    # {variant}: "" the default precision (engine.pick_precision), "_fp32" --precision=fp32
    "cli_tokens_per_s{variant}": Metric("higher", "tokens/s", "sample.py's own tokens/s", digits=3),
    # tokenizer: {vocab} a trained vocabulary size; {tokenizer} gpt2 or zh{vocab}
    "tokenizer_train_seconds_{vocab}": Metric("lower", "s", "data/train_tokenizer.py on the default corpus",
                                              digits=3),
    "tokens_per_char_{tokenizer}": Metric("lower", "tokens/char", "tokens per character of prepare.py's val "
                                          "documents", digits=3),
    "encode_chars_per_s_{tokenizer}": Metric("higher", "chars/s", "encode_ordinary_batch, one thread", digits=3),
    "train_chars_per_s_{tokenizer}": Metric("higher", "chars/s", "training speed of the CPU demo's model in "
                                            "characters of text: positions/s x held-out characters per token", digits=3),
    "decode_chars_per_s_{tokenizer}": Metric("higher", "chars/s", "decoding speed of the CPU demo's model in "
                                             "characters: KV-cache tokens/s x held-out characters per token", digits=3),
    # lora: {run} full, lora_r8, lora_r64, lora_r8_emb; {key} trainable_params, checkpoint_mb, ms_per_step,
    # peak_rss_mb, best_val_loss, rouge_l, bleu_4 (the last two: evaluations.py's, metrics.EVAL)
    "lora_{key}_{run}": Metric("", "", "a fine-tuning run's figure of that name", digits=4),
    "lora_{key}_vs_full_{run}": Metric("", "x", "a LoRA run's figure over full SFT's, the same run", digits=3),
    # packing: held-out loss of models trained on each packing layout
    "packing_{packing}_heldout_nll": Metric("lower", "nats/token", "mean NLL per token of held-out documents, "
                                            "each scored alone after an EOT", digits=3),
}


def table_rows() -> list:
    """(key, Metric) of EVAL in table order: the rows of the printed table and of report.md."""
    return [(k, m) for k, m in EVAL.items() if m.label]


# ----------------------------------------------------------------------------- the graders' checks
_LOOP = re.compile(r"(.{2,20}?)\1{2,}|(.)\2{4,}", re.DOTALL)
# A span of at least REPEAT_MIN_CHARS characters that copies earlier text counts as repeated; an
# answer is repetitive once such copies make up REPEAT_SHARE of it: a sentence said twice is 1/2,
# an A-B-A loop of equal parts 1/3. Measured on the default data's references (README): 5 of 4,051
# SFT answers and 1 of 3,000 documents (a Shijing refrain) reach 1/3; none reach 1/2.
REPEAT_MIN_CHARS = 5
REPEAT_SHARE = 1 / 3


def is_garbled(text: str) -> bool:
    """A replacement character, or a control, unassigned, private-use or surrogate code point."""
    return any(ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs") and ch not in "\n\t")
               for ch in text)


def repeated_share(text: str, min_chars: int = REPEAT_MIN_CHARS) -> float:
    """The share of text that copies an earlier part of it. Left to right, the longest span at
    this position that already occurs earlier (the copy may overlap it, as in a loop) counts as
    repeated if it has at least min_chars characters, and the walk jumps past it (an LZ77 parse)."""
    i, copied = 0, 0
    while i < len(text):
        n = 0
        while i + n < len(text) and text.find(text[i:i + n + 1], 0, i + n) >= 0:
            n += 1
        if n >= min_chars:
            copied += n
            i += n
        else:
            i += 1
    return copied / len(text) if text else 0.0


def is_repetitive(text: str) -> bool:
    """A short loop (the same 2-20 characters three times in a row, or one character five times),
    or copies of earlier spans making up REPEAT_SHARE of the text (repeated_share)."""
    return _LOOP.search(text) is not None or repeated_share(text) >= REPEAT_SHARE


def distinct_2(text: str) -> float | None:
    """Distinct character bigrams / all character bigrams (None under two characters)."""
    grams = [text[i:i + 2] for i in range(len(text) - 1)]
    return len(set(grams)) / len(grams) if grams else None


def words(text: str) -> str:
    return " ".join(w for w in jieba.cut(text) if w.strip())


def rouge(prediction: str, reference: str, max_words: int = 1000) -> tuple[dict, str | None]:
    """({rouge_1, rouge_2, rouge_l} F1 over jieba words, flag): all 0 with a flag where
    rouge-chinese cannot score (empty text) or would take too long (over max_words words)."""
    zero = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    hyp, ref = words(prediction), words(reference)
    if not hyp or not ref:
        return zero, "rouge_empty"
    if max(hyp.count(" "), ref.count(" ")) + 1 > max_words:
        return zero, "rouge_too_long"
    try:
        s = Rouge().get_scores(hyp, ref)[0]
    except (ValueError, RecursionError) as e:
        return zero, f"rouge_error: {e}"
    return {"rouge_1": s["rouge-1"]["f"], "rouge_2": s["rouge-2"]["f"], "rouge_l": s["rouge-l"]["f"]}, None


def bleu_4(prediction: str, reference: str) -> float:
    """Character BLEU-4 as ChatGLM's P-Tuning evaluation computes it: nltk's sentence_bleu over the
    characters (surrounding whitespace stripped), NIST geometric smoothing (method3: the k-th n-gram
    order with no match counts 1/2^k matches); 0..1, 0 for an empty answer. Texts under 4
    characters stay below 1 even when identical: their missing orders are smoothed like misses.
    Needs no nltk data download."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # here: bench.py and visualize.py need no nltk
    return float(sentence_bleu([list(reference.strip())], list(prediction.strip()),
                               smoothing_function=SmoothingFunction().method3))


def char_counts(text: str) -> np.ndarray:
    """Occurrences of every code point of text, shape (0x110000,): counts of pieces add up."""
    return np.bincount(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), minlength=0x110000)


def common_chars(counts: np.ndarray, share: float = COMMON_SHARE) -> frozenset:
    """The common set of a text's Han characters (counts: char_counts of it): every Han character
    seen at least m times, m the largest count for which these make up `share` of the Han
    characters (so characters tied at the cut are all in). Empty for a text without Han."""
    han = np.concatenate([np.arange(a, b + 1) for a, b in HAN_RANGES])
    n = counts[han]
    ranked = np.sort(n[n > 0])[::-1]
    if not len(ranked):
        return frozenset()
    need = round(share * int(ranked.sum()), 9)  # 0.997 * 1000 is 997.0000000000001 in floats
    cut = ranked[np.searchsorted(np.cumsum(ranked), need)]  # the count ending the first prefix that reaches it
    return frozenset(map(chr, han[n >= cut]))


def rare_chars(text: str, common: frozenset) -> str:
    """The Han characters of text outside the common set, each occurrence, in order."""
    return "".join(ch for ch in HAN.findall(text) if ch not in common)


def flags_of(answer: str, stopped_at_eot: bool, check_truncation: bool, common: frozenset | None = None) -> list:
    """The graders' flags of one answer (FLAGS' keys, in that order); rare_chars only with a common set."""
    on = {"empty": not answer.strip(), "garbled": is_garbled(answer), "repetitive": is_repetitive(answer),
          "truncated": check_truncation and not stopped_at_eot,
          "rare_chars": common is not None and bool(rare_chars(answer, common))}
    return [name for name in FLAGS if on[name]]
