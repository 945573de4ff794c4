"""The web app's engine, without its pages (sample_gradio.py builds those): the models, each
loaded once and shared, or a classmate's MiniGLM app reached by URL through its API (only the URLs
allowed at start, a bounded number of clients, a timeout on connecting and on every piece);
streams run side by side for the arena; each model's facts (model_facts). The arena's votes: arena.py.

    from serving import ModelStore, stream_together
    store = ModelStore({"out-sft": Path("out-sft")}, remotes=["http://192.168.1.20:7860"])
    for text, stats in store.stream("out-sft", "成语“画蛇添足”是什么意思？", "", params): ...

start_app runs sample_gradio.py in a subprocess (the browser test, the API tests and bench.py use it).
Paths are the command line's: relative to the working directory.
"""
import math
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

import httpx
import torch
from gradio_client import Client

import checkpoint
import lora
from checkpoint import can_chat, mode_of, peek_mode
from engine import SAMPLING, Prompt, fit_prompt, load_model, sampling_error, stream_reply, utf8_constraint
from model import GPT, GPTConfig

APP = Path(__file__).resolve().parent / "sample_gradio.py"
ERROR_MARK = "【出错】"  # begins a reply that is an error message, not the model's words
# A remote reply is watched by waiting on its job, which wakes us the moment it ends; between, new
# pieces are looked for every REMOTE_TICK seconds. gradio_client has no blocking wait for the next
# piece: Job's own iterator spins on a 1 ms sleep, and its updates queue is an asyncio.Queue of the
# client's event-loop thread, not safe to wait on from ours. A classmate's app sends an update every
# 0.05 s (its stream_every), so looking as often loses nothing.
REMOTE_TICK = 0.05


class ModelError(Exception):
    """A model that cannot answer (missing, broken, unreachable); the message is shown in the page."""


def discover_models(root=".") -> dict:
    """{name: checkpoint dir} for every ckpt.pt under root's out*/ folders (root: the working
    directory, like every path of the command line), name = the dir relative to root."""
    root = Path(root)
    found = sorted(p.parent for d in root.glob("out*") if d.is_dir() for p in d.rglob("ckpt.pt"))
    return {d.relative_to(root).as_posix(): d for d in found}


def clean_question(text, limit: int) -> tuple[str, str]:
    """(question, notice): stripped; "" if empty; cut to limit characters, with a notice saying so."""
    text = (text or "").strip()
    if len(text) > limit:
        return text[:limit], f"输入过长（{len(text)} 字），已截断为前 {limit} 字。"
    return text, ""


def check_params(p: dict) -> dict:
    """Sampling settings in their ranges (engine.SAMPLING), else ValueError naming the setting."""
    bad = sampling_error(p)
    if bad:
        key, value, lo, hi, whole = bad
        raise ValueError(f"{key}={value!r}：应为 {lo} 到 {hi} 之间的{'整数' if whole else '数'}")
    return p | {"max_new_tokens": int(p["max_new_tokens"]), "top_k": int(p["top_k"])}


def cut_notice(prompt: Prompt, turns: int = 0, system: str = "") -> str:
    """The page's notice when the conversation (turns earlier exchanges, the system text) or the
    question did not fit the model's context (engine.fit_prompt), else ""."""
    notes = []
    if len(prompt.history) < turns:
        notes.append(f"较早的 {turns - len(prompt.history)} 轮对话放不下，已略去")
    if system and not prompt.system:
        notes.append("系统提示放不下，已略去")
    if prompt.shortened:
        notes.append(f"只用了{'前' if prompt.mode == 'chat' else '最后'} {len(prompt.text)} 字（共 {prompt.chars} 字）")
    if not notes:
        return ""
    return f"输入过长：模型一次只能看 {prompt.block_size} 个 token，还要给回答留 {prompt.room} 个，所以{'；'.join(notes)}。"


class ModelStore:
    """The models the app serves: local checkpoints, each loaded once (in precision, an
    engine.PRECISIONS name; "" = engine.pick_precision) with the tokenizer it carries (so a gpt2
    model and a zh model can face each other in the arena) and shared by all requests, and classmates'
    apps by URL: only those in remotes (base URLs) unless any_remote, one gradio_client each, kept
    for the max_clients used last (a client still streaming is never closed); connecting, and each
    streamed piece, may take at most timeout seconds.

    Each load and each local stream runs on a thread of its own that ends with it, whichever
    threads ask (Gradio's worker threads take turns on a stream): PyTorch's OpenMP threads belong
    to the thread that first runs a parallel op and live as long as it, and while the process
    holds more of them than there are cores, libgomp makes them sleep between parallel regions
    instead of spinning. With the default model loaded on the main thread (the page is built
    there) and replies generated on a worker thread, every matmul had to wake its threads: 25%
    slower than sample.py (issue 13). Two streams at once (the arena) still run side by side.

    At most concurrency local streams generate at a time, whoever asks (the page, /generate, the
    OpenAI API: Gradio's queue does not cover routes mounted beside it); waiting: how many wait."""

    def __init__(self, paths: dict, device: str = "cpu", precision: str = "fp32", stream_every: float = 0.05,
                 remotes=(), any_remote: bool = False, max_clients: int = 8, timeout: float = 60.0,
                 concurrency: int = 2, lora_base: str = ""):
        self.paths, self.device, self.precision, self.stream_every = paths, device, precision, stream_every
        self.lora_base = lora_base  # a LoRA model's base that moved (checkpoint.load)
        self.remotes, self.any_remote = [u.rstrip("/") for u in remotes], any_remote
        self.max_clients, self.timeout = max_clients, timeout
        self.loaded, self.clients, self.busy = {}, OrderedDict(), Counter()  # busy: url -> streams using it
        self.lock, self.clients_lock, self.slots_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self.slots, self.waiting, self._facts = threading.BoundedSemaphore(concurrency), 0, None

    @contextmanager
    def slot(self):
        """with store.slot(): one of the concurrency generation slots, waited for (counted in waiting)."""
        with self.slots_lock:
            self.waiting += 1
        try:
            self.slots.acquire()
        finally:
            with self.slots_lock:
                self.waiting -= 1
        try:
            yield
        finally:
            self.slots.release()

    def facts(self) -> dict:
        """{name: model_facts | precision} of the local models, read once (without their weights)."""
        if self._facts is None:
            self._facts = {name: model_facts(path) | {"precision": self.precision} for name, path in self.paths.items()}
        return self._facts

    def names(self) -> list:
        """The local model names, chat (SFT) models first: the first is the default."""
        return sorted(self.paths, key=lambda name: peek_mode(self.paths[name]) != "chat")

    def local(self, name: str):
        """(model, ckpt) of a local model, loaded on first use on a thread of its own."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as own:
            return own.submit(self._load, name).result()

    def _load(self, name: str):
        with self.lock:
            if name not in self.loaded:
                if name not in self.paths:
                    raise ModelError(f"没有名为 {name!r} 的模型（可选：{', '.join(self.paths) or '无'}）")
                try:
                    model, ckpt = self.loaded[name] = load_model(self.paths[name], self.device, self.precision, self.lora_base)
                except (FileNotFoundError, ValueError) as e:
                    raise ModelError(f"模型 {name} 无法加载：{e}") from e
                utf8_constraint(checkpoint.tokenizer(ckpt), model.config.vocab_size)  # its sampling table, built now
            return self.loaded[name]

    def stream(self, name: str, question: str, mode: str, p: dict, history: tuple = (),
               system: str = "") -> Iterator[tuple[str, dict]]:
        """Yield (reply so far, stats), at most one update every stream_every seconds and then the
        whole reply; the last stats have new_tokens, seconds, tokens_per_s, first_token_s,
        stopped_at_eot and stopped_at_stop (every one has model, mode and, for a local model, its
        tokenizer). mode "" = the model's own; p: the sampling settings (check_params), seed, and
        optionally stop (a tuple of strings); history: earlier (question, answer) exchanges and
        system: system text, both for chat mode (the oldest exchanges are left out when the
        context is full)."""
        if name.startswith(("http://", "https://")):
            yield from self._remote(name, question, mode, p, history)
            return
        with self.slot(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate") as own:
            updates = self._local(name, question, mode, p, history, system)
            try:
                while (update := own.submit(next, updates, None).result()) is not None:
                    yield update
            finally:
                updates.close()

    def _local(self, name: str, question: str, mode: str, p: dict, history: tuple = (),
               system: str = "") -> Iterator[tuple[str, dict]]:
        """stream's updates for a local model, each computed on the stream's own thread."""
        model, ckpt = self._load(name)
        mode = mode or mode_of(ckpt)
        if mode == "chat" and not can_chat(ckpt):
            raise ModelError(f"{name} 是预训练模型，没有学过问答模板，只会接着文字往下写：请改用“续写”模式，"
                             "或换一个 SFT（问答）模型。")
        try:  # fitted once here: the notice and the generation use the same prompt
            prompt = fit_prompt(ckpt, question, mode, model.config.block_size, p["max_new_tokens"], history, system)
        except ValueError as e:
            raise ModelError(f"{name}：{e}") from e
        seed = p["seed"] if p.get("seed", -1) >= 0 else random.randrange(2**31)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        stats = {"model": name, "mode": mode, "tokenizer": checkpoint.tokenizer(ckpt).describe()}
        text, t0, sent = "", time.perf_counter(), -math.inf
        notice = cut_notice(prompt, len(history) if mode == "chat" else 0, system if mode == "chat" else "")
        if notice:
            stats["notice"] = notice
        for piece in stream_reply(model, ckpt, question, mode, generator=gen, stats=stats, prompt=prompt,
                                  stop=tuple(p.get("stop", ())), **{k: p[k] for k in SAMPLING}):
            text += piece
            now = time.perf_counter()
            stats.setdefault("first_token_s", round(now - t0, 3))
            if now - sent >= self.stream_every:
                sent = now
                yield text, dict(stats)
        stats.setdefault("first_token_s", None)
        stats["tokens_per_s"] = round(stats["new_tokens"] / max(stats["seconds"], 1e-9), 1)
        yield text, stats

    @contextmanager
    def client(self, url: str):
        """with store.client(url) as client: the gradio_client of an allowed URL, made on first use
        and counted busy until the with ends; beyond max_clients the least recently used idle ones
        are closed. ModelError for a URL not allowed, before any connection."""
        url = url.rstrip("/")
        if not (self.any_remote or url in self.remotes):
            allowed = "、".join(self.remotes) if self.remotes else "无（本应用启动时没有给 --remotes）"
            raise ModelError(f"{url} 不在允许的远程模型地址里，没有连接它。允许的地址：{allowed}。"
                             "要用同学的模型，请在启动时加上 --remotes=http://同学的IP:端口")
        with self.clients_lock:
            client = self.clients.get(url)
        if client is None:  # connecting can take a while: not under the lock
            client = Client(url, verbose=False, download_files=False, analytics_enabled=False,
                            httpx_kwargs={"timeout": httpx.Timeout(self.timeout, connect=min(5.0, self.timeout))})
        with self.clients_lock:
            kept = self.clients.setdefault(url, client)  # another request may have connected meanwhile
            self.clients.move_to_end(url)
            self.busy[url] += 1
            self._close_idle()
        if kept is not client:
            client.close()
        try:
            yield kept
        finally:
            with self.clients_lock:
                self.busy[url] -= 1
                self._close_idle()

    def _close_idle(self) -> None:
        """Close the least recently used idle clients beyond max_clients (under clients_lock). A busy
        one waits for its streams to end: closing it would cut them off."""
        idle = [url for url in self.clients if not self.busy[url]]
        while len(self.clients) > self.max_clients and idle:
            url = idle.pop(0)
            self.clients.pop(url).close()
            del self.busy[url]

    def _remote(self, target: str, question: str, mode: str, p: dict, history: tuple = ()):
        """stream's updates from a classmate's app, through its /generate; the history (if any) goes
        as its history= argument, which apps made before multi-turn chat do not take."""
        url, _, name = target.partition("#")
        job = None
        late = f"{target} 超过 {self.timeout:g} 秒没有回应或连接中断，已停止等待（对方可能太忙或已经关闭）。"
        try:
            with self.client(url) as client:
                turns = {"history": [list(h) for h in history]} if history else {}
                try:
                    job = client.submit(question, mode, *(p[k] for k in SAMPLING), name, p.get("seed", -1),
                                        **turns, api_name="/generate")
                except TypeError as e:  # gradio_client checks the arguments against the app's API
                    raise ModelError(f"{target} 的 /generate 不接受 history（对方的应用版本较旧，没有多轮对话）："
                                     "请对方更新 MiniGLM，或点“清空”后单轮提问。") from e
                out, seen, last = None, 0, time.monotonic()
                while not wait([job.future], timeout=REMOTE_TICK).done:  # job's own iterator has no deadline
                    outputs = job.outputs()
                    for out in outputs[seen:]:
                        yield out[0], out[1] | {"model": target}
                    if len(outputs) > seen:
                        seen, last = len(outputs), time.monotonic()
                    elif time.monotonic() - last > self.timeout:
                        raise ModelError(late)
                final = job.result()
                if final != out:
                    yield final[0], final[1] | {"model": target}
        except (httpx.TimeoutException, CancelledError) as e:  # CancelledError: the client's event stream broke
            raise ModelError(late) from e
        except (ValueError, httpx.HTTPError, OSError) as e:
            raise ModelError(f"无法使用 {target}：{e}") from e
        finally:
            if job is not None and not job.done():
                job.cancel()  # stopped here: stop it on the classmate's app too


def model_facts(path) -> dict:
    """A checkpoint's facts, its weights not read (mmap): kind ("chat": SFT, answers questions;
    "pretrained": continues text), parameters, tokenizer, context_length (block_size) and
    lora_base (a LoRA checkpoint's base: the name of the folder it records; else None); for one that
    cannot be read, kind None and the error."""
    try:
        ckpt = checkpoint.read(path, mmap=True)
        with torch.device("meta"):  # shapes only: no memory, no time
            params = GPT(GPTConfig(**ckpt["model_args"])).num_params()
    except (FileNotFoundError, ValueError, TypeError, KeyError, AssertionError) as e:  # model_args that build no model
        return {"kind": None, "error": f"{type(e).__name__}: {e}", "lora_base": None}
    return {"kind": "chat" if can_chat(ckpt) else "pretrained", "parameters": params,
            "tokenizer": checkpoint.tokenizer(ckpt).describe(), "context_length": ckpt["model_args"]["block_size"],
            "lora_base": lora.recorded_base(checkpoint.checkpoint_file(path), ckpt["lora"]["base"]).parent.name
            if "lora" in ckpt else None}  # the base's folder name: no path of the server's


def stream_together(streams: list) -> Iterator[list]:
    """Run several (text, stats) streams at once, one thread each; yield the list of their latest
    values whenever one changes. A stream that fails ends with "【出错】message" and the others go on.
    Closing this generator (the stop button) stops them all at their next piece."""
    latest = [("", {}) for _ in streams]
    updates, stop = queue.Queue(), threading.Event()

    def run(i, stream):
        try:
            for value in stream:
                if stop.is_set():
                    break
                updates.put((i, value))
        except ModelError as e:
            updates.put((i, (f"{ERROR_MARK}{e}", {})))
        finally:
            stream.close()
            updates.put((i, None))

    for i, stream in enumerate(streams):
        threading.Thread(target=run, args=(i, stream), daemon=True).start()
    running = len(streams)
    try:
        while running:
            i, value = updates.get()
            if value is None:
                running -= 1
                continue
            latest[i] = value
            while not updates.empty() and running:  # yield once per burst, not once per piece
                j, more = updates.get()
                if more is None:
                    running -= 1
                else:
                    latest[j] = more
            yield list(latest)
    finally:
        stop.set()


def start_app(log, *args, cwd=None) -> tuple[subprocess.Popen, str]:
    """sample_gradio.py with args in a subprocess on a free loopback port, run in cwd (None: this
    process's), its output going to the file log (a pipe nobody reads could fill and stall it):
    (process, url) once "/" answers (any HTTP status: with --ui=False it is a 404); a RuntimeError
    with the log's tail if it exits or does not answer within 120 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "w", encoding="utf-8") as out:
        app = subprocess.Popen([sys.executable, str(APP), f"--port={port}", *map(str, args)], cwd=cwd,
                               stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
        try:
            urlopen(url, timeout=2)
            return app, url
        except HTTPError:
            return app, url
        except URLError:
            if app.poll() is not None or time.time() > deadline:
                app.kill()
                tail = Path(log).read_text(encoding="utf-8")[-3000:]
                raise RuntimeError(f"sample_gradio.py did not start:\n{tail}") from None
            time.sleep(0.5)
