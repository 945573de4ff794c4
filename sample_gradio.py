"""MiniGLM's web app (Chinese UI): streaming chat, a two-model arena with votes and a leaderboard,
and an API that classmates' apps (and their arenas) call.

    python sample_gradio.py                                   # http://127.0.0.1:7860, every out*/ checkpoint
    python sample_gradio.py --models=out-cpu-sft,out-cpu --port=7861
    python sample_gradio.py --listen=True --auth=user:pass    # classmates on the LAN: http://<your LAN IP>:7860
    python sample_gradio.py --remotes=http://192.168.1.20:7860,http://192.168.1.21:7860   # their apps in the arena

Each checkpoint is loaded once (the first at start, the others on first use) and shared by every
user; requests queue, at most `concurrency` generations run at a time. In the arena a model is a
local checkpoint or a classmate's running app by URL (http://host:7860, or http://host:7860#out-sft
for one of its models): only the URLs given with --remotes (the server connects to them, so a
visitor must not choose any address; --any_remote=True allows every URL, on a trusted network),
each connection and each streamed piece waiting at most --remote_timeout seconds. A question
longer than the model's context is cut to fit (the page says so). The API, with gradio_client:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")
    text, stats = client.predict("成语“画蛇添足”是什么意思？", api_name="/generate")
    for text, stats in client.submit("床前明月光", "generate", 64, api_name="/generate"):
        print(text)                                           # the text so far, as it streams
    client.predict(api_name="/models")                        # the names /generate's model= takes
"""
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: set before gradio loads
import gradio as gr  # noqa: E402

from configurator import configure  # noqa: E402
from data.records import Report, read_records, string_field  # noqa: E402
from model import inference_dtype, select_device  # noqa: E402
from sample import SAMPLING_LIMITS, checkpoint_mode, utf8_constraint  # noqa: E402
from serving import (VOTES, ModelError, ModelStore, VoteBook, check_params, clean_question,  # noqa: E402
                     discover_models, leaderboard, stream_together)

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- defaults
models = ""                 # out dirs, comma-separated; "" = every out*/ folder (or below) with a ckpt.pt
listen = False              # True: listen on all interfaces so classmates on the LAN can connect
port = 7860
auth = ""                   # "user:password" to ask for a login
remotes = ""                # classmates' app URLs the arena may call, comma-separated ("" = none)
any_remote = False          # True: the arena may call any URL typed in (the server connects to it)
remote_timeout = 60.0       # seconds a classmate's app may take to connect, and for each streamed piece
votes_path = "out-arena/votes.jsonl"
examples_path = "data/raw/sft_test.jsonl"   # example questions (falls back to config/demo_questions.txt)
max_input_chars = 200       # longer questions are cut to this many characters, with a notice
concurrency = 2             # generations at once (chat, arena sides and API share it); the rest queue
queue_size = 64             # waiting requests beyond this are turned away with a message
stream_every = 0.05         # seconds between streamed updates (0: one per piece); each costs the server time
device = ""                 # "" = cuda, then mps, then cpu
dtype = ""                  # "" = bfloat16 where the GPU or CPU computes it natively, else float32
# -----------------------------------------------------------------------------

MODES = {"问答": "chat", "续写": "generate"}
REMOTE_INFO = "本地模型，或同学应用的地址 http://IP:端口（须在启动时用 --remotes 允许）"


def stats_line(stats: dict) -> str:
    if "new_tokens" not in stats:
        return f"{stats.get('model', '')} 生成中……"
    first = stats.get("first_token_s")
    return (f"{stats.get('model', '')} · {'问答' if stats.get('mode') == 'chat' else '续写'} · "
            f"{stats['new_tokens']} tokens · 首字 {'-' if first is None else f'{first:.2f} s'} · "
            f"{stats['tokens_per_s']} tokens/s" + ("" if stats.get("stopped_at_eot") else " · 到达长度上限")
            + (f"  \n{stats['notice']}" if stats.get("notice") else ""))


def load_examples(path, n: int = 8) -> list:
    """Example questions: one of each kind from the SFT test split, then the next ones, up to n;
    the demo questions when the split is not there."""
    path = ROOT / path
    if not path.exists():
        lines = (ROOT / "config/demo_questions.txt").read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()][:n]
    first, rest, report = {}, [], Report()
    for where, obj in read_records(path, report):
        q = string_field(obj, "question", where, report)
        if q and obj.get("kind") not in first:
            first[obj.get("kind")] = q
        elif q and len(rest) < n:
            rest.append(q)
    return (list(first.values()) + rest)[:n]


INTRO = """# MiniGLM 小型中文对话模型
**对话**：和一个模型聊天，回答逐字显示。**竞技场**：同一个问题让两个模型同时作答，投票选出更好的一个，票数计入排行榜。
**API**：同学可以用 gradio_client 调用本应用的模型（见“API”页）。每个问题单独回答（训练数据是单轮问答）。"""

API_HELP = """### 用 gradio_client 调用本应用
```python
from gradio_client import Client
client = Client("{url}")
text, stats = client.predict("成语“画蛇添足”是什么意思？", api_name="/generate")
# 逐字流式：
for text, stats in client.submit("床前明月光", "generate", 64, api_name="/generate"):
    print(text)
client.predict(api_name="/models")    # 可用的模型名
```
`/generate` 的参数依次为：question，mode（"chat" 问答 / "generate" 续写 / "" 按模型自己的模式），
max_new_tokens，temperature，top_k，top_p，repetition_penalty，model（"" 为第一个模型），seed（-1 为随机）。
返回 (目前的文字, 统计信息)。问题最多 {limit} 字，超出部分会被截掉；超过模型上下文的问题只用能放下的部分，
统计信息里的 notice 会说明。
在竞技场里填 `http://同学的IP:端口`（或 `http://同学的IP:端口#模型名`）就能让同学的模型参赛，
前提是启动本应用时用 `--remotes=http://同学的IP:端口` 允许了这个地址。"""


def build_app(store: ModelStore, votes: VoteBook, examples: list, limit: int = 200, concurrency: int = 2,
              url: str = "http://127.0.0.1:7860") -> gr.Blocks:
    """The Gradio app: tabs 对话 (chat), 竞技场 (arena), API; plus the API endpoints /generate and /models."""
    names = store.names()
    default = names[0] if names else None
    shared = {"concurrency_id": "generate", "concurrency_limit": concurrency}

    def mode_label(name):
        try:
            return "问答" if checkpoint_mode(store.local(name)[1]) == "chat" else "续写"
        except ModelError as e:
            gr.Warning(str(e))
            return gr.skip()

    def chat(message, history, name, label, *sampling):
        question, notice = clean_question(message, limit)
        if not question:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        if notice:
            gr.Warning(notice)
        history = (history or []) + [{"role": "user", "content": question}]
        yield history, "", "生成中……"
        try:
            if not name:
                raise ModelError("没有可用的模型：先训练一个（make demo），再重新启动本应用。")
            p = check_params(dict(zip(SAMPLING_LIMITS, sampling, strict=True)))
            for text, stats in store.stream(name, question, MODES[label], p):
                if not text and "new_tokens" in stats:
                    text = "（空回答：模型一开始就结束了）"
                yield history + [{"role": "assistant", "content": text}], "", stats_line(stats)
        except (ModelError, ValueError) as e:
            yield history + [{"role": "assistant", "content": f"【出错】{e}"}], "", ""

    def arena(message, a, b, *sampling):
        question, notice = clean_question(message, limit)
        if not question:
            yield gr.skip(), gr.skip(), None, gr.skip()
            return
        if notice:
            gr.Warning(notice)
        if not a or not b:
            yield "", "", None, "请先选好模型 A 和模型 B。"
            return
        try:
            p = check_params(dict(zip(SAMPLING_LIMITS, sampling, strict=True)))
        except ValueError as e:
            yield "", "", None, f"【出错】{e}"
            return
        sides = [("", {}), ("", {})]
        yield "", "", None, "生成中……"
        for sides in stream_together([store.stream(a, question, "", p), store.stream(b, question, "", p)]):
            yield sides[0][0], sides[1][0], None, f"A：{stats_line(sides[0][1])}  \nB：{stats_line(sides[1][1])}"
        done = all("new_tokens" in s for _, s in sides)
        round_ = {"question": question, "model_a": a, "model_b": b, "answer_a": sides[0][0],
                  "answer_b": sides[1][0], "settings": p} if done else None
        note = "两个回答都好了，请投票。" if done else "有模型没能作答，这一轮不能投票。"
        yield (gr.skip(), gr.skip(), round_,
               f"A：{stats_line(sides[0][1])}  \nB：{stats_line(sides[1][1])}  \n{note}")

    def board():
        good, report = votes.read()
        bad = sum(report.counts.values())
        skipped = f"；投票文件里有 {bad} 行无法读取，已跳过（行号见终端）" if bad else ""
        return leaderboard(good), f"共 {len(good)} 票{skipped}"

    def vote(kind, round_):
        if not round_:
            gr.Warning("请先在竞技场提问，等两个回答都生成完再投票（每轮一票）。")
            return gr.skip(), gr.skip(), None
        votes.add(round_ | {"vote": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        rows, count = board()
        return rows, f"已记录：{VOTES[kind]}。{count}", None

    def generate(question: str, mode: str = "", max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 0.95, repetition_penalty: float = 1.1, model: str = "",
                 seed: int = -1) -> Iterator[tuple[str, dict]]:
        """Stream a reply: yields (text so far, stats). mode: "chat" (问答), "generate" (续写) or "" (the
        model's own); model: one of /models ("" = the first); seed: -1 = random. Questions over the
        app's limit or the model's context are cut (stats["notice"] says so); an empty question
        gives ("", notice)."""
        if not isinstance(question, str) or mode not in ("", *MODES.values(), *MODES):
            raise gr.Error("question 应为字符串；mode 应为 chat、generate 或空")
        if not isinstance(model, str) or model.startswith(("http://", "https://")):
            raise gr.Error("model 应为本应用的模型名（见 /models）")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise gr.Error(f"seed={seed!r}：应为整数（-1 为随机）")
        question, notice = clean_question(question, limit)
        if not question:
            yield "", {"notice": "输入为空，已忽略。"}
            return
        try:
            p = check_params(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed))
            if not (model or default):
                raise ModelError("这个应用里没有模型")
            for text, stats in store.stream(model or default, question, MODES.get(mode, mode), p):
                notices = " ".join(n for n in (notice, stats.get("notice")) if n)
                yield text, stats | ({"notice": notices} if notices else {})
        except (ModelError, ValueError) as e:
            raise gr.Error(str(e)) from e

    def list_models() -> list[str]:
        """The model names /generate's model= takes; the first is the default."""
        return names

    ui = {"api_visibility": "private"}
    with gr.Blocks(title="MiniGLM", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if not names:
            gr.Markdown("**没有找到模型。** 先运行 `make demo`（或 `python train.py config/train_cpu.py`），"
                        "模型会保存在 out*/ 文件夹里，然后重新启动本应用。", elem_id="no-models")
        with gr.Tab("对话", elem_id="tab-chat"):
            with gr.Row():
                model_box = gr.Dropdown(names, value=default, label="模型", scale=3)
                mode_box = gr.Radio(list(MODES), value=mode_label(default) if default else "问答", label="模式",
                                    scale=2)
            chatbot = gr.Chatbot(label="MiniGLM", height=380, elem_id="chatbot")
            with gr.Row():
                box = gr.Textbox(placeholder=f"输入问题，回车发送（最多 {limit} 字）", show_label=False, scale=6,
                                 elem_id="chat-input")
                send = gr.Button("发送", variant="primary", scale=1, min_width=60, elem_id="chat-send")
                stop = gr.Button("停止", scale=1, min_width=60, elem_id="chat-stop")
                clear = gr.Button("清空", scale=1, min_width=60, elem_id="chat-clear")
            status = gr.Markdown(elem_id="chat-status")
            if examples:
                gr.Examples([[q] for q in examples], inputs=box, label="示例问题（来自 SFT 测试集）")
        with gr.Tab("竞技场", elem_id="tab-arena"):
            with gr.Row():
                a_box = gr.Dropdown(names, value=default, label="模型 A", allow_custom_value=True, elem_id="arena-a",
                                    info=REMOTE_INFO)
                b_box = gr.Dropdown(names, value=names[-1] if names else None, label="模型 B",
                                    allow_custom_value=True, elem_id="arena-b", info=REMOTE_INFO)
            arena_box = gr.Textbox(placeholder=f"输入问题，两个模型同时作答（最多 {limit} 字）", show_label=False,
                                   elem_id="arena-input")
            with gr.Row():
                arena_send = gr.Button("开始对战", variant="primary", elem_id="arena-send")
                arena_stop = gr.Button("停止", elem_id="arena-stop")
            with gr.Row():
                answer_a = gr.Textbox(label="模型 A 的回答", lines=8, interactive=False, elem_id="answer-a")
                answer_b = gr.Textbox(label="模型 B 的回答", lines=8, interactive=False, elem_id="answer-b")
            arena_status = gr.Markdown(elem_id="arena-status")
            with gr.Row():
                vote_buttons = {k: gr.Button(label, elem_id=f"vote-{k}") for k, label in VOTES.items()}
            gr.Markdown("### 排行榜（Elo，初始 1000 分）")
            table = gr.Dataframe(headers=["模型", "Elo", "对局", "胜", "负", "平", "胜率"], interactive=False,
                                 elem_id="leaderboard")
            table_note = gr.Markdown()
            round_state = gr.State(None)
        with gr.Tab("API", elem_id="tab-api"):
            gr.Markdown(API_HELP.format(url=url, limit=limit))
        with gr.Accordion("采样参数（对话和竞技场共用）", open=False):
            with gr.Row():
                lim = {k: v[:2] for k, v in SAMPLING_LIMITS.items()}  # max_new_tokens, top_k: a useful part only
                sampling = [gr.Slider(1, 512, 256, step=1, label="最多生成 token 数（max_new_tokens）"),
                            gr.Slider(*lim["temperature"], 0.8, step=0.05, label="温度（temperature，0 为贪心）"),
                            gr.Slider(0, 200, 50, step=1, label="top_k（0 为不限）"),
                            gr.Slider(*lim["top_p"], 0.95, step=0.05, label="top_p（0 为只取最可能的 token）"),
                            gr.Slider(*lim["repetition_penalty"], 1.1, step=0.05, label="重复惩罚（repetition_penalty）")]

        model_box.change(mode_label, model_box, mode_box, **ui)
        chat_inputs = [box, chatbot, model_box, mode_box, *sampling]
        runs = [ev(chat, chat_inputs, [chatbot, box, status], **shared, **ui) for ev in (box.submit, send.click)]
        stop.click(None, cancels=runs, **ui)
        clear.click(lambda: ([], "", ""), None, [chatbot, box, status], cancels=runs, **ui)
        arena_inputs = [arena_box, a_box, b_box, *sampling]
        arena_outputs = [answer_a, answer_b, round_state, arena_status]
        fights = [ev(arena, arena_inputs, arena_outputs, **shared, **ui) for ev in (arena_box.submit, arena_send.click)]
        arena_stop.click(None, cancels=fights, **ui)
        for kind, button in vote_buttons.items():
            button.click(lambda r, kind=kind: vote(kind, r), round_state, [table, table_note, round_state], **ui)
        demo.load(board, None, [table, table_note], **ui)
        gr.api(generate, api_name="generate", **shared)
        gr.api(list_models, api_name="models")
    return demo


if __name__ == "__main__":
    config = configure(globals())
    user, _, password = auth.partition(":")
    if auth and not (user and password):
        sys.exit(f"--auth={auth!r}: expected user:password")
    if not 1 <= concurrency <= 64 or max_input_chars < 1 or stream_every < 0 or remote_timeout <= 0:
        sys.exit("--concurrency: expected 1..64; --max_input_chars: expected >= 1; --stream_every: expected >= 0; "
                 "--remote_timeout: expected > 0")
    allowed = [u for u in remotes.split(",") if u]
    for u in allowed:
        if not u.startswith(("http://", "https://")):
            sys.exit(f"--remotes: {u!r} is not a URL; expected http://host:port, comma-separated")
    try:
        device, _ = select_device(device)
        dtype = inference_dtype(device, dtype)
    except ValueError as e:
        sys.exit(str(e))
    paths = {m: ROOT / m for m in models.split(",") if m} if models else discover_models()
    for name, path in paths.items():
        if not (path / "ckpt.pt").exists():
            print(f"warning: {path / 'ckpt.pt'} does not exist; the page will say so when {name} is used",
                  file=sys.stderr)
    print(f"models: {', '.join(paths) or 'none found (train one first: make demo)'}; {device}, {dtype}",
          file=sys.stderr)
    store = ModelStore(paths, device, dtype, stream_every, allowed, any_remote, timeout=remote_timeout)
    utf8_constraint()  # build the sampling table now rather than in the first request
    host = "0.0.0.0" if listen else "127.0.0.1"
    app = build_app(store, VoteBook(ROOT / votes_path), load_examples(examples_path), max_input_chars, concurrency,
                    url=f"http://{'<你的局域网 IP>' if listen else host}:{port}")
    app.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    lan = f"（同学用 http://<你的局域网 IP>:{port} 访问；ip addr 或 ipconfig 查看 IP）" if listen else ""
    print(f"MiniGLM 网页版：http://{host}:{port}{lan}", file=sys.stderr)
    print(f"arena remotes: {'any URL (--any_remote=True)' if any_remote else ', '.join(allowed) or 'none'}",
          file=sys.stderr)
    if listen and not auth:
        print("WARNING: --listen=True without --auth: anyone on your network can use this app and its API, "
              "no password asked. Add --auth=user:password.\n"
              "警告：局域网里的任何人都能不登录直接使用本应用和它的 API，请加上 --auth=用户名:密码。", file=sys.stderr)
    if listen and any_remote:
        print("WARNING: --any_remote=True with --listen=True: anyone who can open the page can make this "
              "machine connect to any address. Prefer --remotes=URL,URL.", file=sys.stderr)
    try:
        app.launch(server_name=host, server_port=port, auth=(user, password) if auth else None, ssr_mode=False,
                   show_error=False, quiet=True)
    except OSError as e:
        sys.exit(f"--port={port}: cannot serve there ({e}); pick another with --port=")

