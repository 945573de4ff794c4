"""The cases evaluations.py answers: held-out questions and documents, the questions the model was
trained on (the seen set), and the follow-up turns of held-out dialogues.

    from eval_cases import load_cases
    cases = load_cases("chat", "", ckpt["data_meta"], Report())   # [{"prompt", "reference"}, ...]

A follow-up case also has "history" (the dialogue's earlier (question, answer) turns, the
reference answers: each follow-up is scored on its own, given a correct conversation so far)
and "system"; evaluations.py scores those apart from the single questions.
"""
import sys
from pathlib import Path

from data.records import (CONVERSATION_KEYS, SENTENCE_END, Report, clean_text, conversation_of, expand_inputs,
                          pair_entity, read_records, split_hash, split_of, string_field)
from data.splits import source_paths
from data.tokenizer import Tokenizer, encode_pair, tokenizer_of

SFT_TEST = "data/raw/sft_test.jsonl"
SFT_DIALOGUES_TEST = "data/raw/sft_dialogues_test.jsonl"  # held out by the same entities (data/fetch_data.py)


def follow_ups(obj: dict, where: str, report: Report) -> list:
    """The cases of a multi-turn record: every turn after the first, with the turns before it as
    history. (The first turn is a single question; the default test split has it as a pair.)"""
    conversation = conversation_of(obj, where, report)
    if conversation is None:
        return []
    system, turns = conversation
    return [{"prompt": q, "reference": a, "history": tuple(turns[:i]), "system": system}
            for i, (q, a) in enumerate(turns) if i]


def split_document(text: str) -> tuple[str, str]:
    """(first sentence, the rest): up to the first sentence end (data.records.SENTENCE_END: 。！？!?
    and any closing quotes after it, before a letter, a space or the end), else up to the first
    line break; white space after it belongs to the prompt. A trained tokenizer has tokens such as
    "。\n": a prompt cut before the "\n" ends in a token the model saw mostly at the end of a
    document, and a model with that tokenizer then ends at once (99% empty continuations)."""
    end = SENTENCE_END.search(text)
    cut = end.end() if end else text.find("\n") + 1
    if cut > 0:  # the line break after it stays in the prompt, where the document's own tokens have it
        cut = len(text) - len(text[cut:].lstrip())
    return (text[:cut], text[cut:].strip()) if cut > 0 else (text, "")


def load_cases(mode: str, source: str, data_meta: dict, report: Report, reference_chars: int = 200,
               seen: bool = False) -> list:
    """[{"prompt", "reference"}]: held out (the user's file, the SFT test split and its dialogues
    (follow_ups), or the val documents of the checkpoint's sources), or with seen=True what the model was trained on (the
    records of the checkpoint's sources that the prepare scripts wrote to train: by their own
    split rule (the document's hash, or the pair's entity; split_of) and, for pairs, only those
    that fit a block; [] when those files are not here)."""
    sources = source_paths(data_meta.get("sources", []))  # repository-relative or absolute (source_names)
    tok = tokenizer_of(data_meta)
    if seen:
        if not sources or not all(p.exists() for p in sources):
            return []
        paths = sources
    elif source:
        paths = expand_inputs(source, report)
        if not paths:
            sys.exit(f"--input={source}: no .json or .jsonl file there")
    elif mode == "chat":
        paths = [Path(SFT_TEST)] + [Path(SFT_DIALOGUES_TEST)] * Path(SFT_DIALOGUES_TEST).exists()
        if not paths[0].exists():
            sys.exit(f"{SFT_TEST} not found in {Path.cwd()}: run from the repository's folder after "
                     "python data/fetch_data.py, or pass --input=your_test.jsonl")
    else:
        paths = sources
        if not paths or not all(p.exists() for p in paths):
            sys.exit(f"the checkpoint's source documents ({', '.join(map(str, paths)) or 'none recorded'}) are "
                     "missing: put them back (python data/fetch_data.py for the default data), or pass --input= a "
                     "JSONL of {\"text\"} documents")
    cases = []
    for path in paths:
        for where, obj in read_records(path, report):
            if mode == "chat" and any(k in obj for k in CONVERSATION_KEYS):
                if not seen:  # the seen set is single questions; a dialogue of the sources is left out
                    cases += follow_ups(obj, where, report)
                continue
            if mode == "chat":
                q, a = string_field(obj, "question", where, report), string_field(obj, "answer", where, report)
                if q and a and (not seen or trained_pair(tok, obj, q, a, data_meta)):
                    cases.append({"prompt": q, "reference": a})
                continue
            text = string_field(obj, "text", where, report)
            if text is None:
                continue
            text = clean_text(text, obj.get("title") if isinstance(obj.get("title"), str) else None)
            split = split_of(split_hash(text), data_meta)
            if split == "train" if seen else (source or split == "val"):
                prompt, rest = split_document(text)
                if rest:
                    cases.append({"prompt": prompt, "reference": rest[:reference_chars]})
                else:
                    report.add("one_sentence", where, "document has no text after its first sentence; skipped")
    return cases


def trained_pair(tok: Tokenizer, obj: dict, question: str, answer: str, data_meta: dict) -> bool:
    """Whether prepare_sft.py wrote this pair to train.bin (tokenized with tok, the checkpoint's
    tokenizer): its entity's split, and it fits a block."""
    q, a = (s.replace("\r\n", "\n").strip() for s in (question, answer))
    entity = obj.get("entity")
    if not (q and a) or not (entity is None or isinstance(entity, str)):
        return False
    return (split_of(split_hash(pair_entity(obj, q)), data_meta) == "train"
            and len(encode_pair(tok, q, a)[0]) <= data_meta["block_size"])
