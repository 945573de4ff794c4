"""evaluations.py, visualize.py and bench.py over metrics.py and report.py: perplexity, Rouge, the
graders' checks, the metrics tables, plots and the report."""
import ast
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import PAIRS, ROOT, read_bin, run_script, write_jsonl
from test_prepare import corpus

from data.records import Report, clean_text, in_val
from data.tokenizer import load_tokenizer
from data_utils import load_dataset
from engine import load_model, reply, reply_batch
from eval_cases import load_cases, split_document
from evaluations import perplexity
from metrics import BENCH, EVAL, distinct_2, is_garbled, is_repetitive, repeated_share, rouge, table_rows
from model import GPT, GPTConfig
from report import plot_losses

GPT2 = load_tokenizer("gpt2")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_data")
    docs = write_jsonl(tmp / "docs.jsonl", corpus(80))
    run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={docs}", f"--out_dir={tmp / 'pre'}", "--block_size=32",
               "--val_fraction=0.2")
    run_script("data/prepare_sft.py", "--tokenizer=gpt2", f"--input={write_jsonl(tmp / 'sft.jsonl', PAIRS)}", f"--out_dir={tmp / 'sft'}",
               "--block_size=48", "--val_fraction=0.3")
    return tmp


def uniform_model(block_size):
    model = GPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over the whole vocabulary
    return model


@pytest.mark.parametrize("kind", ["pre", "sft"])
def test_perplexity_of_uniform_logits_is_the_vocabulary_size(prepared, kind):
    ds = load_dataset(prepared / kind, "val")
    model = uniform_model(ds.block_size)
    result = perplexity(model, ds, batch_size=3)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-5)
    # only counted targets: the answer tokens (SFT) or everything up to a block's padding
    T = ds.block_size
    if kind == "sft":
        marks = read_bin(prepared / "sft" / "val_mask.bin", np.uint8).reshape(-1, T)
        assert result["tokens"] == int(marks[:, 1:].sum())
    else:
        tokens = read_bin(prepared / "pre" / "val.bin").reshape(-1, T)
        assert result["tokens"] == int((tokens[:, 1:] != GPT2.pad_id).sum())
    assert perplexity(model, ds, max_blocks=2)["blocks"] == 2


@pytest.mark.parametrize("kind", ["pre", "sft"])
def test_perplexity_matches_a_hand_computation_on_a_known_distribution(prepared, kind):
    """A model whose next-token distribution is known: even ids have probability 3/Z, odd ids 1/Z
    (Z = 3 * evens + odds), whatever the context. The expected perplexity is computed by hand from
    the counted targets read straight from the files; batches of 3 count unequal numbers of targets,
    and the product of the probabilities underflows to 0 where the summed logs do not."""
    ds = load_dataset(prepared / kind, "val")
    T = ds.block_size
    model = GPT(GPTConfig(block_size=T, n_layer=1, n_head=2, n_embd=16, bias=True)).eval()
    with torch.no_grad():  # final hidden state = e_0 at every position; logits = lm_head.weight[:, 0]
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[0::2, 0] = math.log(3)
    V = model.config.vocab_size
    Z = 3 * len(range(0, V, 2)) + len(range(1, V, 2))
    tokens = read_bin(prepared / kind / "val.bin").reshape(-1, T).astype(np.int64)
    if kind == "sft":
        counted = read_bin(prepared / kind / "val_mask.bin", np.uint8).reshape(-1, T)[:, 1:].astype(bool)
    else:
        counted = tokens[:, 1:] != GPT2.pad_id
    targets = tokens[:, 1:][counted]
    n_even, n_odd = int((targets % 2 == 0).sum()), int((targets % 2 == 1).sum())
    expected = math.exp((n_even * math.log(Z / 3) + n_odd * math.log(Z)) / (n_even + n_odd))
    per_batch = [int(counted[i:i + 3].sum()) for i in range(0, len(counted), 3)]
    assert len(set(per_batch)) > 1, "batches should count unequal numbers of targets"
    result = perplexity(model, ds, batch_size=3)
    assert result["tokens"] == n_even + n_odd > 50 and n_even and n_odd
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert math.prod([3 / Z] * n_even + [1 / Z] * n_odd) == 0.0  # the naive product underflows


def test_trained_on_questions_are_exactly_the_pairs_in_train_bin(tmp_path):
    """The seen set of an SFT checkpoint: the questions prepare_sft.py wrote to train.bin (it
    splits by entity: both questions about one idiom on one side), none of val.bin's."""
    from conftest import WORDS
    pairs = [{"question": q.format(w), "answer": f"{w}的{k}。"} for w in WORDS
             for k, q in (("意思", "成语“{}”是什么意思？"), ("例句", "请用成语“{}”造一个句子。"))]
    dialogue = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    src = write_jsonl(tmp_path / "sft.jsonl", pairs + [dialogue])
    run_script("data/prepare_sft.py", "--tokenizer=gpt2", f"--input={src}",
               f"--out_dir={tmp_path / 'sft'}", "--block_size=192", "--val_fraction=0.3")
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text(encoding="utf-8"))
    assert meta["splits"]["train"]["blocks"] < meta["splits"]["train"]["pairs"], "train blocks hold several pairs"

    def questions(split):
        from test_prepare_sft import block_pairs
        blocks, masks = (read_bin(tmp_path / "sft" / f"{split}{kind}.bin", dtype).reshape(-1, meta["block_size"])
                         for kind, dtype in (("", "uint16"), ("_mask", "uint8")))
        texts = [GPT2.decode(prompt) for t, m in zip(blocks, masks) for prompt, _ in block_pairs(t, m, GPT2)]
        return sorted(t.removeprefix("问：").split("\n答：")[0] for t in texts)

    report = Report()
    seen = load_cases("chat", "", meta, report, seen=True)
    assert sorted(c["prompt"] for c in seen) == sorted(q for q in questions("train") if q != "你好")
    assert not report.counts, "a multi-turn record of the sources is no bad pair"
    assert questions("val") and not set(questions("val")) & {c["prompt"] for c in seen}


def test_rouge_of_identical_disjoint_empty_and_long_texts():
    same, flag = rouge("床前明月光，疑是地上霜。", "床前明月光，疑是地上霜。")
    assert flag is None and all(v == pytest.approx(1.0) for v in same.values())
    apart, flag = rouge("春眠不觉晓", "大漠孤烟直")
    assert flag is None and all(v == 0 for v in apart.values())
    for hyp, ref in [("", "参考答案"), ("   ", "参考答案"), ("回答", "")]:
        scores, flag = rouge(hyp, ref)
        assert flag == "rouge_empty" and all(v == 0 for v in scores.values())
    scores, flag = rouge("春风" * 3000, "春风" * 3000, max_words=1000)
    assert flag == "rouge_too_long" and scores["rouge_l"] == 0


def test_graders_checks_on_crafted_strings():
    assert is_garbled("半个字\ufffd") and is_garbled("响铃\x07") and is_garbled("私用\ue000区")
    assert not is_garbled("床前明月光，\n疑是地上霜。\tOK")
    for text in ("好的好的好的", "啊啊啊啊啊", "前言。我爱你我爱你我爱你", "ab ab ab ",
                 "春眠不觉晓。春眠不觉晓。",  # a sentence said twice
                 "床前明月光，疑是地上霜。举头望明月，低头思故乡。床前明月光，疑是地上霜。",  # A-B-A
                 "指做事多此一举，反而坏事。比喻做事不得要领。指做事多此一举，反而坏事。比喻做事不得要领。"):
        assert is_repetitive(text), text
    for text in ("床前明月光，疑是地上霜。", "行行重行行，与君生别离。", "哈哈哈", "好的好的",
                 "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
                 "“春眠不觉晓”的下一句是“处处闻啼鸟”。", "比喻做了多余的事，非但无益，反而不合适。也比喻虚构事实，无中生有。"):
        assert not is_repetitive(text), text
    assert repeated_share("春眠不觉晓。春眠不觉晓。") == pytest.approx(0.5)
    assert repeated_share("abcdefabcdefabcdef") == pytest.approx(2 / 3)  # a loop copies itself
    assert repeated_share("") == 0 and repeated_share("春眠不觉晓") == 0
    assert distinct_2("abab") == pytest.approx(2 / 3) and distinct_2("a") is None and distinct_2("abc") == 1


def test_split_document_at_the_first_sentence():
    poem = "《春日》\n宋·朱熹\n胜日寻芳泗水滨，无边光景一时新。\n等闲识得东风面，万紫千红总是春。"
    assert split_document(poem) == ("《春日》\n宋·朱熹\n胜日寻芳泗水滨，无边光景一时新。\n",
                                    "等闲识得东风面，万紫千红总是春。")
    assert split_document("没有句号\n第二行") == ("没有句号\n", "第二行")
    assert split_document("一句话。") == ("一句话。", "")


def test_a_continuation_prompt_is_the_documents_own_first_tokens(tmp_path):
    """A trained tokenizer merges "。\n" (poems end their lines so): the prompt keeps the line break,
    so its tokens are the document's first tokens, not a "。" the model saw mostly before an EOT."""
    poems = [{"text": f"《第{i}首》\n春风又绿江南岸。\n明月何时照我还。\n"} for i in range(50)]
    run_script("data/train_tokenizer.py", f"--input={write_jsonl(tmp_path / 'poems.jsonl', poems)}",
               f"--out_path={tmp_path / 'poems.tiktoken'}", "--vocab_size=300", "--val_fraction=0")
    tok = load_tokenizer(str(tmp_path / "poems.tiktoken"))
    assert len(tok.encode("。\n")) == 1
    doc = poems[0]["text"]
    prompt, _ = split_document(doc)
    assert tok.encode(doc)[:len(tok.encode(prompt))] == tok.encode(prompt)


def test_split_document_follows_the_one_sentence_end_rule():
    """data.records.SENTENCE_END: a closing quote stays with its sentence, and "？！" ends once."""
    assert split_document("他说：“好。”然后走了。") == ("他说：“好。”", "然后走了。")
    assert split_document("真的吗？！当然。") == ("真的吗？！", "当然。")


def test_sft_evaluation_end_to_end_with_report(sft_model, tmp_path):
    src = write_jsonl(tmp_path / "test.jsonl", PAIRS + [{"question": "缺答案"}])
    with open(src, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", f"--input={src}", "--report=True")
    assert f"{src}:21" in proc.stderr and f"{src}:22" in proc.stderr  # bad lines: named and counted
    results = json.loads((sft_model / "eval.json").read_text(encoding="utf-8"))
    for key in ("perplexity", "rouge_1", "rouge_2", "rouge_l", "empty_rate", "garbled_rate", "repetition_rate",
                "truncation_rate", "tokens_per_s", "settings"):
        assert key in results
    assert results["perplexity"] is None and "val" in results["ppl_note"]  # the tiny model has no val split
    assert results["samples"] == len(PAIRS) and results["rouge_l"] == pytest.approx(1.0)  # memorized, greedy
    assert results["empty_rate"] == results["garbled_rate"] == results["truncation_rate"] == 0
    assert results["skipped_cases"] == {"missing_answer": 1, "invalid_json": 1}
    samples = [json.loads(line) for line in (sft_model / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["prediction"] for s in samples if s["set"] == "held_out"] == [p["answer"] for p in PAIRS]
    assert {"question", "reference", "prediction", "rouge_l", "flags", "set"} <= samples[0].keys()
    # beside them, as many questions of the training file (here the same pairs: it trained on all)
    assert results["seen"]["samples"] == len(PAIRS) and results["seen"]["rouge_l"] == pytest.approx(1.0)
    assert sorted(s["question"] for s in samples if s["set"] == "seen") == sorted(p["question"] for p in PAIRS)
    assert "trained on" in proc.stdout
    assert "Rouge-L F1" in proc.stdout and "perplexity" in proc.stdout
    assert results["settings"]["precision"] == "fp32" and "dtype" not in results["settings"]
    # every number eval.json holds is a metric of metrics.EVAL, and both tables list EVAL's rows
    for figures in (results, results["seen"]):
        numbers = [k for k, v in figures.items() if v is None or isinstance(v, (int, float))]
        assert numbers and set(numbers) <= set(EVAL), set(numbers) - set(EVAL)
    printed = [line[:20].strip() for line in proc.stdout.splitlines()[1:]]
    assert printed == [m.label for _, m in table_rows()]
    report = (sft_model / "report.md").read_text(encoding="utf-8")
    head = report.index("| 指标 | 留出集 | 训练过的问题（文档） |")
    rows = report[head:].split("\n\n")[0].splitlines()[2:]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == [m.label_zh for _, m in table_rows()]
    for section in ("## 数据", "## 训练", "## 评测", "## 较好的回答", "## 较差的回答", "![训练曲线](loss.png)",
                    "![评测](eval.png)", PAIRS[0]["answer"], "| 指标 | 留出集 | 训练过的问题（文档） |"):
        assert section in report, section
    for png in ("loss.png", "eval.png"):
        assert (sft_model / png).read_bytes()[:8] == PNG and (sft_model / png).stat().st_size > 10_000


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_answers_generated_together_are_the_answers_one_at_a_time(sft_model, temperature):
    """engine.reply_batch (evaluations.py's gen_batch_size) against reply, question by question, in
    float32 with evaluations' repetition penalty: memorized answers end at EOT early, the others
    (questions it never saw, of other lengths) end at other steps (the block rule: test_model)."""
    model, ckpt = load_model(sft_model, "cpu", "fp32")
    texts = [p["question"] for p in PAIRS[:5]] + ["你好", "请用一句话解释什么是机器学习，并举一个例子。", "天",
                                              "床前明月光，疑是地上霜。举头望明月，"]
    settings = dict(max_new_tokens=16, temperature=temperature, top_k=50, top_p=0.95, repetition_penalty=1.5)
    alone = []
    for i, text in enumerate(texts):
        stats = {}
        alone.append((reply(model, ckpt, text, "chat", generator=torch.Generator().manual_seed(i), stats=stats,
                            **settings), stats))
    together = reply_batch(model, ckpt, texts, "chat", [torch.Generator().manual_seed(i) for i in range(len(texts))],
                           **settings)
    assert [t for t, _ in together] == [t for t, _ in alone]
    for (_, a), (_, b) in zip(alone, together):
        assert a.keys() == b.keys() and {k: a[k] for k in a if k != "seconds"} == {k: b[k] for k in b if k != "seconds"}
    if temperature == 0:
        assert [t for t, _ in together[:5]] == [p["answer"] for p in PAIRS[:5]]
    # rows leave the batch at different steps (finished rows drop out while others go on), some at EOT
    assert len({s["new_tokens"] for _, s in together}) > 2 and any(s["stopped_at_eot"] for _, s in together)


def test_sampling_is_deterministic_under_seed_and_cut_by_max_samples(sft_model, tmp_path):
    src = write_jsonl(tmp_path / "test.jsonl", PAIRS)
    runs = []
    for seed in (7, 7, 8):
        run_script("evaluations.py", f"--out_dir={sft_model}", f"--input={src}", "--temperature=1.5",
                   "--max_samples=6", f"--seed={seed}", "--ppl_split=train", "--seen_samples=0")
        lines = (sft_model / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()
        runs.append([(s["question"], s["prediction"]) for s in map(json.loads, lines)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    samples = [json.loads(line) for line in lines]
    order = [p["question"] for p in PAIRS]
    assert len(samples) == 6 and [order.index(s["question"]) for s in samples] == sorted(
        order.index(s["question"]) for s in samples)
    results = json.loads((sft_model / "eval.json").read_text(encoding="utf-8"))
    assert 1 < results["perplexity"] < 50  # on the training pairs it memorized


def test_pretrained_continuation_of_held_out_documents(prepared, tmp_path):
    run_script("train.py", f"--data_dir={prepared / 'pre'}", f"--out_dir={tmp_path}", "--n_layer=1", "--n_head=2",
               "--n_embd=32", "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1")
    run_script("evaluations.py", f"--out_dir={tmp_path}", "--max_new_tokens=8", "--max_samples=5", "--seen_samples=3")
    docs = [clean_text(d["text"], d["title"]) for d in corpus(80)]
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["set"] for s in samples] == ["held_out"] * 5 + ["seen"] * 3
    for s in samples:
        source = [t for t in docs if in_val(t, 0.2) == (s["set"] == "held_out")]
        assert any(doc.startswith(s["question"]) and s["reference"] in doc for doc in source), s["question"]
        assert s["question"].endswith("。") and s["new_tokens"] <= 8
        assert "truncated" not in s["flags"]  # a continuation has no end to reach
    results = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert results["perplexity"] > 1 and results["settings"]["mode"] == "generate"
    assert results["truncation_rate"] is None and results["seen"]["truncation_rate"] is None
    assert results["seen"]["samples"] == 3


def test_evaluations_bad_input_messages(sft_model, tmp_path):
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", f"--input={tmp_path / 'none.jsonl'}", check=False)
    assert proc.returncode != 0 and "none.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("evaluations.py", f"--out_dir={tmp_path / 'no_run'}", check=False)
    assert proc.returncode != 0 and "no checkpoint here" in proc.stderr
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", "--max_samples=-1", check=False)
    assert proc.returncode != 0 and "--max_samples=-1: out of range" in proc.stderr
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", "--gen_batch_size=0", check=False)
    assert proc.returncode != 0 and "--gen_batch_size=0: out of range" in proc.stderr and "Traceback" not in proc.stderr
    for arg, words in [("--top_p=-1", "--top_p=-1.0: expected a number from 0.0 to 1.0"),
                       ("--top_k=-1", "--top_k=-1: expected a whole number from 0 to")]:
        proc = run_script("evaluations.py", f"--out_dir={sft_model}", arg, check=False)
        assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", "--precision=int3", check=False)
    assert proc.returncode == 1 and "--precision='int3': expected one of fp32, bf16, fp16, int8" in proc.stderr
    proc = run_script("evaluations.py", f"--out_dir={sft_model}", "--dtype=float32", check=False)
    assert proc.returncode == 1 and "dtype" in proc.stderr and "precision" in proc.stderr  # the new name


def metric_calls(path):
    """The names of every metric("...") call in a file (a name must be a literal: the table's row)."""
    calls = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "metric"]
    assert all(isinstance(c.args[0], ast.Constant) for c in calls), "metric() takes a literal name"
    return [c.args[0].value for c in calls]


def test_every_bench_metric_is_in_the_table():
    names = metric_calls(ROOT / "bench.py")
    assert len(names) > 15 and set(names) <= set(BENCH), set(names) - set(BENCH)
    # the rest of the table: data/bench_prepare.py's lines, which bench.py passes on (checked there)
    rest = set(BENCH) - set(names)
    prepare = (ROOT / "data" / "bench_prepare.py").read_text(encoding="utf-8")
    assert rest and all(f'"{name}"' in prepare for name in rest), rest
    for m in list(BENCH.values()) + list(EVAL.values()):
        assert m.better in ("higher", "lower", "") and m.description


def test_bench_metric_prints_the_table_unit_and_refuses_other_names(capsys):
    from bench import metric
    metric("generate_kv_speedup_{new}", 2.34567, "(vs use_cache=False)", new=256)
    line = json.loads(capsys.readouterr().out)
    assert line == {"metric": "generate_kv_speedup_256", "value": 2.346, "unit": "x (vs use_cache=False)"}
    with pytest.raises(ValueError, match="not in metrics.BENCH"):
        metric("generate_tokens_per_second", 1.0)


def test_bench_help_runs():
    proc = run_script("bench.py", "--help")
    assert "--only=prepare" in proc.stdout and "--packing_iters=" in proc.stdout
    assert re.search(r"--only='modes'.*expected one of", run_script("bench.py", "--only=modes", check=False).stderr)


def test_loss_plots_from_synthetic_metrics(tmp_path, capsys, monkeypatch):
    runs = []
    for k, name in enumerate(("pre", "sft")):
        run = tmp_path / name
        run.mkdir()
        rows = [{"iter": i, "split": "train", "loss": 5 - i / 40 + k, "lr": 1e-3 * (1 - i / 100)}
                for i in range(1, 100)]
        rows += [{"iter": i, "split": "val", "train_loss": 5 - i / 40, "val_loss": 5.1 - i / 40 + k}
                 for i in (0, 50, 99)]
        write_jsonl(run / "metrics.jsonl", rows)
        runs.append(run)
    with open(runs[0] / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"iter": 100, "split": "tra\n{"iter": "x", "split": "train", "loss": 1}\n')
    png = plot_losses(runs[:1], tmp_path / "one.png")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    err = capsys.readouterr().err
    assert f"{runs[0] / 'metrics.jsonl'}:103" in err and f"{runs[0] / 'metrics.jsonl'}:104" in err
    monkeypatch.setattr("report.CJK_FONTS", ("No Such Font",))  # no CJK font: English labels, still draws
    both = plot_losses(runs, tmp_path / "both.png")
    assert both.read_bytes()[:8] == PNG and both.stat().st_size > 10_000


def test_visualize_command_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"iter": i, "split": "train", "loss": 3 - i / 9, "lr": 0.1} for i in range(5)])
    proc = run_script("visualize.py", f"--out_dir={run}")
    assert (run / "loss.png").exists() and "loss.png" in proc.stdout
    proc = run_script("visualize.py", f"--out_dir={tmp_path / 'empty'}", check=False)
    assert proc.returncode != 0 and "no metrics.jsonl" in proc.stderr
    proc = run_script("visualize.py", f"--out_dir={run}", "--report=True", check=False)
    assert proc.returncode != 0 and "ckpt.pt not found" in proc.stderr and "Traceback" not in proc.stderr


def test_small_data_held_out_and_trained_on_documents_follow_the_moved_split(tmp_path):
    """Ten documents, none of which the hash puts in val: prepare.py moves one there (meta.json
    records it), and evaluations.py finds that one as held out and the other nine as trained on."""
    docs = corpus(10)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    run_script("data/prepare.py", "--tokenizer=gpt2", f"--input={src}", f"--out_dir={tmp_path / 'pre'}", "--block_size=32")
    meta = json.loads((tmp_path / "pre" / "meta.json").read_text(encoding="utf-8"))
    assert meta["moved_to"]["val"] == 1
    texts = [clean_text(d["text"], d["title"]) for d in docs]
    held = load_cases("generate", "", meta, Report(), seen=False)
    seen = load_cases("generate", "", meta, Report(), seen=True)
    with_rest = [t for t in texts if split_document(t)[1]]
    assert len(held) == 1 and len(held) + len(seen) == len(with_rest)
    assert not {c["prompt"] for c in held} & {c["prompt"] for c in seen}


def test_trained_on_pairs_leave_out_those_too_long_for_a_block(tmp_path):
    pairs = [{"question": f"第{i}个问题？", "answer": "短。" if i % 2 else "很长的回答。" * 30} for i in range(8)]
    run_script("data/prepare_sft.py", "--tokenizer=gpt2", f"--input={write_jsonl(tmp_path / 'sft.jsonl', pairs)}",
               f"--out_dir={tmp_path / 'sft'}", "--block_size=48", "--val_fraction=0")
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text(encoding="utf-8"))
    assert meta["problems"] == {"too_long": 4}
    seen = load_cases("chat", "", meta, Report(), seen=True)
    assert sorted(c["prompt"] for c in seen) == [p["question"] for p in pairs if p["answer"] == "短。"]
