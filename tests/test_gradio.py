"""sample_gradio.py and serving.py with real models and running apps: the model store, the API through
gradio_client (streaming, queueing, errors, a classmate's app by URL, timed out), the command line and
its paths. serving.py's parts without a running app: test_serving.py."""
import json
import shutil
import socket
import threading
import time

import httpx
import gradio as gr
import pytest
import torch
from conftest import PAIRS, read_bin, run_script
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_serving import GREEDY

import serving
from data.tokenizer import load_tokenizer
from engine import load_model, stream_reply
from sample_gradio import QUEUE_POLL, build_app, queue_app
from arena import VoteBook
from serving import ModelError, ModelStore, discover_models, start_app, stream_together
from webpage import DEMO_QUESTIONS, load_examples

GPT2 = load_tokenizer("gpt2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_model_is_prompted_with_the_tokens_it_was_trained_on(sft_model, monkeypatch):
    """What engine.stream_reply feeds the model for a question equals what prepare_sft.py wrote into train.bin
    before that question's answer (all pairs are in train, one block each, in file order)."""
    model, ckpt = load_model(sft_model)
    block = ckpt["data_meta"]["block_size"]
    tokens = read_bin(sft_model.parent / "data" / "train.bin").reshape(-1, block)
    masks = read_bin(sft_model.parent / "data" / "train_mask.bin", dtype="uint8").reshape(-1, block)
    assert len(tokens) == len(PAIRS)
    fed = []
    monkeypatch.setattr(model, "generate", lambda idx, *a, **k: fed.append(idx[0].tolist()) or iter([GPT2.eot_id]))
    for pair, row, mask in zip(PAIRS, tokens, masks, strict=True):
        list(stream_reply(model, ckpt, pair["question"], "chat", max_new_tokens=20))
        start = int(mask.argmax())  # the first trained target: the answer's first token
        assert fed[-1] == row[:start].tolist()
        assert GPT2.decode(row[start:start + int(mask.sum()) - 1].tolist()) == pair["answer"]


def test_discover_models_finds_checkpoints_under_out_folders(tmp_path):
    for d in ("out-a", "out-b/run1", "elsewhere", "out-c"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("out-a", "out-b/run1", "elsewhere"):
        (tmp_path / d / "ckpt.pt").write_bytes(b"")
    assert list(discover_models(tmp_path)) == ["out-a", "out-b/run1"]


def test_store_loads_each_model_once_and_explains_failures(sft_model, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ckpt.pt").write_bytes(b"not a checkpoint")
    pre = tmp_path / "pre"
    pre.mkdir()
    ckpt = torch.load(sft_model / "ckpt.pt", weights_only=True)
    ckpt["data_meta"]["kind"] = "pretrain"
    del ckpt["data_meta"]["sft_template"]  # as prepare.py's data: no question template
    torch.save(ckpt, pre / "ckpt.pt")
    (tmp_path / "misfit").mkdir()
    ckpt["model_args"]["n_embd"] *= 2
    torch.save(ckpt, tmp_path / "misfit" / "ckpt.pt")
    store = ModelStore({"pre": pre, "sft": sft_model, "broken": tmp_path / "broken", "gone": tmp_path / "gone",
                        "misfit": tmp_path / "misfit"})
    assert store.names()[0] == "sft"  # chat models first: the default
    assert store.local("sft") is store.local("sft")
    for name, words in [("broken", "cannot read it: not a MiniGLM checkpoint"), ("gone", "no checkpoint here"),
                        ("nope", "没有名为"), ("misfit", "do not fit the checkpoint's model_args")]:
        with pytest.raises(ModelError, match=words):
            list(store.stream(name, "你好", "", GREEDY))
    with pytest.raises(ModelError, match="pre 是预训练模型.*请改用“续写”模式"):
        list(store.stream("pre", "你好", "chat", GREEDY))
    assert list(store.stream("pre", "你好", "", GREEDY))[-1][1]["mode"] == "generate"
    _, stats = list(store.stream("sft", "问" * 30, "", GREEDY))[-1]  # 71 tokens, the model sees 48
    assert stats["notice"].startswith("输入过长：模型一次只能看 48 个 token，还要给回答留 12 个，所以只用了前 ")
    assert stats["prompt_tokens"] <= 36 and stats["kept_chars"] < 30
    history = [("天", "地"), ("山", "水"), ("风", "雨")]  # the question 13 tokens, with 1 / 2 exchanges 29 / 46:
    short = GREEDY | {"max_new_tokens": 12}  # the answer keeps 12 tokens, so the conversation may take 36
    _, stats = list(store.stream("sft", "日", "", short, history=history))[-1]
    assert stats["notice"].endswith("所以较早的 2 轮对话放不下，已略去。") and stats["kept_chars"] == 1
    _, stats = list(store.stream("sft", "日", "", short, history=history, system="老师" * 20))[-1]  # as in training:
    assert stats["notice"].endswith("较早的 3 轮对话放不下，已略去；系统提示放不下，已略去。")  # turns go, then the system
    assert "notice" not in list(store.stream("sft", "日", "", short, history=history[-1:]))[-1][1]
    text, stats = list(store.stream("sft", PAIRS[1]["question"], "", GREEDY))[-1]
    assert text == PAIRS[1]["answer"] and stats["stopped_at_eot"] and stats["mode"] == "chat"
    store.stream_every = 60  # updates are rationed: the first piece, then the whole reply
    texts = [text for text, _ in store.stream("sft", PAIRS[1]["question"], "", GREEDY)]
    assert texts == [PAIRS[1]["answer"][0], PAIRS[1]["answer"]]


def test_loads_and_streams_run_on_threads_of_their_own_that_end_with_them(sft_model, monkeypatch):
    """A load (the page loads the default model on the main thread) and a stream (Gradio asks for
    each update from one of its worker threads) each run on a thread of their own, gone when they
    end: no OpenMP pool outlives its work to make the next one's threads sleep (ModelStore)."""
    loaded_on, ran_on = [], []
    monkeypatch.setattr(serving, "load_model", lambda *a: loaded_on.append(threading.get_native_id()) or load_model(*a))
    store = ModelStore({"sft": sft_model}, stream_every=0)
    model, _ = store.local("sft")
    model.transformer.h[0].register_forward_pre_hook(lambda *_: ran_on.append(threading.get_native_id()))
    stream, updates, askers = store.stream("sft", PAIRS[2]["question"], "", GREEDY), [], [threading.get_native_id()]

    def ask():
        askers.append(threading.get_native_id())
        updates.append(next(stream, None))
    while not updates or updates[-1] is not None:
        asker = threading.Thread(target=ask)
        asker.start()
        asker.join()
    assert updates[-2][0] == PAIRS[2]["answer"] and len(updates) > 3
    assert len(loaded_on) == 1 and len(ran_on) > 3 and len(set(ran_on)) == 1
    alive = {t.native_id for t in threading.enumerate()}
    assert not set(loaded_on + ran_on) & (set(askers) | alive)


class WatchedStore(ModelStore):
    """A store that records when each local generation starts and ends, and waits pause seconds after each piece."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs, self.calls, self.pause = [], [], 0.0

    def stream(self, *args):
        self.calls.append(args)  # (name, question, mode, p[, history])
        start = time.monotonic()
        try:
            for value in super().stream(*args):
                yield value
                time.sleep(self.pause)
        finally:
            self.runs.append((start, time.monotonic()))


@pytest.fixture(scope="module")
def watched(sft_model):
    return WatchedStore({"sft": sft_model}, stream_every=0)


@pytest.fixture(scope="module")
def app(watched, tmp_path_factory):
    """The app in this process on a free loopback port, one generation at a time."""
    votes = VoteBook(tmp_path_factory.mktemp("votes") / "votes.jsonl")
    demo = build_app(watched, votes, [PAIRS[0]["question"]], limit=30, concurrency=1)
    queue_app(demo, 1, 16)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def client(url):
    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


def test_api_streams_the_answer(app):
    c = client(app)
    assert c.predict(api_name="/models") == ["sft"]
    outputs = list(c.submit(PAIRS[2]["question"], "chat", 20, 0.0, api_name="/generate"))
    texts = [text for text, _ in outputs]
    assert texts[-1] == PAIRS[2]["answer"]
    assert len(set(texts)) >= 3 and all(PAIRS[2]["answer"].startswith(t) for t in texts)  # streamed, in order
    stats = outputs[-1][1]
    assert stats["stopped_at_eot"] and stats["new_tokens"] >= 3 and stats["tokens_per_s"] > 0


def test_api_runs_one_generation_at_a_time_and_queues_the_others(app, watched):
    """Four users ask at once (all sent before the first answer ends); the app (concurrency=1)
    generates one answer at a time: no two generations overlap, and every user gets their answer."""
    users = [client(app) for _ in range(4)]
    watched.runs.clear()
    watched.pause = 0.05  # a generation takes a while, so without the limit they would overlap
    try:
        jobs = [c.submit(p["question"], "chat", 20, 0.0, api_name="/generate") for c, p in zip(users, PAIRS)]
        sent = time.monotonic()
        got = [job.result(timeout=120)[0] for job in jobs]
    finally:
        watched.pause = 0.0
    assert got == [p["answer"] for p in PAIRS[:4]]
    runs = sorted(watched.runs)
    assert len(runs) == 4 and sent < runs[0][1]
    assert all(end <= next_start for (_, end), (next_start, _) in zip(runs, runs[1:])), runs


def test_api_input_limits_and_errors(app):
    c = client(app)
    assert c.predict("   ", api_name="/generate") == ["", {"notice": "输入为空，已忽略。"}]
    _, stats = c.predict("问" * 50, "chat", 3, api_name="/generate")
    assert "已截断为前 30 字" in stats["notice"] and "输入过长：模型一次只能看 48 个 token" in stats["notice"]
    for args, words in [((PAIRS[0]["question"], "chat", 0), "max_new_tokens"), (("问", "sing"), "mode"),
                        (("问", "", 5, 0.8, 50, 0.95, 1.1, "nope"), "没有名为"),
                        (("问", "", 5, 0.8, 50, 0.95, 1.1, "http://127.0.0.1:1"), "本应用的模型名")]:
        with pytest.raises(AppError, match=words):
            c.predict(*args, api_name="/generate")


def test_api_takes_the_conversation_as_history(app, watched):
    """/generate's trailing history= goes to the store as (question, answer) pairs; older callers
    (positional, without it) get single-turn answers; a history of another shape is refused, naming it."""
    c, earlier = client(app), [[PAIRS[0]["question"], PAIRS[0]["answer"]], [PAIRS[1]["question"], "是守株待兔。"]]
    text, _ = c.predict(PAIRS[2]["question"], "chat", 20, 0.0, history=earlier, api_name="/generate")
    assert watched.calls[-1][4] == tuple(map(tuple, earlier)) and text
    assert c.predict(PAIRS[2]["question"], "chat", 20, 0.0, api_name="/generate")[0] == PAIRS[2]["answer"]
    assert watched.calls[-1][4] == ()
    for bad in ([["只有问题"]], [["问", 1]], "问"):
        with pytest.raises(AppError, match=r"history 应为 \[问题, 回答\] 对的列表"):
            c.predict("问", "chat", 5, history=bad, api_name="/generate")


def test_arena_reaches_a_classmate_app_by_url(app):
    """Another app's store streams from this app's API, as the arena does with a URL."""
    nobody = f"http://127.0.0.1:{free_port()}"
    store = ModelStore({}, remotes=[app + "/", nobody])
    text, stats = list(store.stream(f"{app}#sft", PAIRS[4]["question"], "", GREEDY))[-1]
    assert text == PAIRS[4]["answer"] and stats["model"] == f"{app}#sft" and stats["stopped_at_eot"]
    assert list(store.stream(app, PAIRS[5]["question"], "chat", GREEDY))[-1][0] == PAIRS[5]["answer"]
    with pytest.raises(ModelError, match=f"无法使用 {nobody}"):
        list(store.stream(nobody, "问", "", GREEDY))


def test_a_classmate_app_gets_the_history_and_an_older_one_says_it_takes_none(app, watched):
    earlier = ((PAIRS[0]["question"], PAIRS[0]["answer"]),)
    store = ModelStore({}, remotes=[app])
    assert list(store.stream(app, PAIRS[5]["question"], "chat", GREEDY, earlier))[-1][0]
    assert watched.calls[-1][1:] == (PAIRS[5]["question"], "chat", GREEDY | {"seed": 0}, earlier)

    def generate(question: str, mode: str = "", max_new_tokens: int = 5, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 0.95, repetition_penalty: float = 1.1, model: str = "",
                 seed: int = -1) -> tuple[str, dict]:
        return "单轮的回答", {}  # an app made before multi-turn chat: its /generate has no history

    with gr.Blocks() as old:
        gr.api(generate, api_name="generate")
    port = free_port()
    old.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        store = ModelStore({}, remotes=[f"http://127.0.0.1:{port}"])
        assert list(store.stream(f"http://127.0.0.1:{port}", "问", "chat", GREEDY))[-1][0] == "单轮的回答"
        with pytest.raises(ModelError, match="的 /generate 不接受 history（对方的应用版本较旧"):
            list(store.stream(f"http://127.0.0.1:{port}", "问", "chat", GREEDY, earlier))
    finally:
        old.close()


def test_a_request_fits_its_prompt_once(sft_model, monkeypatch):
    """The notice and the generation use one fitted prompt (it was fitted twice a request)."""
    import engine
    fit, calls = engine.fit_prompt, []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return fit(*args, **kwargs)

    monkeypatch.setattr(engine, "fit_prompt", counted)
    monkeypatch.setattr(serving, "fit_prompt", counted)
    _, stats = list(ModelStore({"sft": sft_model}).stream("sft", "问" * 30, "", GREEDY))[-1]
    assert calls == ["问" * 30] and stats["notice"].startswith("输入过长") and stats["prompt_tokens"] <= 36


def test_a_remote_that_stops_answering_ends_with_a_timeout_message(app, watched):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = ModelStore({}, remotes=[url, app], timeout=1)
        t0 = time.monotonic()
        with pytest.raises(ModelError, match=f"{url} 超过 1 秒没有回应"):
            list(store.stream(url, "问", "", GREEDY))
        assert time.monotonic() - t0 < 10
    list(watched.stream("sft", PAIRS[3]["question"], "chat", GREEDY))  # loaded and warm: the first piece is quick
    got = []
    watched.pause = 3  # the classmate's app sends its first piece, then falls silent
    try:
        with pytest.raises(ModelError, match="超过 1 秒没有回应"):
            for text, _ in store.stream(app, PAIRS[3]["question"], "chat", GREEDY):
                got.append(text)
    finally:
        watched.pause = 0.0
    assert got and got[-1] != PAIRS[3]["answer"]


def test_two_models_stream_side_by_side_through_the_store(sft_model, tmp_path):
    shutil.copytree(sft_model, tmp_path / "copy")
    store = ModelStore({"a": sft_model, "b": tmp_path / "copy"})
    q = PAIRS[6]["question"]
    last = list(stream_together([store.stream("a", q, "", GREEDY), store.stream("b", q, "", GREEDY)]))[-1]
    assert [text for text, _ in last] == [PAIRS[6]["answer"]] * 2


def test_the_queue_looks_for_new_requests_every_queue_poll_seconds(sft_model, tmp_path):
    """Not Gradio's every millisecond, which woke the event loop a thousand times a second to take
    a core and the GIL from the reply being generated (sample_gradio.queue_app)."""
    demo = build_app(ModelStore({"sft": sft_model}), VoteBook(tmp_path / "v.jsonl"), [])
    assert demo.queue()._queue.sleep_when_free < QUEUE_POLL  # Gradio's own, under the name queue_app sets
    assert queue_app(demo, 2)._queue.sleep_when_free == QUEUE_POLL


def test_login_is_required_when_auth_is_set(sft_model, tmp_path):
    demo = build_app(ModelStore({"sft": sft_model}), VoteBook(tmp_path / "v.jsonl"), [], limit=30)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False, auth=("同学", "secret"))
    try:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(ValueError):
            client(url).predict(api_name="/models")
        logged_in = Client(url, auth=("同学", "secret"), verbose=False, download_files=False, analytics_enabled=False)
        assert logged_in.predict(api_name="/models") == ["sft"]
    finally:
        demo.close()


def test_listening_without_a_login_warns(sft_model, tmp_path):
    proc, _ = start_app(tmp_path / "app.log", f"--models={sft_model}", "--listen=True",
                        f"--votes_path={tmp_path / 'v.jsonl'}")
    proc.terminate()
    proc.wait(timeout=30)
    log = (tmp_path / "app.log").read_text(encoding="utf-8")
    assert "WARNING: --listen=True without --auth" in log and "请加上 --auth=用户名:密码" in log
    assert "arena remotes: none" in log


def test_command_line_errors_are_clear(tmp_path):
    for arg, words in [("--auth=nopassword", "expected user:password"), ("--concurrency=0", "--concurrency"),
                       ("--precision=int3", "--precision='int3': expected one of fp32, bf16, fp16, int8"),
                       ("--dtype=bf16", "precision"), ("--examples_path=nope.jsonl", "'nope.jsonl': no such file"),
                       ("--remotes=192.168.1.2:7860", "'192.168.1.2:7860' is not a URL")]:
        proc = run_script("sample_gradio.py", arg, f"--votes_path={tmp_path / 'v.jsonl'}", check=False)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr


def test_paths_are_relative_to_the_working_directory(sft_model, tmp_path, monkeypatch):
    """Started elsewhere than the repository, the app finds the models in that directory's out*/
    folders and reads and writes the paths it is given there; the bundled examples still load."""
    shutil.copytree(sft_model, tmp_path / "out-tiny" / "run")
    (tmp_path / "q.txt").write_text("自己写的示例问题？\n\n", encoding="utf-8")
    proc, url = start_app(tmp_path / "app.log", "--votes_path=votes/v.jsonl", "--examples_path=q.txt", cwd=tmp_path)
    try:
        assert client(url).predict(api_name="/models") == ["out-tiny/run"]
        assert "自己写的示例问题？" in json.dumps(httpx.get(f"{url}/config").json(), ensure_ascii=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"arena votes: {tmp_path / 'votes' / 'v.jsonl'}" in (tmp_path / "app.log").read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert list(discover_models()) == ["out-tiny/run"]
    assert load_examples("q.txt") == ["自己写的示例问题？"]
    assert load_examples("") == [q for q in DEMO_QUESTIONS.read_text(encoding="utf-8").splitlines() if q][:8]
