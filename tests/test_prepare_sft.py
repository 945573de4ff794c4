"""data/prepare_sft.py: whole pairs packed into blocks (or one a block), masks that cover exactly
the answer and its EOT."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, read_bin, read_meta, run_script, write_jsonl

from data.records import entity_of, split_hash
from data.tokenizer import load_tokenizer, sft_prompt

GPT2 = load_tokenizer("gpt2")

BLOCK = 64


def pairs(n=40):
    ps = [{"question": f"成语“第{i}号”是什么意思？", "answer": f"比喻第{i}件事情。"} for i in range(n)]
    ps += [{"question": "“问：答：”？答：是", "answer": "问在前。"},
           {"question": "<|endoftext|>？", "answer": "结束符<|endoftext|>。"},
           {"question": "空格", "answer": "答案以空格开头。"}]
    return ps


def prepare_sft(tmp_path, src, check=True, *extra):
    """prepare_sft.py with gpt2 unless extra says --tokenizer (a later flag wins)."""
    return run_script("data/prepare_sft.py", f"--input={src}", f"--out_dir={tmp_path / 'sft'}",
                      f"--block_size={BLOCK}", "--val_fraction=0.2", "--tokenizer=gpt2", *extra, check=check)


def block_pairs(t: np.ndarray, m: np.ndarray, tok) -> list:
    """The (prompt ids, answer ids with EOT) of each pair in one block, checking the layout: pairs
    end to end, each a prompt (mask 0) then its answer (mask 1, ending with the one EOT), then PAD
    with mask 0 to the end."""
    out, i = [], 0
    while i < len(t) and t[i] != tok.pad_id:
        start = i + int(np.argmax(m[i:]))
        assert m[start] == 1 and not m[i:start].any()
        end = start + int(np.argmax(t[start:] == tok.eot_id)) + 1
        assert t[end - 1] == tok.eot_id and m[start:end].all()
        out.append((t[i:start].tolist(), t[start:end].tolist()))
        i = end
    assert (t[i:] == tok.pad_id).all() and not m[i:].any()
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_masks_cover_exactly_answer_and_eot(tmp_path, tokenizer, pack):
    spec, tok = tokenizer
    ps = pairs()
    block = 4 * BLOCK if pack else BLOCK  # room for several pairs a block
    proc = prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", ps), True, f"--tokenizer={spec}", f"--pack={pack}",
                       f"--block_size={block}")
    assert f"tokenizer {tok.describe()}: " in proc.stdout and "tokens per character" in proc.stdout
    out = tmp_path / "sft"
    by_question = {p["question"]: p["answer"] for p in ps}
    seen, most = [], 0
    for split in ("train", "val"):
        toks = read_bin(out / f"{split}.bin").reshape(-1, block)
        masks = read_bin(out / f"{split}_mask.bin", np.uint8).reshape(-1, block)
        assert toks.shape == masks.shape
        for t, m in zip(toks, masks):
            in_block = block_pairs(t, m, tok)
            assert len(in_block) == 1 or (pack and split == "train")
            most = max(most, len(in_block))
            for prompt_ids, answer_ids in in_block:
                prompt = tok.decode(prompt_ids)
                assert prompt.startswith("问：") and prompt.endswith("\n答：")
                question = prompt[len("问："):-len("\n答：")]
                assert prompt == sft_prompt(question) and prompt_ids == tok.encode(prompt)
                assert tok.eot_id not in answer_ids[:-1] and tok.decode(answer_ids[:-1]) == by_question[question]
                seen.append(question)
        meta_split = read_meta(out)["splits"][split]
        assert meta_split["blocks"] == len(toks) and meta_split["pairs"] == sum(q in by_question for q in seen) - (
            0 if split == "train" else read_meta(out)["splits"]["train"]["pairs"])
    assert sorted(seen) == sorted(by_question) and (most >= 2) == pack
    meta = read_meta(out)
    assert meta["sft_template"] == "问：{question}\n答：" and meta["kind"] == "sft"
    assert meta["packing"] == ("sft_packed" if pack else "sft")
    assert meta["tokenizer"] == tok.meta() and "pad_id" not in meta and "vocab_size" not in meta
    chars = sum(len(sft_prompt(p["question"])) + len(p["answer"]) for p in ps)
    assert meta["splits"]["train"]["characters"] + meta["splits"]["val"]["characters"] == chars
    assert (out / "train.bin").stat().st_size % (2 * block) == 0


def test_packing_shuffles_whole_pairs_and_is_deterministic(tmp_path):
    """Packed train blocks hold every train pair once, in an order that does not follow the file
    (pairs about one entity sit together there), fewer blocks and less padding than one pair a
    block, the same bytes on a second run; val is one pair a block either way."""
    src = write_jsonl(tmp_path / "in.jsonl", pairs(60))
    outs = {}
    for name, pack in (("a", True), ("b", True), ("plain", False)):
        run_script("data/prepare_sft.py", f"--input={src}", f"--out_dir={tmp_path / name}", f"--block_size={4 * BLOCK}",
                   "--val_fraction=0.2", "--tokenizer=gpt2", f"--pack={pack}")
        outs[name] = {f: (tmp_path / name / f).read_bytes() for f in ("train.bin", "train_mask.bin", "val.bin")}
    assert outs["a"] == outs["b"]
    assert outs["a"]["val.bin"] == outs["plain"]["val.bin"]
    packed, plain = (read_meta(tmp_path / n)["splits"]["train"] for n in ("a", "plain"))
    assert packed["pairs"] == plain["pairs"] and packed["answer_tokens"] == plain["answer_tokens"]
    assert packed["blocks"] < plain["blocks"] / 2 and packed["padding_fraction"] < plain["padding_fraction"]
    order = [GPT2.decode(p)
             for t, m in zip(read_bin(tmp_path / "a" / "train.bin").reshape(-1, 4 * BLOCK),
                             read_bin(tmp_path / "a" / "train_mask.bin", np.uint8).reshape(-1, 4 * BLOCK))
             for p, _ in block_pairs(t, m, GPT2)]
    in_file = [sft_prompt(p["question"]) for p in pairs(60) if sft_prompt(p["question"]) in order]
    assert sorted(order) == sorted(in_file) and order != in_file


def test_prompt_and_answer_are_tokenized_separately(tmp_path, enc):
    """The answer starts where the sampler would start generating, even after "答：“"."""
    p = {"question": "引号", "answer": "“床前明月光”出自李白。"}
    prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", [p] * 1 + pairs(10)), True, "--val_fraction=0", "--pack=False")
    toks = read_bin(tmp_path / "sft" / "train.bin").reshape(-1, BLOCK)[0]
    prompt_ids = enc.encode_ordinary(sft_prompt("引号"))
    assert toks[:len(prompt_ids)].tolist() == prompt_ids
    assert toks[len(prompt_ids):len(prompt_ids) + 3].tolist() == enc.encode_ordinary(p["answer"])[:3]


def test_too_long_pairs_are_dropped_and_counted(tmp_path):
    ps = pairs(10) + [{"question": "长", "answer": "很长的回答。" * 40}]
    proc = prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", ps))
    assert "in.jsonl:14: pair is" in proc.stderr and "dropped" in proc.stderr
    meta = read_meta(tmp_path / "sft")
    assert meta["problems"] == {"too_long": 1} and meta["overflow_policy"] == "drop"
    assert meta["splits"]["train"]["pairs"] + meta["splits"]["val"]["pairs"] == 13


def test_json_array_and_bad_pairs(tmp_path):
    src = tmp_path / "sft.json"
    items = pairs(10) + [{"question": "没有答案"}, {"question": "", "answer": "空问题"},
                         {"question": "空答案", "answer": "  "}, {"answer": "没有问题"}]
    src.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    proc = prepare_sft(tmp_path, src)
    meta = read_meta(tmp_path / "sft")
    assert meta["problems"] == {"missing_answer": 1, "empty_question": 1, "empty_answer": 1,
                                "missing_question": 1}
    assert f"{src}:" in proc.stderr and 'no "answer" field' in proc.stderr


def test_no_usable_pairs_fails_cleanly(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "不是问答"}])
    proc = prepare_sft(tmp_path, src, False)
    assert proc.returncode != 0 and "no usable question/answer pairs" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "sft").glob("*.bin"))


def test_entity_of():
    assert entity_of("成语“画蛇添足”是什么意思？") == entity_of("请用成语“画蛇添足”造一个句子。") == "画蛇添足"
    assert entity_of("请背诵李白的《静夜思》。") == "静夜思"
    assert entity_of("“床前明月光”出自《静夜思》吗？") == "床前明月光", "the first quoted subject"
    assert entity_of("天空为什么是蓝的？") == "天空为什么是蓝的？"
    assert entity_of("“ ”是什么？") == "“ ”是什么？", "an empty subject is no subject"
    # what students type on a keyboard without Chinese quotes, and corner brackets
    assert entity_of('成语"画蛇添足"是什么意思？') == entity_of("成语「画蛇添足」是什么意思？") == "画蛇添足"


def test_val_split_holds_out_entities(tmp_path, enc):
    """All pairs about one idiom (quoted in the question) or one poem (its "entity" field) go to one side."""
    ps = [{"question": q.format(w=f"成语{i}"), "answer": f"答案{i}。"} for i in range(20)
          for q in ("成语“{w}”是什么意思？", "请用成语“{w}”造一个句子。", "成语“{w}”怎么读？")]
    ps += [{"question": q.format(i=i), "answer": f"诗{i}。", "entity": f"某人《诗{i}》"} for i in range(10)
           for q in ("第{i}首诗的作者是谁？", "请背诵第{i}首诗。")]
    prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", ps), True, "--val_fraction=0.3")
    entity = {p["question"]: p.get("entity") or entity_of(p["question"]) for p in ps}
    sides = {}
    for split in ("train", "val"):
        toks = read_bin(tmp_path / "sft" / f"{split}.bin").reshape(-1, BLOCK)
        masks = read_bin(tmp_path / "sft" / f"{split}_mask.bin", np.uint8).reshape(-1, BLOCK)
        for t, m in zip(toks, masks):
            for prompt, _ in block_pairs(t, m, GPT2):
                question = enc.decode(prompt).removesuffix("\n答：").removeprefix("问：")
                sides.setdefault(entity[question], set()).add(split)
    assert len(sides) == 30 and {"train"} in sides.values() and {"val"} in sides.values()
    assert all(len(s) == 1 for s in sides.values()), {e: s for e, s in sides.items() if len(s) > 1}


@pytest.mark.parametrize("one_entity", [False, True])
def test_six_pairs_get_a_val_split(tmp_path, one_entity):
    """A first try with a sample file: six pairs, none of which the hash puts in val."""
    ps = pairs(6)[:6]
    if one_entity:
        ps = [{"question": f"成语“画蛇添足”的第{i}个问题？", "answer": f"回答{i}。"} for i in range(6)]
    assert all(split_hash(entity_of(p["question"])) >= 0.02 for p in ps)
    proc = prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", ps), True, "--val_fraction=0.02")
    meta = read_meta(tmp_path / "sft")
    assert meta["splits"]["val"]["pairs"] == meta["moved_to"]["val"] == 1
    assert meta["splits"]["train"]["pairs"] == 5
    assert "note: no records fell in val" in proc.stderr
    assert ("share one split key" in proc.stderr) == one_entity


def test_all_pairs_in_val_leaves_one_for_train(tmp_path):
    ps = pairs(6)[:6]
    assert all(split_hash(entity_of(p["question"])) < 0.95 for p in ps)
    proc = prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", ps), True, "--val_fraction=0.95")
    meta = read_meta(tmp_path / "sft")
    assert meta["splits"]["train"]["pairs"] == meta["moved_to"]["train"] == 1
    assert meta["splits"]["val"]["pairs"] == 5 and "note: no records fell in train" in proc.stderr


def test_one_pair_writes_train_only(tmp_path):
    proc = prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", pairs(1)[:1]), True)
    meta = read_meta(tmp_path / "sft")
    assert meta["splits"]["train"]["pairs"] == 1 and meta["splits"]["val"]["pairs"] == 0
    assert "warning: only 1 usable record: wrote train only" in proc.stderr


def test_paths_are_relative_to_the_working_directory(tmp_path):
    """--input and --out_dir mean what they mean to any CLI: relative to where you run it. The
    sources in meta.json are recorded so that evaluations.py finds them again from anywhere."""
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "sft.jsonl", pairs(10))
    (tmp_path / "out" / "sft").mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / "sft" / f"train.bin.tmp-{gone.stdout.strip()}").write_bytes(b"left by a killed run")
    proc = subprocess.run([sys.executable, str(ROOT / "data/prepare_sft.py"), "--input=in/sft.jsonl",
                           "--out_dir=out/sft", f"--block_size={BLOCK}", "--tokenizer=gpt2"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "sft"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "train_mask.bin", "val.bin",
                                                     "val_mask.bin"]
    meta = read_meta(out)
    assert meta["sources"] == [str((tmp_path / "in" / "sft.jsonl").resolve())]
    assert meta["packing"] == "sft_packed" and "mode" not in meta
    assert not (ROOT / "out").exists() and not (ROOT / "in").exists()


def test_sources_inside_the_repository_are_recorded_from_its_root(tmp_path):
    from data.splits import source_names
    assert source_names([ROOT / "data" / "raw" / "sft_train.jsonl"]) == ["data/raw/sft_train.jsonl"]
    assert source_names([tmp_path / "x.jsonl"]) == [str((tmp_path / "x.jsonl").resolve())]


DIALOGUES = [  # the three record shapes of a conversation, and a pair next to them
    {"messages": [{"role": "system", "content": "你是语文老师。"},
                  {"role": "user", "content": "成语“画蛇添足”是什么意思？"}, {"role": "assistant", "content": "比喻多此一举。"},
                  {"role": "user", "content": "它出自哪里？"}, {"role": "assistant", "content": "《战国策·齐策二》。"}]},
    {"conversations": [{"role": "user", "content": "“床前明月光”出自哪首诗？"},
                       {"role": "assistant", "content": "李白《静夜思》。"},
                       {"role": "user", "content": "请背诵这首诗。"},
                       {"role": "assistant", "content": "床前明月光，\r\n疑是地上霜。"}],
     "entity": "李白《静夜思》"},
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                       {"from": "user", "value": "再见"}, {"from": "assistant", "value": "再见。"}]},
    {"question": "一个问题？", "answer": "一个回答。"},
]
RENDERED = [("你是语文老师。", [("成语“画蛇添足”是什么意思？", "比喻多此一举。"), ("它出自哪里？", "《战国策·齐策二》。")]),
            ("", [("“床前明月光”出自哪首诗？", "李白《静夜思》。"), ("请背诵这首诗。", "床前明月光，\n疑是地上霜。")]),
            ("", [("你好", "你好！"), ("再见", "再见。")]),
            ("", [("一个问题？", "一个回答。")])]


def blocks_of(out, split, block):
    return (read_bin(out / f"{split}.bin").reshape(-1, block),
            read_bin(out / f"{split}_mask.bin", np.uint8).reshape(-1, block))


def test_multi_turn_records_render_with_the_one_chat_template(tmp_path):
    """messages, conversations of role/content and of from/value: each block holds exactly
    conversation_ids of the record (loss on every answer and its EOT); a pair stays encode_pair's."""
    from data.tokenizer import conversation_ids, encode_pair
    prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", DIALOGUES), True, "--pack=False", "--val_fraction=0",
                f"--block_size={4 * BLOCK}")
    toks, masks = blocks_of(tmp_path / "sft", "train", 4 * BLOCK)
    assert len(toks) == len(RENDERED)
    for t, m, (system, turns) in zip(toks, masks, RENDERED):
        ids, mask = conversation_ids(GPT2, turns, system=system)
        assert t[:len(ids)].tolist() == ids and m[:len(ids)].tolist() == mask
        assert (t[len(ids):] == GPT2.pad_id).all() and not m[len(ids):].any()
        assert (t[:len(ids)] == GPT2.eot_id).sum() == len(turns)
    pair_ids, pair_mask = encode_pair(GPT2, "一个问题？", "一个回答。")
    assert toks[3].tobytes().startswith(pair_ids.tobytes()) and masks[3].tobytes().startswith(pair_mask.tobytes())
    meta = read_meta(tmp_path / "sft")
    assert meta["system_template"] == "系统：{system}\n" and meta["problems"] == {}
    assert {k: meta["splits"]["train"][k] for k in ("pairs", "conversations", "turns")} == \
        {"pairs": 1, "conversations": 3, "turns": 7}


def test_bad_conversations_are_named_and_skipped(tmp_path):
    good = DIALOGUES[2]["conversations"]
    bad = [{"messages": [{"role": "assistant", "content": "先回答。"}, {"role": "user", "content": "再问？"}]},
           {"messages": [{"role": "user", "content": "只问不答？"}]},
           {"messages": [{"role": "user", "content": "问？"}, {"role": "assistant", "content": "  "}]},
           {"conversations": [{"role": "user", "content": "问？"}, {"role": "assistant", "content": 3}]},
           {"messages": [{"role": "human", "content": "问？"}, {"role": "assistant", "content": "答。"}]},
           {"conversations": "你好"},
           {"conversations": []},
           {"conversations": good, "messages": good},
           {"conversations": good, "question": "问？", "answer": "答。"},
           {"conversations": [*good[:2], {"from": "system", "value": "迟到的系统"}, *good[2:]]},
           {"conversations": [{"from": ["human"], "value": "问？"}, {"from": "gpt", "value": "答。"}]},
           {"messages": [{"role": "user", "content": "问？"}, "答。"]}]
    src = write_jsonl(tmp_path / "in.jsonl", DIALOGUES + bad)
    proc = prepare_sft(tmp_path, src, True, "--val_fraction=0", f"--block_size={4 * BLOCK}")
    meta = read_meta(tmp_path / "sft")
    assert meta["problems"] == {"bad_messages": 5, "bad_conversations": 5, "ambiguous_record": 2}
    assert meta["splits"]["train"]["conversations"] == 3 and meta["splits"]["train"]["pairs"] == 1
    err = proc.stderr
    assert f"{src}:5: " in err and "messages[0] is assistant where user comes" in err
    assert f"{src}:6: " in err and "messages ends without an assistant answer" in err
    assert 'messages[1]: "content" is empty' in err and 'conversations[1]: "content" is a number' in err
    assert 'messages[0]: "role" is "human", not one of system, user, assistant' in err
    assert f'{src}:16: ' in err and 'messages[1] is a string, not an object with "role" and "content"' in err
    assert "an optional system message, then user and assistant in turn, ending with assistant" in err


def test_too_long_conversations_keep_their_last_turns_whole(tmp_path):
    from data.tokenizer import conversation_ids
    turns = [(f"第{i}个问题是什么？", f"第{i}个回答。") for i in range(6)]
    per_turn = len(conversation_ids(GPT2, turns[:1])[0])
    system = "你是一位耐心的老师。"
    block = 3 * per_turn + len(conversation_ids(GPT2, [], system=system)[0])  # system + 3 turns fit exactly
    records = [{"messages": [{"role": "system", "content": system}] + [
                {"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]},
               {"messages": [{"role": "system", "content": system * 20},
                             {"role": "user", "content": turns[0][0]}, {"role": "assistant", "content": turns[0][1]}]},
               {"messages": [{"role": "user", "content": "短问题？"}, {"role": "assistant", "content": "短回答。"},
                             {"role": "user", "content": "短问题？"}, {"role": "assistant", "content": "很长的回答。" * 40}]}]
    proc = prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", records), True, "--pack=False",
                       "--val_fraction=0", f"--block_size={block}")
    meta = read_meta(tmp_path / "sft")
    assert meta["problems"] == {"turns_dropped": 3, "system_dropped": 1, "too_long": 1}
    assert "in.jsonl:3: conversation's last turn is" in proc.stderr
    toks, masks = blocks_of(tmp_path / "sft", "train", block)
    assert len(toks) == 2
    for t, m, want in zip(toks, masks, (conversation_ids(GPT2, turns[3:], system=system),
                                        conversation_ids(GPT2, turns[:1]))):
        assert t[:len(want[0])].tolist() == want[0] and m[:len(want[1])].tolist() == want[1]
    assert meta["splits"]["train"]["turns"] == 4


def test_a_conversation_is_held_out_by_its_entity(tmp_path):
    """The "entity" field, else the first question's subject, decides the split of the whole conversation."""
    records = [{"messages": [{"role": "user", "content": f"成语“词{i}”是什么意思？"},
                             {"role": "assistant", "content": f"释义{i}。"},
                             {"role": "user", "content": "它出自哪里？"}, {"role": "assistant", "content": f"出处{i}。"}],
                **({"entity": f"诗{i}"} if i % 2 else {})} for i in range(30)]
    prepare_sft(tmp_path, write_jsonl(tmp_path / "in.jsonl", records), True, "--pack=False", "--val_fraction=0.3",
                f"--block_size={2 * BLOCK}")
    for split in ("train", "val"):
        toks, _ = blocks_of(tmp_path / "sft", split, 2 * BLOCK)
        for t in toks:
            i = int(GPT2.decode(t[:int(np.argmax(t == GPT2.eot_id))].tolist()).split("词")[1].split("”")[0])
            assert (split_hash(f"诗{i}" if i % 2 else f"词{i}") < 0.3) == (split == "val")
    meta = read_meta(tmp_path / "sft")
    train = meta["splits"]["train"]
    assert meta["splits"]["val"]["conversations"] and train["turns"] == 2 * train["conversations"]
