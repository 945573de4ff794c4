"""The OpenAI-compatible API (openai_api.py) with the real openai client against sample_gradio.py in a
subprocess (the tiny trained SFT model and a pretrained copy of it), and in-process where a test must
hold the store's slots: the queue's 429 and a client that disconnects mid-stream."""
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import PAIRS, run_script
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI

from engine import SAMPLING, SAMPLING_DEFAULTS, load_model, prompt_ids
from openai_api import OpenAIRoutes, conversation, sampling
from serving import ModelStore, model_facts, start_app

KEY = "sk-test-key"


def pretrained_copy(sft_model, out_dir):
    """The SFT model saved as a pretrained one: no question template, it only continues text."""
    out_dir.mkdir(parents=True)
    ckpt = torch.load(sft_model / "ckpt.pt", weights_only=True)
    ckpt["data_meta"]["kind"] = "pretrain"
    del ckpt["data_meta"]["sft_template"]
    torch.save(ckpt, out_dir / "ckpt.pt")


@pytest.fixture(scope="module")
def app(sft_model, tmp_path_factory):
    """(base URL of /v1, the app's log, its working directory) of an app with out-sft and out-pre, a key."""
    tmp = tmp_path_factory.mktemp("openai_app")
    shutil.copytree(sft_model, tmp / "out-sft")
    pretrained_copy(sft_model, tmp / "out-pre")
    proc, url = start_app(tmp / "app.log", "--models=out-sft,out-pre", f"--api_key={KEY}", "--precision=fp32",
                          "--concurrency=2", "--votes_path=votes.jsonl", "--auth=同学:secret", cwd=tmp)
    yield f"{url}/v1", tmp / "app.log", tmp
    proc.terminate()
    proc.wait(timeout=30)


def client(app, key=KEY) -> OpenAI:
    return OpenAI(base_url=app[0], api_key=key, max_retries=0, timeout=60)


def ask(app, question, **kw):
    return client(app).chat.completions.create(model="out-sft", messages=[{"role": "user", "content": question}], **kw)


def streamed(app, question, **kw) -> tuple[list, str]:
    chunks = list(ask(app, question, stream=True, **kw))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_chat_answers_streaming_and_not(app):
    q, answer = PAIRS[1]["question"], PAIRS[1]["answer"]
    reply = ask(app, q, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == "out-sft"
    u = reply.usage
    assert u.completion_tokens > 1 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    chunks, text = streamed(app, q, temperature=0, max_tokens=20, stream_options={"include_usage": True})
    assert text == answer
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == u.total_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_finish_reason_is_stop_at_eot_or_a_stop_string_and_length_at_max_tokens(app):
    answer = PAIRS[3]["answer"]  # "是掩耳盗铃。"
    for kw, text, finish in [({"max_tokens": 2}, None, "length"), ({"stop": "盗"}, answer[:answer.index("盗")], "stop"),
                             ({"stop": ["铃", "耳"]}, answer[:answer.index("耳")], "stop"), ({}, answer, "stop")]:
        for stream in (False, True):
            if stream:
                chunks, content = streamed(app, PAIRS[3]["question"], temperature=0, **kw)
                got = chunks[-1].choices[0].finish_reason
            else:
                reply = ask(app, PAIRS[3]["question"], temperature=0, **kw).choices[0]
                content, got = reply.message.content, reply.finish_reason
            assert got == finish and (text is None or content == text), (kw, stream, content)


def test_history_and_system_text_reach_the_model(app):
    _, ckpt = load_model(app[2] / "out-sft")
    messages = [{"role": "system", "content": "甲"}, {"role": "user", "content": "乙"},
                {"role": "assistant", "content": "丙"}, {"role": "user", "content": "丁"}]  # short: all fit 48 tokens
    reply = client(app).chat.completions.create(model="out-sft", messages=messages, temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens == len(prompt_ids(ckpt, "丁", "chat", (("乙", "丙"),), "甲"))
    without_system = len(prompt_ids(ckpt, "丁", "chat", (("乙", "丙"),)))
    assert reply.usage.prompt_tokens > without_system > len(prompt_ids(ckpt, "丁", "chat"))


def test_messages_over_the_apps_limit_are_cut_with_a_notice(app):
    reply = client(app).chat.completions.create(model="out-sft", max_tokens=2, messages=[
        {"role": "system", "content": "系" * 250}, {"role": "user", "content": "问" * 201}])
    notice = reply.model_extra["notice"]
    assert "messages[0]: 输入过长（250 字），已截断为前 200 字" in notice and "messages[1]: 输入过长（201 字）" in notice


def test_models_list_each_models_facts(app):
    models = client(app).models.list().data
    assert [m.id for m in models] == ["out-sft", "out-pre"]
    model, ckpt = load_model(app[2] / "out-sft")
    facts = {m.id: m.model_extra for m in models}
    assert facts["out-sft"] == {"kind": "chat", "parameters": model.num_params(), "tokenizer": "gpt2 (50257 ids)",
                                "precision": "fp32", "context_length": ckpt["model_args"]["block_size"],
                                "lora_base": None}
    assert facts["out-pre"]["kind"] == "pretrained" and models[0].object == "model"


def test_completions_continue_text_on_a_pretrained_model(app):
    reply = client(app).completions.create(model="out-pre", prompt="第2个成语", max_tokens=6, temperature=0)
    store = ModelStore({"pre": app[2] / "out-pre"}, precision="fp32")
    p = SAMPLING_DEFAULTS | {"max_new_tokens": 6, "temperature": 0, "seed": 0}
    text, stats = list(store.stream("pre", "第2个成语", "generate", p))[-1]
    assert reply.choices[0].text == text and reply.usage.completion_tokens == stats["new_tokens"]
    assert reply.choices[0].finish_reason == ("stop" if stats["stopped_at_eot"] else "length")
    pieces = list(client(app).completions.create(model="out-pre", prompt="第2个成语", max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].text for c in pieces) == text


def test_errors_have_openais_shape_and_status(app):
    cases = [(lambda c: ask(app, "你好", temperature=5), openai.BadRequestError, "temperature"),
             (lambda c: ask(app, "你好", frequency_penalty=0.5), openai.BadRequestError, "frequency_penalty"),
             (lambda c: ask(app, "你好", extra_body={"beam_width": 3}), openai.BadRequestError, "beam_width"),
             (lambda c: ask(app, "你好", n=2), openai.BadRequestError, "n"),
             (lambda c: c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}]),
              openai.NotFoundError, "out-sft, out-pre"),
             (lambda c: c.chat.completions.create(model="out-pre", messages=[{"role": "user", "content": "x"}]),
              openai.BadRequestError, "/v1/completions"),
             (lambda c: c.completions.create(model="out-sft", prompt="x"), openai.BadRequestError,
              "/v1/chat/completions"),
             (lambda c: c.chat.completions.create(model="out-sft", messages=[{"role": "assistant", "content": "x"}]),
              openai.BadRequestError, "messages[0].role")]
    for call, error, words in cases:
        with pytest.raises(error) as e:
            call(client(app))
        assert words in e.value.body["message"], e.value.body
        assert set(e.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        client(app, "wrong").models.list()
    missing = httpx.get(app[0] + "/models", timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    ask(app, "你好", frequency_penalty=0, presence_penalty=0, user="s1", logprobs=False, max_tokens=2)  # neutral: taken
    odd = [({"messages": "hi"}, 400), ({"messages": [{"role": ["user"], "content": "x"}]}, 400),
           ({"model": ["x"], "messages": []}, 404), ({"messages": [{"role": "user", "content": "x"}], "user": 3}, 400)]
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), *((json.dumps(o).encode(), st) for o, st in odd)]:
        r = httpx.post(app[0] + "/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in app[1].read_text(encoding="utf-8")


def test_eight_concurrent_streaming_clients_each_get_their_seeds_answer(app):
    kw = {"temperature": 2.0, "max_tokens": 12}

    def one(seed):
        return streamed(app, PAIRS[5]["question"], seed=seed, **kw)[1]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    alone = [one(seed) for seed in range(8)]
    assert together == alone and len(set(alone)) > 1
    assert "Traceback" not in app[1].read_text(encoding="utf-8")


class SlowStore(ModelStore):
    """A store whose local streams pause after every update (and count the updates made)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made = 0

    def _local(self, *args, **kwargs):
        for update in super()._local(*args, **kwargs):
            self.made += 1
            yield update
            time.sleep(0.2)


def test_earlier_turns_stay_whole_common_client_values_are_taken_and_failures_keep_openais_shape(sft_model, tmp_path,
                                                                                                 monkeypatch):
    turns = [{"role": "user", "content": "长" * 12}, {"role": "assistant", "content": "答" * 12},
             {"role": "user", "content": "问" * 12}]
    question, history, system, notice = conversation(turns, 5)  # only the question is cut to the app's limit:
    assert history == (("长" * 12, "答" * 12),) and question == "问" * 5  # an answer cut short is not what was said
    assert notice.startswith("messages[2]: ") and "messages[0]" not in notice
    p = sampling({"max_tokens": 4096, "seed": -1})  # what front ends send: as many tokens as the app gives, random
    assert p["max_new_tokens"] == SAMPLING["max_new_tokens"][2] and p["seed"] == -1
    ckpt = torch.load(sft_model / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["n_head"] = 3  # 64 wide: no model has 3 heads of it
    (tmp_path / "odd").mkdir()
    torch.save(ckpt, tmp_path / "odd" / "ckpt.pt")
    assert model_facts(tmp_path / "odd")["kind"] is None  # one odd checkpoint does not stop the app from starting
    store = ModelStore({"sft": sft_model, "odd": tmp_path / "odd"}, precision="fp32")
    api = TestClient(OpenAIRoutes(store, 200, queue_size=4).add_to(FastAPI()))
    one = api.get("/v1/models/sft")
    assert one.status_code == 200 and one.json()["id"] == "sft" and one.json()["kind"] == "chat"
    assert api.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
        yield

    monkeypatch.setattr(store, "stream", broken)
    failed = api.post("/v1/chat/completions", json={"model": "sft", "messages": turns})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "server_error"
    assert "out of memory" in failed.json()["error"]["message"]


def test_the_queue_turns_requests_away_when_full_and_shares_the_pages_slots(sft_model):
    store = ModelStore({"sft": sft_model}, concurrency=1, stream_every=0)
    api = TestClient(OpenAIRoutes(store, 200, queue_size=1).add_to(FastAPI()))
    body = {"model": "sft", "messages": [{"role": "user", "content": PAIRS[1]["question"]}], "temperature": 0}
    page = store.stream("sft", PAIRS[2]["question"], "", SAMPLING_DEFAULTS | {"temperature": 0})
    next(page)  # the page's chat is generating: it holds the only slot
    waiting = ThreadPoolExecutor(1).submit(api.post, "/v1/chat/completions", json=body)
    while store.waiting < 1:
        time.sleep(0.01)
    assert not waiting.done()
    full = api.post("/v1/chat/completions", json=body)
    assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
    page.close()
    assert waiting.result(timeout=60).json()["choices"][0]["message"]["content"] == PAIRS[1]["answer"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(sft_model):
    store = SlowStore({"sft": sft_model}, concurrency=1, stream_every=0)
    server = uvicorn.Server(uvicorn.Config(OpenAIRoutes(store, 200, 4).add_to(FastAPI()), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    body = {"model": "sft", "messages": [{"role": "user", "content": "问" * 5}], "max_tokens": 100, "stream": True,
            "temperature": 1.0}
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
        assert store.slots.acquire(timeout=5)  # 100 updates at 0.2 s each would hold it 20 s
        store.slots.release()
        assert store.made < 20
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_one_port_the_login_covers_the_page_the_key_covers_v1(app, sft_model):
    base = app[0].removesuffix("/v1")
    assert httpx.get(f"{base}/config", timeout=10).status_code == 401  # the page's login (--auth)
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    taken = run_script("sample_gradio.py", f"--models={sft_model}", f"--port={base.rsplit(':', 1)[1]}", check=False)
    assert taken.returncode != 0 and "cannot serve there" in taken.stderr and "another with --port=" in taken.stderr


def test_ui_false_serves_the_api_without_the_page(sft_model, tmp_path):
    proc, url = start_app(tmp_path / "app.log", f"--models={sft_model}", "--ui=False")
    try:
        assert httpx.get(url, timeout=10).status_code == 404
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == [str(sft_model)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_listening_with_a_login_but_no_api_key_refuses_to_start(sft_model, monkeypatch):
    monkeypatch.delenv("MINIGLM_API_KEY", raising=False)
    proc = run_script("sample_gradio.py", f"--models={sft_model}", "--listen=True", "--auth=a:b", "--port=1",
                      check=False)
    assert proc.returncode != 0 and "--api_key" in proc.stderr and "(/v1)" in proc.stderr
