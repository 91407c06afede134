"""An OpenAI-compatible HTTP server for a base model or a fine-tuned checkpoint, safe to share on one machine.

    python serve.py --model_dir output_dir_lora --port 8000              # then open http://127.0.0.1:8000/
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "发动机异响"}], "temperature": 0}'

Endpoints: POST /v1/chat/completions ("stream": true for server-sent events, as OpenAI's), GET /v1/models,
GET /metrics (Prometheus), GET /health, and GET / (a chat page that talks to this server's API).

The prompt format is chat.py's default for the folder: a checkpoint gets the layout it was trained on (the user
message is the row's text; system messages and earlier turns are refused there unless it learned conversations),
a base folder its family's official chat template. Sampling: a request's temperature / top_p / top_k / max_tokens
win; otherwise this server's --temperature etc. (the family's official defaults); temperature 0 is greedy.

Sharing it: requests generate together (continuous batching, at most --max_batch at once; serving_engine.py), at
most --max_queue wait (beyond: 429 with Retry-After), and each request's values are checked at the door
(serving_api.py): one client's bad values, failure or hang-up never touches another's answer. --api_key (or the
CHATGLM_API_KEY environment variable) requires `Authorization: Bearer KEY` on the API; bodies must be JSON; pages of
other origins are refused unless --allowed_origins names them; bound to loopback (the default), only requests
naming this machine in their Host header are served. One access-log line per request goes to stderr.
"""
import argparse
import asyncio
import json
import os
import socket
import sys
import time
import traceback
import uuid

import chat
from serving_api import AccessPolicy, APIError, ServerMetrics, Settings, bad, body_too_large, check_request, prompt_ids

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_page")
API_KEY_VARIABLE = "CHATGLM_API_KEY"


def log(line):
    print(line, file=sys.stderr, flush=True)


class Server:
    """The model, its engine, and what the HTTP side needs to answer."""

    def __init__(self, model, tokenizer, family, args, saved, model_name):
        from serving_engine import Engine
        self.model_name, self.args, self.tokenizer, self.family = model_name, args, tokenizer, family
        self.conversation = chat.Conversation(tokenizer, family, args, saved)
        config = model.config
        context = getattr(config, "seq_length", None) or getattr(config, "max_sequence_length", None) or \
            getattr(config, "max_position_embeddings", 2048)
        self.settings = Settings(args, family, context, model_name, self.conversation)
        self.stop_ids = family.stop_token_ids(tokenizer)
        self.metrics = ServerMetrics(model_name)
        self.policy = AccessPolicy(args.host, args.api_key, args.allowed_origins, args.max_body_bytes)
        self.engine = Engine(model, tokenizer, args.max_batch, args.max_queue, min(args.slot_tokens, context), log=log)

    def text_of(self, ids):
        return self.family.answer_text(self.tokenizer.decode(ids, skip_special_tokens=True))

    def info(self):
        """What the chat page (and a monitor) may know without a key."""
        return {"status": "ok", "model": self.model_name, "format": self.args.format,
                "multi_turn": self.args.format == "chat" or self.conversation.conversations,
                "api_key_required": bool(self.args.api_key), "running": self.engine.running(),
                "waiting": self.engine.queue_length(),
                "defaults": {"temperature": self.settings.temperature, "top_p": self.settings.top_p,
                             "max_tokens": self.settings.max_tokens}}


# ---- one request, from the body to its answer -----------------------------------------------------------------------

async def read_body(http_request, limit):
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > limit:
            raise body_too_large(limit)
    return bytes(body)


def parse_json(raw):
    try:
        return json.loads(raw)
    except RecursionError:
        raise bad("the body nests JSON too deeply") from None
    except ValueError as err:
        raise bad(f"the body is not valid JSON: {str(err)[:120]}") from None


class Outcome:
    """The engine's events for one request, handed to the event loop: tokens as they come, then the end."""

    def __init__(self, loop):
        self.loop, self.events = loop, asyncio.Queue()

    def on_token(self, token):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (token, None, None))

    def on_finish(self, reason, error):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (None, reason, error))


async def start_request(server, http_request):
    """Check the request and hand it to the engine: (the engine's Request, its Outcome, the sampling settings)."""
    from serving_engine import QueueFull, Request
    raw = await read_body(http_request, server.args.max_body_bytes)
    body = await asyncio.to_thread(parse_json, raw) if len(raw) > 1 << 16 else parse_json(raw)
    turns, sampling = check_request(body, server.settings)
    ids = await asyncio.to_thread(prompt_ids, turns, sampling, server.settings)  # tokenizing: off the event loop
    outcome = Outcome(asyncio.get_running_loop())
    timeout = server.args.request_timeout
    request = Request(ids, sampling["max_tokens"], sampling["temperature"], sampling["top_p"], sampling["top_k"],
                      [] if sampling["ignore_eos"] else server.stop_ids, outcome.on_token, outcome.on_finish,
                      deadline=time.monotonic() + timeout if timeout else None)
    original = request.on_finish
    request.on_finish = lambda reason, error: (server.metrics.request_ended(request, reason), original(reason, error))
    try:
        server.engine.submit(request)
    except QueueFull as err:
        raise APIError(429, f"the server is busy: {err}; try again shortly", kind="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    return request, outcome, sampling


def failure(reason, error, server):
    """The APIError a request that ended with `reason` gets (its internal error text goes to the log only)."""
    if reason == "timeout":
        return APIError(504, f"the request took longer than --request_timeout {server.args.request_timeout} s; its "
                             "generation was stopped", kind="timeout_error", code="timeout")
    log(f"request failed: {error}")
    return APIError(500, "the server could not complete this request (its log says why)", kind="server_error")


async def collect(server, http_request, request, outcome):
    """A non-streamed answer: waits for the end, and ends the request as soon as its client hangs up."""
    async def hang_up():
        while (await http_request.receive())["type"] != "http.disconnect":
            pass
        request.cancelled = True  # the engine frees the row before its next step
    watcher = asyncio.create_task(hang_up())
    try:
        while True:
            token, reason, error = await outcome.events.get()
            if token is None:
                return reason, error
    finally:
        watcher.cancel()


def completion_body(server, request, reason, completion_id, created):
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": server.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": server.text_of(request.generated)},
                         "finish_reason": reason}],
            "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(request.generated),
                      "total_tokens": len(request.prompt_ids) + len(request.generated)}}


async def stream_events(server, request, outcome, completion_id, created):
    """OpenAI's chunks as server-sent events: the role, the text as it grows, the finish reason, [DONE]; a request
    that fails ends with an error event instead (OpenAI's clients raise it). A client that hangs up cancels this
    generator: its request leaves the engine before the next step."""
    def chunk(delta, reason=None):
        return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                      "model": server.model_name, "choices": [{"index": 0, "delta": delta,
                                                                               "finish_reason": reason}]},
                                     ensure_ascii=False) + "\n\n"
    shown, tokens = "", []
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            token, reason, error = await outcome.events.get()
            while token is not None and not outcome.events.empty():  # decode once for all the tokens that are ready
                tokens.append(token)
                token, reason, error = outcome.events.get_nowait()
            if token is None:
                break
            tokens.append(token)
            # held back: a trailing U+FFFD, part of a character whose other bytes are still to come (GLM-4's BPE)
            text = server.text_of(tokens).rstrip("\ufffd")
            if text.startswith(shown) and len(text) > len(shown):
                yield chunk({"content": text[len(shown):]})
                shown = text
        if reason in ("stop", "length"):
            text = server.text_of(tokens)
            if text != shown and text.startswith(shown):
                yield chunk({"content": text[len(shown):]})
            yield chunk({}, reason)
            yield "data: [DONE]\n\n"
        else:
            yield "data: " + json.dumps(failure(reason, error, server).body()) + "\n\n"
    finally:
        request.cancelled = True  # finished, or the client is gone


def create_app(server):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    app = FastAPI(title="chatglm-finetuning", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err):
        return JSONResponse(status_code=err.status, content=err.body(), headers=err.headers)

    @app.get("/")
    def page():
        return FileResponse(os.path.join(PAGE_DIR, "index.html"), media_type="text/html")

    @app.get("/chat.js")
    def script():
        return FileResponse(os.path.join(PAGE_DIR, "chat.js"), media_type="text/javascript")

    @app.get("/health")
    def health():
        return server.info()

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(server.metrics.text(server.engine.running(), server.engine.queue_length()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatglm-finetuning"}]}

    @app.post("/v1/chat/completions")
    async def completions(http_request: HTTPRequest):
        try:
            request, outcome, sampling = await start_request(server, http_request)
        except APIError as err:
            http_request.state.log = f"refused: {str(err)[:100]}"
            return error_response(err)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if sampling["stream"]:
            http_request.state.log = f"prompt={len(request.prompt_ids)} streamed"
            return StreamingResponse(stream_events(server, request, outcome, completion_id, created),
                                     media_type="text/event-stream")
        reason, error = await collect(server, http_request, request, outcome)
        http_request.state.log = f"prompt={len(request.prompt_ids)} completion={len(request.generated)} {reason}"
        if reason not in ("stop", "length"):
            return error_response(failure(reason, error, server))
        return completion_body(server, request, reason, completion_id, created)
    return Gate(app, server)


class Gate:
    """ASGI around the app: the access policy (serving_api.AccessPolicy) before any handler, CORS for the allowed
    origins, a JSON 500 without internal text for what fails unexpectedly, the metrics and one log line per
    request."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        cors = self.server.policy.cors_headers(headers.get("origin"))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + \
                    [(k.encode(), v.encode()) for k, v in cors.items()]
            await send(message)
        refusal = self.server.policy.refusal(scope["method"], scope["path"], headers)
        try:
            if refusal is not None:
                await send_json(send_with_headers, refusal.status, refusal.body(), refusal.headers)
            elif scope["method"] == "OPTIONS":
                await send_json(send_with_headers, 204 if cors else 403, None)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:  # noqa: BLE001 (the client gets a plain 500; the log gets the traceback)
            log(traceback.format_exc())
            if "code" not in status:
                await send_json(send_with_headers, 500, APIError(500, "internal server error",
                                                                 kind="server_error").body())
        finally:
            self.server.metrics.http_request(scope["path"], status.get("code", 0))
            client = (scope.get("client") or ("-",))[0]
            extra = scope.get("state", {}).get("log", "") if refusal is None else f"refused: {str(refusal)[:100]}"
            log(f'{client} "{scope["method"]} {scope["path"]}" {status.get("code", "-")} '
                f'{1000 * (time.perf_counter() - start):.0f} ms {extra}'.rstrip())


async def send_json(send, status, content, headers=None):
    body = b"" if content is None else json.dumps(content).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# ---- the command ----------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_model_arguments(parser)
    sampling = parser.add_argument_group("sampling defaults (a request's own values win)")
    chat.add_sampling_arguments(sampling)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--model_name", default=None, help="the id clients send (default: the folder's name)")
    server.add_argument("--api_key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_VARIABLE}; none)")
    server.add_argument("--allowed_origins", default="", help="comma-separated web origins whose pages may call "
                        "the API (CORS), e.g. http://localhost:3000; '*' for any (default: none but this server's "
                        "own page)")
    server.add_argument("--max_batch", type=int, default=16, help="most requests generated at once (the "
                        "continuous batch's rows and long requests together; fewer rows on a GPU where their cache "
                        "would take over half the free memory)")
    server.add_argument("--max_queue", type=int, default=64, help="most requests waiting for a row; beyond it the "
                        "server answers 429 with Retry-After")
    server.add_argument("--max_body_bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    server.add_argument("--request_timeout", type=float, default=600, help="seconds a request may take from its "
                        "arrival to its last token (0: no limit); beyond it its generation stops and it gets 504")
    server.add_argument("--slot_tokens", type=int, default=2048,
                        help="prompt + answer tokens one row of the continuous batch holds; a longer request runs "
                             "on transformers' cache beside the rows, within --max_batch")
    return parser


def check_arguments(args):
    for name in ("max_batch", "max_queue", "max_body_bytes", "slot_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1")
    if args.request_timeout < 0:
        raise SystemExit("error: --request_timeout must be 0 (no limit) or more seconds")
    if args.temperature is not None and not 0 <= args.temperature <= 2:
        raise SystemExit("error: --temperature must be within [0, 2]")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SystemExit("error: --top_p must be within (0, 1]")
    if args.top_k < 0 or args.max_new_tokens < 1:
        raise SystemExit("error: --top_k must be >= 0 and --max_new_tokens >= 1")
    args.allowed_origins = [o.strip().rstrip("/") for o in args.allowed_origins.split(",") if o.strip()]


def listening_socket(host, port):
    """The server's socket, bound before the model loads: a port in use is said at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {err.strerror} (another server there? choose "
                         "--port)") from None
    sock.listen(128)
    return sock


def main(argv=None):
    import uvicorn
    args = build_parser().parse_args(argv)
    check_arguments(args)
    sock = listening_socket(args.host, args.port)
    args.greedy, args.seed, args.input, args.output = False, None, None, None  # what chat's loading reads
    model, tokenizer, family, saved = chat.load_for_chat(args)
    if args.format is None:
        args.format = "task" if saved else "chat"
    server = Server(model, tokenizer, family, args, saved,
                    args.model_name or os.path.basename(os.path.normpath(args.model_dir)))
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    log(f"serving {server.model_name} ({family.name}, {args.format} format) on http://{shown_host}:{args.port} "
        f"(chat page at /; API key {'required' if args.api_key else 'not required'})")
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
