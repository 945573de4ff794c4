"""The web page's pure helpers (sample_gradio.py builds the page): the lines it shows (a reply's
status, example questions) and the conversation it reads back from a gr.Chatbot as the model's
history.

    from webpage import chat_history
    history = chat_history(chatbot_messages)   # ((question, answer), ...): the newest exchanges, whole
"""
from itertools import accumulate
from pathlib import Path

from data.records import Report, read_records, string_field
from serving import ERROR_MARK

# The example questions that come with the code (not user data): found from this file, so the page
# has them wherever the app is started.
DEMO_QUESTIONS = Path(__file__).resolve().parent / "config" / "demo_questions.txt"
SFT_TEST = "data/raw/sft_test.jsonl"
EMPTY_REPLY = "（空回答：模型一开始就结束了）"  # the page's stand-in for an empty reply
# The most characters of earlier exchanges a request keeps (the newest, whole): more than any model here
# has context for (fit_prompt decides what it sees), but no request makes it tokenize megabytes.
HISTORY_CHARS = 8192


def newest_exchanges(pairs, max_chars: int = HISTORY_CHARS) -> tuple:
    """The newest (question, answer) exchanges, whole, with at most max_chars characters in all."""
    pairs = tuple((q, a) for q, a in pairs)
    sizes = accumulate(len(q) + len(a) for q, a in reversed(pairs))  # the newest n exchanges' characters
    return pairs[len(pairs) - sum(size <= max_chars for size in sizes):]


def chat_history(messages) -> tuple:
    """The (question, answer) exchanges of a gr.Chatbot's messages ({"role", "content"} dicts, the
    content a string or a list of {"type": "text", "text"} parts), as the model's history: each
    user message with the reply after it; error replies, empty ones and unanswered questions are
    left out (newest_exchanges)."""
    pairs, question = [], None
    for m in messages or []:
        content = m.get("content")
        text = content if isinstance(content, str) else "".join(c.get("text") or "" for c in content or [])
        if m.get("role") == "user":
            question = text
        elif question is not None:
            if text.strip() and not text.startswith(ERROR_MARK) and text != EMPTY_REPLY:
                pairs.append((question, text))
            question = None
    return newest_exchanges(pairs)


def stats_line(stats: dict) -> str:
    """A reply's status line: generating, or model, mode, tokenizer, tokens, speed and any notice."""
    if "new_tokens" not in stats:
        return f"{stats.get('model', '')} 生成中……"
    first = stats.get("first_token_s")
    return (f"{stats.get('model', '')} · {'问答' if stats.get('mode') == 'chat' else '续写'} · "
            + (f"分词器 {stats['tokenizer']} · " if stats.get("tokenizer") else "") +
            f"{stats['new_tokens']} tokens · 首字 {'-' if first is None else f'{first:.2f} s'} · "
            f"{stats['tokens_per_s']} tokens/s" + ("" if stats.get("stopped_at_eot") else " · 到达长度上限")
            + (f"  \n{stats['notice']}" if stats.get("notice") else ""))


def load_examples(path: str = "", n: int = 8) -> list:
    """Up to n example questions from path: a .txt file, one a line; or JSONL records with a
    "question" (the SFT test split: one of each "kind" first, then the next ones). path "": the
    SFT test split if it is here, else the bundled demo questions."""
    path = Path(path or (SFT_TEST if Path(SFT_TEST).exists() else DEMO_QUESTIONS))
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    first, rest, report = {}, [], Report()
    for where, obj in read_records(path, report):
        q = string_field(obj, "question", where, report)
        if q and obj.get("kind") not in first:
            first[obj.get("kind")] = q
        elif q and len(rest) < n:
            rest.append(q)
    return (list(first.values()) + rest)[:n]
