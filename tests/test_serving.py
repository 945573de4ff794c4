"""serving.py without a running app: input limits, sampling settings, votes and the leaderboard, streams
side by side, and the store's classmate clients (allowed URLs, bounded, never closed mid-stream,
waited for without busy polling) against a fake gradio_client."""
import socket
import threading
import time
from concurrent.futures import Future

import httpx
import pytest

import serving
from arena import ELO_START, VoteBook, leaderboard
from serving import ModelError, ModelStore, check_params, clean_question, stream_together

GREEDY = {"max_new_tokens": 20, "temperature": 0.0, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0,
          "seed": 0}


def test_clean_question_ignores_empty_and_cuts_long_input():
    assert clean_question("  \n ", 10) == ("", "")
    assert clean_question(None, 10) == ("", "")
    assert clean_question(" 你好 ", 10) == ("你好", "")
    text, notice = clean_question("长" * 25, 10)
    assert text == "长" * 10 and "25" in notice and "10" in notice


def test_check_params_names_the_setting():
    assert check_params(GREEDY | {"max_new_tokens": 5.0})["max_new_tokens"] == 5
    assert check_params(GREEDY | {"top_p": 0, "temperature": 0, "top_k": 0})  # greedy-like edges are allowed
    for key, bad, words in [("max_new_tokens", 0, "1 到 1024 之间的整数"), ("temperature", -1, "0.0 到 2.0 之间的数"),
                            ("top_p", 1.5, "0.0 到 1.0"), ("repetition_penalty", "x", "1.0 到 2.0"),
                            ("top_k", True, "0 到 65536 之间的整数"), ("top_k", 2.5, "0 到 65536 之间的整数")]:
        with pytest.raises(ValueError, match=f"{key}={bad!r}：应为 {words}"):
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


def test_a_url_not_allowed_is_refused_without_connecting():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        for store in (ModelStore({}), ModelStore({}, remotes=["http://127.0.0.1:1"])):
            with pytest.raises(ModelError, match=f"{url} 不在允许的远程模型地址里，没有连接它"):
                list(store.stream(f"{url}#sft", "问", "", GREEDY))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked


class FakeJob:
    """A classmate's reply as gradio_client's Job shows it: pieces appear in outputs(); the future ends it."""

    def __init__(self, *pieces, done: bool = False):
        self.future, self.pieces = Future(), list(pieces)
        if done:
            self.future.set_result(self.pieces[-1])

    def outputs(self):
        return list(self.pieces)

    def done(self):
        return self.future.done()

    def result(self, timeout=None):
        return self.future.result(timeout)

    def cancel(self):
        self.future.cancel()


def fake_clients(monkeypatch, jobs: dict) -> tuple[list, list]:
    """serving.Client replaced by one whose submit returns jobs[url]: (urls connected, urls closed)."""
    made, closed = [], []

    class FakeClient:
        def __init__(self, url, **kwargs):
            self.url, self.kwargs = url, kwargs
            made.append(url)

        def submit(self, *args, api_name):
            return jobs[self.url]

        def close(self):
            closed.append(self.url)

    monkeypatch.setattr(serving, "Client", FakeClient)
    return made, closed


def test_remote_clients_are_bounded_and_timed(monkeypatch):
    made, closed = fake_clients(monkeypatch, {})
    store = ModelStore({}, any_remote=True, max_clients=2, timeout=7)
    for url in ["http://a:1", "http://b:1", "http://a:1/", "http://c:1", "http://a:1"]:
        with store.client(url):
            pass
    assert made == ["http://a:1", "http://b:1", "http://c:1"] and closed == ["http://b:1"]
    assert list(store.clients) == ["http://c:1", "http://a:1"]
    assert store.clients["http://a:1"].kwargs["httpx_kwargs"]["timeout"] == httpx.Timeout(7, connect=5.0)


def test_a_remote_client_still_streaming_is_not_closed(monkeypatch):
    """One client kept (max_clients=1): a second classmate's app used while the first one streams
    closes neither mid-stream; the idle one goes once it is done."""
    streaming_job = FakeJob(("半", {}))
    _, closed = fake_clients(monkeypatch, {"http://a:1": streaming_job,
                                           "http://b:1": FakeJob(("好", {"new_tokens": 1}), done=True)})
    store = ModelStore({}, any_remote=True, max_clients=1)
    streaming = store.stream("http://a:1", "问", "", GREEDY)
    assert next(streaming)[0] == "半"
    assert list(store.stream("http://b:1", "问", "", GREEDY))[-1][0] == "好"
    assert closed == ["http://b:1"]  # the old store closed a's client here, under its running stream
    streaming_job.future.set_result(("半句话", {"new_tokens": 3}))
    assert [text for text, _ in streaming][-1] == "半句话"
    assert list(store.clients) == ["http://a:1"] and closed == ["http://b:1"]


def test_a_remote_reply_is_waited_for_not_polled_busily(monkeypatch):
    """Half a second of a classmate's app thinking: the store looks for pieces every REMOTE_TICK
    (not every 10 ms, as it did), and the job's end wakes it at once."""
    job, looked = FakeJob(), []
    pieces = job.outputs
    job.outputs = lambda: looked.append(1) or pieces()
    fake_clients(monkeypatch, {"http://a:1": job})
    store = ModelStore({}, any_remote=True)
    threading.Timer(0.5, job.future.set_result, [("好", {"new_tokens": 1})]).start()
    t0 = time.monotonic()
    assert list(store.stream("http://a:1", "问", "", GREEDY)) == [("好", {"new_tokens": 1, "model": "http://a:1"})]
    assert time.monotonic() - t0 < 0.6
    assert len(looked) <= 15, len(looked)  # every 0.05 s; the 10 ms polls looked about 50 times
