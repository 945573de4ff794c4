"""MiniGLM's web app (Chinese UI): streaming chat, a two-model arena with votes and a leaderboard,
and an API that classmates' apps (and their arenas) call.

    python sample_gradio.py                                   # http://127.0.0.1:7860, every out*/ checkpoint
    python sample_gradio.py --models=out-cpu-sft,out-cpu --port=7861
    python sample_gradio.py --listen=True --auth=user:pass --api_key=SECRET   # classmates on the LAN: port 7860
    python sample_gradio.py --remotes=http://192.168.1.20:7860,http://192.168.1.21:7860   # their apps in the arena
    python sample_gradio.py --ui=False --api_key=SECRET       # only the OpenAI API (/v1, openai_api.py), no page

Each checkpoint is loaded once (the first at start, the others on first use) and shared by every
user; requests queue, at most `concurrency` generations run at a time. In the arena a model is a
local checkpoint or a classmate's running app by URL (http://host:7860, or http://host:7860#out-sft
for one of its models): only the URLs given with --remotes (the server connects to them, so a
visitor must not choose any address; --any_remote=True allows every URL, on a trusted network),
each connection and each streamed piece waiting at most --remote_timeout seconds. A question
longer than the model's context is cut to fit (the page says so). Paths (--models, --votes_path,
--examples_path) are relative to the working directory, as with any command line; run it from the
repository root as above, where make demo puts its out*/ folders. The API, with gradio_client:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")
    text, stats = client.predict("成语“画蛇添足”是什么意思？", api_name="/generate")
    client.predict("它出自哪里？", history=[["成语“画蛇添足”是什么意思？", text]], api_name="/generate")
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

from arena import VOTES, VoteBook, leaderboard  # noqa: E402
from checkpoint import mode_of  # noqa: E402
from configurator import configure  # noqa: E402
from engine import RENAMED_DTYPE, SAMPLING, SAMPLING_DEFAULTS, exit_on_bad_flags, pick_precision  # noqa: E402
from model import select_device  # noqa: E402
from openai_api import OpenAIRoutes, serve  # noqa: E402
from serving import (ERROR_MARK, ModelError, ModelStore, check_params, clean_question, discover_models,  # noqa: E402
                     stream_together)
from webpage import (EMPTY_REPLY, FACTS_HEADERS, api_help, chat_history, facts_rows, load_examples,  # noqa: E402
                     newest_exchanges, stats_line)

QUEUE_POLL = 0.01  # seconds between the queue's looks for a new request (queue_app)

# ----------------------------------------------------------------------------- defaults
models = ""                 # out dirs, comma-separated; "" = every out*/ folder here (or below) with a ckpt.pt
listen = False              # True: listen on all interfaces so classmates on the LAN can connect
port = 7860
auth = ""                   # "user:password" to ask for a login
remotes = ""                # classmates' app URLs the arena may call, comma-separated ("" = none)
any_remote = False          # True: the arena may call any URL typed in (the server connects to it)
remote_timeout = 60.0       # seconds a classmate's app may take to connect, and for each streamed piece
votes_path = "out-arena/votes.jsonl"
examples_path = ""          # a .jsonl with "question" fields, or a .txt with one a line; "" = data/raw/sft_test.jsonl
                            # if it is here, else the bundled config/demo_questions.txt
max_input_chars = 200       # longer questions are cut to this many characters, with a notice
concurrency = 2             # generations at once (chat, arena sides, /generate and /v1 share it); the rest queue
queue_size = 64             # waiting requests beyond this are turned away with a message (/v1: status 429)
ui = True                   # False: serve only the OpenAI API (/v1), no web page (a machine without a browser)
api_key = ""                # /v1 requires "Authorization: Bearer <key>"; "" = the env var MINIGLM_API_KEY, if set
stream_every = 0.05         # seconds between streamed updates (0: one per piece); each costs the server time
device = ""                 # "" = cuda, then mps, then cpu
precision = ""              # fp32, bf16, fp16 or int8; "" = the fastest on this device (engine.pick_precision)
lora_base = ""              # LoRA models: their base (ckpt.pt or out_dir), if it is no longer where it was
# -----------------------------------------------------------------------------
RENAMED_KEYS = {"dtype": RENAMED_DTYPE}  # --dtype is training's autocast type; generation has --precision

MODES = {"问答": "chat", "续写": "generate"}
REMOTE_INFO = "本地模型，或同学应用的地址 http://IP:端口（须在启动时用 --remotes 允许）"
PRIVATE = {"api_visibility": "private"}  # the page's own events: not part of the API
# The sampling sliders, one per engine.SAMPLING setting (which gives the default and the range):
# label, step, and for two settings a lower top, the useful part (a slider over tens of thousands of top_k values
# cannot be aimed; the API takes the whole range).
SLIDERS = {"max_new_tokens": ("最多生成 token 数（max_new_tokens）", 1, 512),
           "temperature": ("温度（temperature，0 为贪心）", 0.05, None),
           "top_k": ("top_k（0 为不限）", 1, 200),
           "top_p": ("top_p（0 为只取最可能的 token）", 0.05, None),
           "repetition_penalty": ("重复惩罚（repetition_penalty）", 0.05, None)}


INTRO = """# MiniGLM 小型中文对话模型
**对话**：和一个模型多轮聊天，回答逐字显示；模型会看到前面的问答（放不下时略去最早的几轮），“清空”开始新对话。
**竞技场**：同一个问题让两个模型同时作答（各自接着自己前面的回答），投票选出更好的一个，票数计入排行榜。
**API**：同学可以用 gradio_client，或者 OpenAI 兼容接口（`/v1`，openai 客户端等）调用本应用的模型（见“API”页）。"""

def sampling_sliders() -> list:
    """The sliders in engine.SAMPLING's order, made but not yet shown: both tabs read them, the page
    shows them below the tabs."""
    return [gr.Slider(lo, top or hi, default, step=step, label=label, render=False)
            for (default, lo, hi, _), (label, step, top) in ((SAMPLING[k], SLIDERS[k]) for k in SAMPLING)]


def chat_tab(store: ModelStore, names: list, examples: list, sampling: list, limit: int, queued: dict) -> None:
    """The 对话 tab: pick a model and a mode, ask, the answer streams in; stop and clear. In 问答 mode
    the conversation shown is the history: each question comes after the earlier exchanges (as many
    as fit the model's context, webpage.chat_history); 清空 starts a new conversation."""
    default = names[0] if names else None

    def mode_label(name):
        try:
            return "问答" if mode_of(store.local(name)[1]) == "chat" else "续写"
        except ModelError as e:
            gr.Warning(str(e))
            return gr.skip()

    def chat(message, shown, name, label, *settings):
        question, notice = clean_question(message, limit)
        if not question:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        if notice:
            gr.Warning(notice)
        history = chat_history(shown) if MODES[label] == "chat" else ()
        shown = (shown or []) + [{"role": "user", "content": question}]
        yield shown, "", "生成中……"
        try:
            if not name:
                raise ModelError("没有可用的模型：先训练一个（make demo），再重新启动本应用。")
            p = check_params(dict(zip(SAMPLING, settings, strict=True)))
            for text, stats in store.stream(name, question, MODES[label], p, history):
                if not text and "new_tokens" in stats:
                    text = EMPTY_REPLY
                yield shown + [{"role": "assistant", "content": text}], "", stats_line(stats)
        except (ModelError, ValueError) as e:
            yield shown + [{"role": "assistant", "content": f"{ERROR_MARK}{e}"}], "", ""

    with gr.Row():
        model_box = gr.Dropdown(names, value=default, label="模型", scale=3)
        mode_box = gr.Radio(list(MODES), value=mode_label(default) if default else "问答", label="模式", scale=2)
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
    model_box.change(mode_label, model_box, mode_box, **PRIVATE)
    inputs = [box, chatbot, model_box, mode_box, *sampling]
    runs = [ev(chat, inputs, [chatbot, box, status], **queued, **PRIVATE) for ev in (box.submit, send.click)]
    stop.click(None, cancels=runs, **PRIVATE)
    clear.click(lambda: ([], "", ""), None, [chatbot, box, status], cancels=runs, **PRIVATE)


def arena_tab(demo: gr.Blocks, store: ModelStore, votes: VoteBook, names: list, sampling: list, limit: int,
              queued: dict) -> None:
    """The 竞技场 tab: two models (local, or a classmate's app by URL) answer the same question side
    by side, each after its own earlier answers (its chat is its history, webpage.chat_history);
    when both are done the round can get one vote (votes_panel); 清空 starts a new conversation."""

    def arena(message, shown_a, shown_b, a, b, *settings):
        question, notice = clean_question(message, limit)
        if not question:
            yield gr.skip(), gr.skip(), None, gr.skip()
            return
        if notice:
            gr.Warning(notice)
        if not a or not b:
            yield gr.skip(), gr.skip(), None, "请先选好模型 A 和模型 B。"
            return
        try:
            p = check_params(dict(zip(SAMPLING, settings, strict=True)))
        except ValueError as e:
            yield gr.skip(), gr.skip(), None, f"{ERROR_MARK}{e}"
            return
        histories = [chat_history(shown) for shown in (shown_a, shown_b)]
        asked = [(shown or []) + [{"role": "user", "content": question}] for shown in (shown_a, shown_b)]
        sides = [("", {}), ("", {})]
        yield *asked, None, "生成中……"
        for sides in stream_together([store.stream(m, question, "", p, h) for m, h in zip((a, b), histories)]):
            shown = [chat + [{"role": "assistant", "content": EMPTY_REPLY if not text and "new_tokens" in stats
                              else text}] for chat, (text, stats) in zip(asked, sides)]
            yield *shown, None, f"A：{stats_line(sides[0][1])}  \nB：{stats_line(sides[1][1])}"
        done = all("new_tokens" in s for _, s in sides)
        round_ = {"question": question, "model_a": a, "model_b": b, "answer_a": sides[0][0],
                  "answer_b": sides[1][0], "history_a": [list(h) for h in histories[0]],
                  "history_b": [list(h) for h in histories[1]], "settings": p} if done else None
        note = "两个回答都好了，请投票。" if done else "有模型没能作答，这一轮不能投票。"
        yield (gr.skip(), gr.skip(), round_,
               f"A：{stats_line(sides[0][1])}  \nB：{stats_line(sides[1][1])}  \n{note}")

    with gr.Row():
        a_box = gr.Dropdown(names, value=names[0] if names else None, label="模型 A", allow_custom_value=True,
                            elem_id="arena-a", info=REMOTE_INFO)
        b_box = gr.Dropdown(names, value=names[-1] if names else None, label="模型 B", allow_custom_value=True,
                            elem_id="arena-b", info=REMOTE_INFO)
    box = gr.Textbox(placeholder=f"输入问题，两个模型同时作答（最多 {limit} 字）", show_label=False,
                     elem_id="arena-input")
    with gr.Row():
        send = gr.Button("开始对战", variant="primary", elem_id="arena-send")
        stop = gr.Button("停止", elem_id="arena-stop")
        clear = gr.Button("清空", elem_id="arena-clear")
    with gr.Row():
        chat_a = gr.Chatbot(label="模型 A", height=300, elem_id="answer-a")
        chat_b = gr.Chatbot(label="模型 B", height=300, elem_id="answer-b")
    status = gr.Markdown(elem_id="arena-status")
    round_state = gr.State(None)  # the finished round waiting for its vote; None: nothing to vote on
    votes_panel(demo, votes, round_state)
    outputs = [chat_a, chat_b, round_state, status]
    fights = [ev(arena, [box, chat_a, chat_b, a_box, b_box, *sampling], outputs, **queued, **PRIVATE)
              for ev in (box.submit, send.click)]
    stop.click(None, cancels=fights, **PRIVATE)
    clear.click(lambda: ([], [], None, ""), None, outputs, cancels=fights, **PRIVATE)


def votes_panel(demo: gr.Blocks, votes: VoteBook, round_state: gr.State) -> None:
    """The vote buttons (one vote per finished round, appended to the votes file) and the Elo
    leaderboard, shown when the page opens and after each vote."""

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

    with gr.Row():
        buttons = {k: gr.Button(label, elem_id=f"vote-{k}") for k, label in VOTES.items()}
    gr.Markdown("### 排行榜（Elo，初始 1000 分）")
    table = gr.Dataframe(headers=["模型", "Elo", "对局", "胜", "负", "平", "胜率"], interactive=False,
                         elem_id="leaderboard")
    note = gr.Markdown()
    for kind, button in buttons.items():
        button.click(lambda r, kind=kind: vote(kind, r), round_state, [table, note, round_state], **PRIVATE)
    demo.load(board, None, [table, note], **PRIVATE)


def api_endpoints(store: ModelStore, names: list, limit: int, queued: dict) -> None:
    """The API classmates call with gradio_client: /generate (streams) and /models."""
    default = names[0] if names else None

    def generate(question: str, mode: str = "", max_new_tokens: int = SAMPLING_DEFAULTS["max_new_tokens"],
                 temperature: float = SAMPLING_DEFAULTS["temperature"], top_k: int = SAMPLING_DEFAULTS["top_k"],
                 top_p: float = SAMPLING_DEFAULTS["top_p"],
                 repetition_penalty: float = SAMPLING_DEFAULTS["repetition_penalty"], model: str = "",
                 seed: int = -1, history: list[list[str]] | None = None) -> Iterator[tuple[str, dict]]:
        """Stream a reply: yields (text so far, stats). mode: "chat" (问答), "generate" (续写) or "" (the
        model's own); model: one of /models ("" = the first); seed: -1 = random; history: the earlier
        [question, answer] exchanges, oldest first (chat mode: the oldest that do not fit the context
        are left out, webpage.newest_exchanges). Questions over the app's limit or the model's context
        are cut (stats["notice"] says so); an empty question gives ("", notice)."""
        if not isinstance(question, str) or mode not in ("", *MODES.values(), *MODES):
            raise gr.Error("question 应为字符串；mode 应为 chat、generate 或空")
        if not isinstance(model, str) or model.startswith(("http://", "https://")):
            raise gr.Error("model 应为本应用的模型名（见 /models）")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise gr.Error(f"seed={seed!r}：应为整数（-1 为随机）")
        history = [] if history is None else history
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(
                isinstance(s, str) for s in h) for h in history):
            raise gr.Error('history 应为 [问题, 回答] 对的列表，最早的在前，如 [["问题1", "回答1"], ["问题2", "回答2"]]'
                           f"（可省略：单轮问答）；收到 {str(history)[:80]}")
        question, notice = clean_question(question, limit)
        if not question:
            yield "", {"notice": "输入为空，已忽略。"}
            return
        try:
            p = check_params(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed))
            if not (model or default):
                raise ModelError("这个应用里没有模型")
            for text, stats in store.stream(model or default, question, MODES.get(mode, mode), p,
                                            newest_exchanges(history)):
                notices = " ".join(n for n in (notice, stats.get("notice")) if n)
                yield text, stats | ({"notice": notices} if notices else {})
        except (ModelError, ValueError) as e:
            raise gr.Error(str(e)) from e

    def list_models() -> list[str]:
        """The model names /generate's model= takes; the first is the default."""
        return names

    gr.api(generate, api_name="generate", **queued)
    gr.api(list_models, api_name="models")


def queue_app(app: gr.Blocks, concurrency: int, max_size: int | None = None) -> gr.Blocks:
    """app with its queue: concurrency generations at a time, at most max_size waiting. Gradio's
    queue looks for a new request every millisecond (Queue.sleep_when_free; 50 ms on Windows), a
    thousand wakeups a second of the event loop, each taking a core from the reply's OpenMP
    threads and the GIL from its thread: 6% of the app's speed (issue 13). Every QUEUE_POLL
    seconds instead: a new request waits at most that long to be noticed."""
    app.queue(default_concurrency_limit=concurrency, max_size=max_size)
    app._queue.sleep_when_free = QUEUE_POLL
    return app


def build_app(store: ModelStore, votes: VoteBook, examples: list, limit: int = 200, concurrency: int = 2,
              url: str = "http://127.0.0.1:7860") -> gr.Blocks:
    """The Gradio app: tabs 对话 (chat), 竞技场 (arena), API, the sampling sliders both tabs share;
    plus the API endpoints /generate and /models. Every generation (chat, each arena side, the API)
    is in one concurrency group of concurrency at a time."""
    names = store.names()
    queued = {"concurrency_id": "generate", "concurrency_limit": concurrency}
    sampling = sampling_sliders()
    with gr.Blocks(title="MiniGLM", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        if not names:
            gr.Markdown("**没有找到模型。** 先运行 `make demo`（或 `python train.py config/train_cpu.py`），"
                        "模型会保存在 out*/ 文件夹里，然后重新启动本应用。", elem_id="no-models")
        with gr.Tab("对话", elem_id="tab-chat"):
            chat_tab(store, names, examples, sampling, limit, queued)
        with gr.Tab("竞技场", elem_id="tab-arena"):
            arena_tab(demo, store, votes, names, sampling, limit, queued)
        with gr.Tab("API", elem_id="tab-api"):
            gr.Markdown(api_help(url, limit, names[0] if names else "out-cpu-sft"))
            gr.Dataframe(facts_rows(store), headers=FACTS_HEADERS, interactive=False, elem_id="model-facts")
        with gr.Accordion("采样参数（对话和竞技场共用）", open=False):
            with gr.Row():
                for slider in sampling:
                    slider.render()
        api_endpoints(store, names, limit, queued)
    return demo


if __name__ == "__main__":
    config = configure(globals())
    user, _, password = auth.partition(":")
    api_key = api_key or os.environ.get("MINIGLM_API_KEY", "")
    if auth and not (user and password):
        sys.exit(f"--auth={auth!r}: expected user:password")
    if listen and auth and not api_key:
        sys.exit("--listen=True with --auth but no --api_key: the login protects the page only, not the OpenAI API "
                 "(/v1). Add --api_key=<a secret> (or set MINIGLM_API_KEY).")
    if not 1 <= concurrency <= 64 or max_input_chars < 1 or stream_every < 0 or remote_timeout <= 0 or queue_size < 1:
        sys.exit("--concurrency: expected 1..64; --max_input_chars: expected >= 1; --stream_every: expected >= 0; "
                 "--remote_timeout: expected > 0; --queue_size: expected >= 1")
    exit_on_bad_flags(SAMPLING_DEFAULTS | config)  # checks --precision (the app has no sampling flags)
    allowed = [u for u in remotes.split(",") if u]
    if bad_url := next((u for u in allowed if not u.startswith(("http://", "https://"))), None):
        sys.exit(f"--remotes: {bad_url!r} is not a URL; expected http://host:port, comma-separated")
    if examples_path and not Path(examples_path).is_file():
        sys.exit(f"--examples_path={examples_path!r}: no such file in {Path.cwd()} (a .jsonl with \"question\" "
                 "fields or a .txt with one question a line; empty: the SFT test split or the bundled examples)")
    device, _ = select_device(device)
    precision = pick_precision(device, precision)
    paths = {m: Path(m) for m in models.split(",") if m} if models else discover_models()
    for name, path in ((n, p) for n, p in paths.items() if not (p / "ckpt.pt").exists()):
        print(f"warning: {path / 'ckpt.pt'} does not exist; the page will say so when {name} is used", file=sys.stderr)
    print(f"models: {', '.join(paths) or f'none found in {Path.cwd()} (train one first: make demo)'}; "
          f"{device}, {precision}", file=sys.stderr)
    store = ModelStore(paths, device, precision, stream_every, allowed, any_remote, timeout=remote_timeout,
                       concurrency=concurrency, lora_base=lora_base)
    host = "0.0.0.0" if listen else "127.0.0.1"
    shown = f"http://{'<你的局域网 IP>' if listen else host}:{port}"
    print(f"arena votes: {Path(votes_path).resolve()}" if ui else "no web page (--ui=False)", file=sys.stderr)
    app = queue_app(build_app(store, VoteBook(votes_path), load_examples(examples_path), max_input_chars,
                              concurrency, url=shown), concurrency, queue_size) if ui else None
    lan = f"（同学用 http://<你的局域网 IP>:{port} 访问；ip addr 或 ipconfig 查看 IP）" if listen else ""
    print(f"MiniGLM 网页版：http://{host}:{port}{lan}\n" if ui else "", f"OpenAI 兼容 API：http://{host}:{port}/v1"
          f"{'（需要 API key）' if api_key else ''}", sep="", file=sys.stderr)
    print(f"arena remotes: {'any URL (--any_remote=True)' if any_remote else ', '.join(allowed) or 'none'}",
          file=sys.stderr)
    if listen and not (auth and api_key):
        print("WARNING: --listen=True without --auth and --api_key: anyone on your network can use this app or its "
              "API, no password asked. Add --auth=user:password --api_key=<a secret>.\n"
              "警告：局域网里的任何人都能不登录直接使用本应用或它的 API，请加上 --auth=用户名:密码 --api_key=密钥。",
              file=sys.stderr)
    if listen and any_remote:
        print("WARNING: --any_remote=True with --listen=True: anyone who can open the page can make this "
              "machine connect to any address. Prefer --remotes=URL,URL.", file=sys.stderr)
    serve(OpenAIRoutes(store, max_input_chars, queue_size, api_key), app, host, port,
          (user, password) if auth else None)
