"""The OpenAI-compatible API of the web app: /v1/models, /v1/chat/completions (chat models) and
/v1/completions (pretrained models, which continue text), routes added to the Gradio page's own
app on the same port (serve; --ui=False serves them alone, under uvicorn).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="-")    # the app's --api_key, if it has one
    reply = client.chat.completions.create(model="out-cpu-sft", messages=[{"role": "user", "content": "你好"}])

Every generation takes one of the store's slots (ModelStore.slot: the page and the API share
--concurrency); beyond queue_size waiting requests the API answers 429. Errors have OpenAI's JSON
shape {"error": {"message", "type", "param", "code"}}; a client that disconnects mid-stream stops
its generation.
"""
import hmac
import json
import secrets
import socket
import time
import traceback

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine import SAMPLING, SAMPLING_DEFAULTS, sampling_error
from serving import ModelError, ModelStore, clean_question
from webpage import newest_exchanges

# OpenAI's request fields -> engine.SAMPLING's names; top_k and repetition_penalty are ours (extra fields)
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty"}
OURS = {"model", "stream", "stream_options", "stop", "seed", "n", *SAMPLING_FIELDS}
# What OpenAI clients commonly send at its neutral value: accepted at that value only (a list of allowed values)
NEUTRAL = {"frequency_penalty": [0, None], "presence_penalty": [0, None], "logprobs": [False, None],
           "top_logprobs": [0, None], "logit_bias": [{}, None], "tools": [[], None], "tool_choice": ["none", None],
           "parallel_tool_calls": [False, True, None], "response_format": [{"type": "text"}, None],
           "store": [False, None], "echo": [False, None], "best_of": [1, None], "suffix": [None, ""],
           "service_tier": ["auto", "default", None], "reasoning_effort": [None]}
ANY_STRING = {"user", "metadata"}  # accepted as they are (a string, an object): they do not change the reply
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def bad(param: str, expected: str) -> APIError:
    return APIError(400, f"{param}: expected {expected}", param, "invalid_value")


def sampling(body: dict) -> dict:
    """The engine's sampling settings, seed and stop from a request (SAMPLING_DEFAULTS for what it
    leaves out), checked: APIError naming the request's field."""
    p = dict(SAMPLING_DEFAULTS)
    for field, key in SAMPLING_FIELDS.items():
        if body.get(field) is not None:
            p[key] = body[field]
            if key == "max_new_tokens" and isinstance(p[key], int) and p[key] > SAMPLING[key][2]:
                p[key] = SAMPLING[key][2]  # front ends ask for 2048 or 4096: as many as the app gives
            if (why := sampling_error(p)) and why[0] == key:
                _, value, lo, hi, whole = why
                raise bad(field, f"a {'whole ' if whole else ''}number from {lo} to {hi}, got {value!r}")
    p |= {"max_new_tokens": int(p["max_new_tokens"]), "top_k": int(p["top_k"])}
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise bad("seed", f"a whole number, got {seed!r}")
    seed = None if seed is not None and seed < 0 else seed  # some clients send -1 for "random"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"a string or a list of at most {MAX_STOP} non-empty strings")
    if body.get("n") not in (None, 1):
        raise bad("n", "1 (one reply per request)")
    options = body.get("stream_options")
    if options is not None and (not body.get("stream") or not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise bad("stream_options", "{\"include_usage\": true|false}, with stream: true")
    if not isinstance(body.get("stream", False), bool):
        raise bad("stream", "true or false")
    return p | {"seed": -1 if seed is None else seed % 2**31, "stop": tuple(stop)}


def check_fields(body: dict, own: set) -> None:
    """400 naming the first field the API does not take (or takes only at its neutral value)."""
    for key, value in body.items():
        if key in own or key in OURS:
            continue
        if key in ANY_STRING:
            if value is None or isinstance(value, (str, dict)):
                continue
            raise bad(key, "a string")
        if key in NEUTRAL:
            if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in NEUTRAL[key]):
                continue
            allowed = ", ".join(json.dumps(v) for v in NEUTRAL[key])
            raise APIError(400, f"{key}={json.dumps(value, ensure_ascii=False)} is not supported: MiniGLM takes "
                           f"only {allowed}", key, "unsupported_value")
        raise APIError(400, f"unknown parameter {key!r}", key, "unknown_parameter")


def text_of(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text"
                                         and isinstance(c.get("text"), str) for c in content):
        return "".join(c["text"] for c in content)
    if not isinstance(content, str):
        raise bad(where, "a string (or a list of text parts)")
    return content


def conversation(messages, limit: int) -> tuple[str, tuple, str, str]:
    """(question, history, system, notice) from OpenAI messages: system messages first, then user
    and assistant taking turns, the last one the user's. The question and the system text are cut
    to limit characters (notice), as the page's input; earlier turns stay whole (a cut answer
    would not be what the model said), the newest of them up to webpage.HISTORY_CHARS."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "a non-empty list of {\"role\", \"content\"}")
    system, turns, notices = [], [], []
    for i, m in enumerate(messages):
        role = ROLES.get(m.get("role")) if isinstance(m, dict) and isinstance(m.get("role"), str) else None
        if role is None:
            raise bad(f"messages[{i}].role", f"one of {', '.join(ROLES)}")
        text, notice = clean_question(text_of(m.get("content"), f"messages[{i}].content"), limit)
        if notice and (role == "system" or i == len(messages) - 1):
            notices.append(f"messages[{i}]: {notice}")
        elif notice:
            text = text_of(m.get("content"), "").strip()  # an earlier turn: whole
        if role == "system":
            if turns:
                raise bad(f"messages[{i}].role", "system messages only before the conversation")
            system.append(text)
        elif role != ("user" if len(turns) % 2 == 0 else "assistant"):
            raise bad(f"messages[{i}].role", "user and assistant taking turns, the first and the last one user")
        else:
            turns.append(text)
    if len(turns) % 2 == 0:
        raise bad(f"messages[{len(messages) - 1}].role", "user: the last message is the question")
    if not turns[-1]:
        raise bad(f"messages[{len(messages) - 1}].content", "a question, not empty")
    history = newest_exchanges(zip(turns[:-1:2], turns[1::2]))
    return turns[-1], history, "\n".join(s for s in system if s), " ".join(notices)


class OpenAIRoutes:
    """The /v1 routes over a ModelStore: limit is the app's max_input_chars, api_key "" = no key."""

    def __init__(self, store: ModelStore, limit: int, queue_size: int, api_key: str = ""):
        self.store, self.limit, self.queue_size, self.api_key = store, limit, queue_size, api_key
        self.facts, self.names = store.facts(), store.names()  # read once, at start
        # the threads that wait for a generation's pieces: every request in the queue or generating has one
        self.threads = anyio.CapacityLimiter(queue_size + 64)

    def add_to(self, app: FastAPI) -> FastAPI:
        for path, handler, methods in (("/v1/models", self.models, ["GET"]),
                                       ("/v1/models/{model_id:path}", self.one_model, ["GET"]),
                                       ("/v1/chat/completions", self.chat, ["POST"]),
                                       ("/v1/completions", self.completions, ["POST"])):
            app.add_api_route(path, self.guarded(handler), methods=methods)
        return app

    def guarded(self, handler):
        async def route(request: Request):
            try:
                self.check_key(request)
                return await handler(request)
            except APIError as e:
                return e.response()
            except Exception as e:  # a bug or a broken model: OpenAI's shape for the client, the traceback in the log
                traceback.print_exc()
                return APIError(500, f"the server failed: {type(e).__name__}: {e}", None, "server_error",
                                "server_error").response()
        route.__name__ = handler.__name__
        return route

    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "wrong or missing API key: send the header Authorization: Bearer <the app's "
                           "--api_key>", None, "invalid_api_key")

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "miniglm"} | self.facts[name]
            for name in self.names]})

    async def one_model(self, request: Request) -> JSONResponse:
        model_id = request.path_params["model_id"]
        if model_id not in self.facts:
            raise APIError(404, f"the model {model_id!r} does not exist; this app has: {', '.join(self.names) or 'none'}",
                           "model", "model_not_found")
        return JSONResponse({"id": model_id, "object": "model", "created": 0, "owned_by": "miniglm"}
                            | self.facts[model_id])

    async def chat(self, request: Request):
        body = await self.body(request)
        check_fields(body, {"messages"})
        name = self.model(body, "chat")
        question, history, system, notice = conversation(body.get("messages"), self.limit)
        return await self.answer(request, body, name, question, "chat", history, system, notice)

    async def completions(self, request: Request):
        body = await self.body(request)
        check_fields(body, {"prompt"})
        name = self.model(body, "pretrained")
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str):
            raise bad("prompt", "a string (or a list of one string)")
        prompt, notice = clean_question(prompt, self.limit)
        if not prompt:
            raise bad("prompt", "some text to continue, not empty")
        return await self.answer(request, body, name, prompt, "generate", (), "", notice)

    @staticmethod
    async def body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def model(self, body: dict, kind: str) -> str:
        """The model asked for, of the endpoint's kind; omitted: the app's first model of that kind."""
        facts, names = self.facts, self.names
        name = body.get("model")
        if name is None:
            name = next((n for n in names if facts[n]["kind"] == kind), None)
            if name is None:
                raise bad("model", f"a model name: this app has no {kind} model to default to ({', '.join(names)})")
        if not isinstance(name, str) or name not in facts:
            raise APIError(404, f"the model {name!r} does not exist; this app has: {', '.join(names) or 'none'}",
                           "model", "model_not_found")
        if facts[name]["kind"] is None:
            raise APIError(400, f"the model {name!r} cannot be used: {facts[name]['error']}", "model", "model_broken")
        if facts[name]["kind"] != kind:
            right = "/v1/completions" if facts[name]["kind"] == "pretrained" else "/v1/chat/completions"
            raise APIError(400, f"{name} is a {facts[name]['kind']} model: use {right}", "model", "wrong_endpoint")
        return name

    async def answer(self, request: Request, body: dict, name: str, text: str, mode: str, history: tuple,
                     system: str, notice: str):
        p = sampling(body)
        if self.store.waiting >= self.queue_size:
            raise APIError(429, f"the queue is full ({self.queue_size} requests waiting): try again later",
                           None, "rate_limit_exceeded", "rate_limit_error")
        updates = self.store.stream(name, text, mode, p, history, system)
        try:  # the first piece before any byte is sent: a model that fails gets an error status
            first = await anyio.to_thread.run_sync(next, updates, None, limiter=self.threads)
        except ModelError as e:
            updates.close()
            raise APIError(400, str(e), "model", "model_error") from None
        reply = Reply(name, mode, notice)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self.events(request, reply, first, updates, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, stats = first
        try:
            while (update := await anyio.to_thread.run_sync(next, updates, None, limiter=self.threads)) is not None:
                text, stats = update
                if await request.is_disconnected():  # nobody waits for it: free the slot
                    return JSONResponse({})
        finally:
            updates.close()
        return JSONResponse(reply.whole(text, stats))

    async def events(self, request: Request, reply: "Reply", first, updates, usage: bool):
        """Server-sent events: a first chunk (the role), content deltas, a last chunk with the
        finish_reason, the usage chunk if asked for, then [DONE]. Stops the generation when the
        client is gone."""
        try:
            yield sse(reply.chunk(None, first=True))
            sent, update, stats = "", first, first[1]
            while update is not None:
                text, stats = update
                if text[len(sent):]:
                    yield sse(reply.chunk(text[len(sent):]))
                    sent = text
                if await request.is_disconnected():
                    return
                update = await anyio.to_thread.run_sync(next, updates, None, limiter=self.threads)
            yield sse(reply.chunk(None, stats=stats))
            if usage:
                yield sse(reply.chunk(None, stats=stats, usage=True))
            yield "data: [DONE]\n\n"
        finally:
            updates.close()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """The response objects of one reply, in the chat or the completions shape."""

    def __init__(self, name: str, mode: str, notice: str):
        self.name, self.chat, self.notice = name, mode == "chat", notice
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name}

    @staticmethod
    def finish(stats: dict) -> str:
        return "stop" if stats.get("stopped_at_eot") or stats.get("stopped_at_stop") else "length"

    @staticmethod
    def usage(stats: dict) -> dict:
        prompt, new = stats.get("prompt_tokens", 0), stats.get("new_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def notes(self, stats: dict) -> dict:
        """Our one extra field: why the input was cut (the app's character limit, the model's context)."""
        notice = " ".join(n for n in (self.notice, stats.get("notice")) if n)
        return {"notice": notice} if notice else {}

    def whole(self, text: str, stats: dict) -> dict:
        choice = {"index": 0, "finish_reason": self.finish(stats), "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        kind = "chat.completion" if self.chat else "text_completion"
        return self.head(kind) | {"choices": [choice], "usage": self.usage(stats)} | self.notes(stats)

    def chunk(self, piece: str | None, first: bool = False, stats: dict | None = None, usage: bool = False) -> dict:
        """A streamed chunk: the first (role), a piece, the last (stats: its finish_reason) or the usage one."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if usage:
            return self.head(kind) | {"choices": [], "usage": self.usage(stats)}
        finish = None if stats is None else self.finish(stats)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return self.head(kind) | {"choices": [choice]} | (self.notes(stats) if stats else {})


def serve(routes: OpenAIRoutes, demo, host: str, port: int, auth: tuple | None) -> None:
    """Serve the /v1 routes and, unless demo is None (--ui=False), the Gradio page demo (with its
    login auth, which covers the page only) on one port; SystemExit with a message if the port is
    taken. The page is served by Gradio's own launch, its routes added to Gradio's app: mounted
    with gr.mount_gradio_app under uvicorn, the page's first event was now and then never
    processed (the browser test, about one run in two)."""
    if demo is not None:
        try:
            demo.launch(server_name=host, server_port=port, auth=auth, ssr_mode=False, show_error=False, quiet=True,
                        prevent_thread_lock=True)
        except OSError as e:
            raise SystemExit(f"--port={port}: cannot serve there ({e}); pick another with --port=") from None
        routes.add_to(demo.server_app)
        demo.block_thread()
        return
    app = routes.add_to(FastAPI(docs_url=None, redoc_url=None, openapi_url=None))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: a restart need not wait
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"--port={port}: cannot serve there ({e}); pick another with --port=") from None
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)).run(sockets=[sock])
