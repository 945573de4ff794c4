"""sample_gradio.py and serving.py: input limits, votes and the leaderboard, streams side by side, the model store,
the API through gradio_client (streaming, queueing, errors, a classmate's app by URL)."""
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import PAIRS, read_bin, run_script
from gradio_client import Client
from gradio_client.exceptions import AppError

from data.tokenizer import sft_prompt
from sample import load_checkpoint, render_prompt
from sample_gradio import build_app
from serving import (ELO_START, ModelError, ModelStore, VoteBook, check_params, clean_question, discover_models,
                     leaderboard, stream_together)

GREEDY = {"max_new_tokens": 20, "temperature": 0.0, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0,
          "seed": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prompt_template_equals_training(sft_model, enc):
    _, ckpt = load_checkpoint(sft_model)
    question = PAIRS[0]["question"]
    assert render_prompt(ckpt, question, "chat") == sft_prompt(question)
    first_block = read_bin(sft_model.parent / "data" / "train.bin")[:ckpt["data_meta"]["block_size"]]
    prompts = [enc.encode_ordinary(render_prompt(ckpt, p["question"], "chat")) for p in PAIRS]
    assert any(first_block[:len(ids)].tolist() == ids for ids in prompts)
    assert render_prompt(ckpt, "床前明月光", "generate") == "床前明月光"


def test_clean_question_ignores_empty_and_cuts_long_input():
    assert clean_question("  \n ", 10) == ("", "")
    assert clean_question(None, 10) == ("", "")
    assert clean_question(" 你好 ", 10) == ("你好", "")
    text, notice = clean_question("长" * 25, 10)
    assert text == "长" * 10 and "25" in notice and "10" in notice


def test_check_params_names_the_setting():
    assert check_params(GREEDY | {"max_new_tokens": 5.0})["max_new_tokens"] == 5
    for key, bad in [("max_new_tokens", 0), ("temperature", -1), ("top_p", 1.5), ("repetition_penalty", "x"),
                     ("top_k", True)]:
        with pytest.raises(ValueError, match=key):
            check_params(GREEDY | {key: bad})


def test_leaderboard_elo_and_win_rate():
    votes = [{"model_a": "x", "model_b": "y", "vote": "a"}]
    assert leaderboard(votes) == [["x", ELO_START + 16, 1, 1, 0, 0, "100%"], ["y", ELO_START - 16, 1, 0, 1, 0, "0%"]]
    votes += [{"model_a": "y", "model_b": "x", "vote": "tie"}, {"model_a": "x", "model_b": "y", "vote": "both_bad"}]
    rows = {r[0]: r for r in leaderboard(votes)}
    assert rows["x"][2:6] == [3, 1, 0, 2] and rows["y"][2:6] == [3, 0, 1, 2]
    assert rows["x"][1] + rows["y"][1] == 2 * ELO_START  # Elo is zero-sum
    assert rows["x"][1] > rows["y"][1] and rows["x"][6] == "33%"


def test_vote_book_appends_and_skips_broken_lines_with_their_place(tmp_path, capsys):
    book = VoteBook(tmp_path / "arena" / "votes.jsonl")
    assert book.read()[0] == []
    book.add({"model_a": "x", "model_b": "y", "vote": "b", "question": "问"})
    with open(book.path, "a", encoding="utf-8") as f:
        f.write('{"model_a": "x", "model_b": "", "vote": "a"}\n{"model_a": "x", "model_b": "y", "vo')  # a crash
    book.add({"model_a": "y", "model_b": "x", "vote": "a"})
    good, report = book.read()
    assert [v["vote"] for v in good] == ["b", "a"]
    assert sum(report.counts.values()) == 2
    err = capsys.readouterr().err
    assert f"{book.path}:2" in err and f"{book.path}:3" in err


def test_stream_together_runs_streams_at_once_and_reports_a_failure():
    def slow(tag, n):
        for i in range(n):
            time.sleep(0.02)
            yield f"{tag}{i}", {"i": i}

    def broken():
        yield "半", {}
        raise ModelError("模型坏了")

    updates = list(stream_together([slow("a", 10), slow("b", 10)]))
    assert updates[-1] == [("a9", {"i": 9}), ("b9", {"i": 9})]
    assert any(u[0][0] != "" and u[1][0] != "" and u[0][0] != "a9" for u in updates)  # both moving at once
    last = list(stream_together([broken(), slow("c", 3)]))[-1]
    assert last[0][0] == "【出错】模型坏了" and last[1][0] == "c2"


def test_closing_stream_together_stops_the_streams():
    produced = []

    def endless():
        while True:
            produced.append(1)
            time.sleep(0.01)
            yield str(len(produced)), {}

    it = stream_together([endless()])
    next(it)
    it.close()
    time.sleep(0.1)
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) <= n + 1


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
    torch.save(ckpt, pre / "ckpt.pt")
    (tmp_path / "misfit").mkdir()
    ckpt["model_args"]["n_embd"] *= 2
    torch.save(ckpt, tmp_path / "misfit" / "ckpt.pt")
    store = ModelStore({"pre": pre, "sft": sft_model, "broken": tmp_path / "broken", "gone": tmp_path / "gone",
                        "misfit": tmp_path / "misfit"})
    assert store.names()[0] == "sft"  # chat models first: the default
    assert store.local("sft") is store.local("sft")
    for name, words in [("broken", "not a readable MiniGLM checkpoint"), ("gone", "no checkpoint here"),
                        ("nope", "没有名为"), ("misfit", "do not fit the checkpoint's model_args")]:
        with pytest.raises(ModelError, match=words):
            list(store.stream(name, "你好", "", GREEDY))
    text, stats = list(store.stream("sft", PAIRS[1]["question"], "", GREEDY))[-1]
    assert text == PAIRS[1]["answer"] and stats["stopped_at_eot"] and stats["mode"] == "chat"
    store.stream_every = 60  # updates are rationed: the first piece, then the whole reply
    texts = [text for text, _ in store.stream("sft", PAIRS[1]["question"], "", GREEDY)]
    assert texts == [PAIRS[1]["answer"][0], PAIRS[1]["answer"]]


@pytest.fixture(scope="module")
def app(sft_model, tmp_path_factory):
    """The app in this process on a free loopback port, one generation at a time."""
    votes = VoteBook(tmp_path_factory.mktemp("votes") / "votes.jsonl")
    store = ModelStore({"sft": sft_model}, stream_every=0)
    demo = build_app(store, votes, [PAIRS[0]["question"]], limit=30, concurrency=1)
    demo.queue(default_concurrency_limit=1, max_size=16)
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


def test_api_queues_requests_from_several_users(app):
    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(lambda p: client(app).predict(p["question"], "chat", 20, 0.0, api_name="/generate"), p)
                for p in PAIRS[:6]]
        got = [j.result(timeout=120)[0] for j in jobs]
    assert got == [p["answer"] for p in PAIRS[:6]]


def test_api_input_limits_and_errors(app):
    c = client(app)
    assert c.predict("   ", api_name="/generate") == ["", {"notice": "输入为空，已忽略。"}]
    _, stats = c.predict("问" * 50, "chat", 3, api_name="/generate")
    assert "已截断为前 30 字" in stats["notice"]
    for args, words in [((PAIRS[0]["question"], "chat", 0), "max_new_tokens"), (("问", "sing"), "mode"),
                        (("问", "", 5, 0.8, 50, 0.95, 1.1, "nope"), "没有名为"),
                        (("问", "", 5, 0.8, 50, 0.95, 1.1, "http://127.0.0.1:1"), "本应用的模型名")]:
        with pytest.raises(AppError, match=words):
            c.predict(*args, api_name="/generate")


def test_arena_reaches_a_classmate_app_by_url(app):
    """Another app's store streams from this app's API, as the arena does with a URL."""
    store = ModelStore({})
    text, stats = list(store.stream(f"{app}#sft", PAIRS[4]["question"], "", GREEDY))[-1]
    assert text == PAIRS[4]["answer"] and stats["model"] == f"{app}#sft" and stats["stopped_at_eot"]
    assert list(store.stream(app, PAIRS[5]["question"], "chat", GREEDY))[-1][0] == PAIRS[5]["answer"]
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelError, match=f"无法使用 {nobody}"):
        list(store.stream(nobody, "问", "", GREEDY))


def test_two_models_stream_side_by_side_through_the_store(sft_model, tmp_path):
    shutil.copytree(sft_model, tmp_path / "copy")
    store = ModelStore({"a": sft_model, "b": tmp_path / "copy"})
    q = PAIRS[6]["question"]
    last = list(stream_together([store.stream("a", q, "", GREEDY), store.stream("b", q, "", GREEDY)]))[-1]
    assert [text for text, _ in last] == [PAIRS[6]["answer"]] * 2


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


def test_command_line_errors_are_clear(tmp_path):
    for arg, words in [("--auth=nopassword", "expected user:password"), ("--concurrency=0", "--concurrency"),
                       ("--dtype=int8", "expected float32, bfloat16 or float16")]:
        proc = run_script("sample_gradio.py", arg, f"--votes_path={tmp_path / 'v.jsonl'}", check=False)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr
