"""The web page's pure helpers (sample_gradio.py builds the page): the lines it shows (a reply's
status, example questions, the API tab's help and model facts) and the conversation it reads back
from a gr.Chatbot as the model's history.

    from webpage import chat_history
    history = chat_history(chatbot_messages)   # ((question, answer), ...): the newest exchanges, whole
"""
from itertools import accumulate
from pathlib import Path

from data.records import Report, read_records, string_field
from serving import ERROR_MARK, ModelStore

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


FACTS_HEADERS = ["模型", "类型", "参数量", "分词器", "精度", "上下文长度（token）", "LoRA 基座"]  # the API tab's table
API_HELP = """### OpenAI 兼容 API（/v1）
`openai` 客户端、LangChain、Open WebUI 等工具都能直接调用本应用。问答（SFT）模型用 `/v1/chat/completions`，
预训练模型只会接着文字往下写，用 `/v1/completions`；`/v1/models` 列出下表中的模型和它们的信息。
```python
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="-")   # 启动时给了 --api_key 就填它
reply = client.chat.completions.create(model="{chat}", messages=[
    {{"role": "system", "content": "你是一个成语老师。"}},
    {{"role": "user", "content": "成语“画蛇添足”是什么意思？"}}], max_tokens=64, seed=1)
print(reply.choices[0].message.content)
for chunk in client.chat.completions.create(model="{chat}", stream=True,   # 逐字流式
                                            messages=[{{"role": "user", "content": "你好"}}]):
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="")
```
支持的参数：messages（system/user/assistant，最后一条必须是 user，之前的问答作为多轮历史），model（不填为
第一个问答模型），max_tokens，temperature，top_p，stop，seed，stream（以及 stream_options.include_usage），
n=1；另外可传 top_k 和 repetition_penalty（不传取网页的默认值）。每条消息最多 {limit} 字，超出部分截掉
（回复里的 notice 字段会说明）。网页和 API 共用同一个并发上限，排队太多时返回 429。
启动时给了 `--api_key`（或环境变量 MINIGLM_API_KEY）时，请求必须带上这个 key。

### 用 gradio_client 调用本应用
```python
from gradio_client import Client
client = Client("{url}")
text, stats = client.predict("成语“画蛇添足”是什么意思？", api_name="/generate")
for text, stats in client.submit("床前明月光", "generate", 64, api_name="/generate"):   # 逐字流式
    print(text)
# 多轮对话：history 是之前的 [问题, 回答] 列表，最早的在前
text, stats = client.predict("它出自哪里？", history=[["成语“画蛇添足”是什么意思？", text]], api_name="/generate")
client.predict(api_name="/models")    # 可用的模型名
```
`/generate` 的参数依次为：question，mode（"chat" 问答 / "generate" 续写 / "" 按模型自己的模式），
max_new_tokens，temperature，top_k，top_p，repetition_penalty，model（"" 为第一个模型），seed（-1 为随机），
history（问答模式下之前的对话，默认为空即单轮；放不进模型上下文的最早几轮会被略去）。
返回 (目前的文字, 统计信息)。问题最多 {limit} 字，超出部分会被截掉；超过模型上下文的问题只用能放下的部分，
统计信息里的 notice 会说明。
在竞技场里填 `http://同学的IP:端口`（或 `http://同学的IP:端口#模型名`）就能让同学的模型参赛，
前提是启动本应用时用 `--remotes=http://同学的IP:端口` 允许了这个地址。"""


def api_help(url: str, limit: int, chat: str) -> str:
    """The web page's API tab (Chinese): the OpenAI API (chat: a model name for the example), then /generate."""
    return API_HELP.format(url=url, limit=limit, chat=chat)


def facts_rows(store: ModelStore) -> list:
    """The API tab's table: one row of FACTS_HEADERS per local model (/v1/models' facts)."""
    kinds = {"chat": "问答（SFT）", "pretrained": "预训练（续写）", None: "无法读取"}
    return [[name, kinds[f["kind"]], f"{f['parameters'] / 1e6:.2f}M" if "parameters" in f else "-",
             f.get("tokenizer", "-"), f["precision"], f.get("context_length", "-"), f["lora_base"] or "-"]
            for name, f in ((n, store.facts()[n]) for n in store.names())]
