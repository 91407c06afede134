"""serve.py's door: what a chat completion request may hold, OpenAI's error shapes, who may call, and the metrics.

Every value is checked before a request reaches the engine, so that nothing a client sends can fail inside a
decode step that other requests share: types (a JSON number where a number is meant, never a bool), ranges
(temperature [0, 2], top_p (0, 1], top_k >= 0, max_tokens >= 1 and within the context, n = 1), and the prompt's
length against what the model's format allows (OpenAI's `context_length_exceeded`, never a silent cut). `null`
means the default, as in OpenAI's API. Options OpenAI has and this server does not (stop sequences, tools,
logprobs, penalties, seeds) are refused by name rather than ignored. `ignore_eos` (vLLM's extension) makes a request
run to its max_tokens, for benchmarks.
"""
import json
import math
import time

import chat

# characters per token no tokenizer of these families goes beyond: a text longer than context x this cannot fit, so
# it is refused before it is tokenized (tokenizing 100k characters takes a second)
MAX_CHARS_PER_TOKEN = 16
UNSUPPORTED = {"stop": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "logprobs": False, "top_logprobs": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "seed": None, "response_format": None, "audio": None, "modalities": None}


class APIError(Exception):
    """An OpenAI-shaped error: `status`, message, type, param and code."""

    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


# ---- values -------------------------------------------------------------------------------------------------------

def number(body, name, default, low, high, low_open=False):
    """A JSON number within [low, high] ((low, high] with `low_open`), `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (low_open and value == low):
        raise bad(f"'{name}' must be {'>' if low_open else '>='} {low} and <= {high}, got {value}", name)
    return float(value)


def integer(body, name, default, low):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    if value < low:
        raise bad(f"'{name}' must be >= {low}, got {value}", name)
    return value


def message_text(message, index):
    """A message's text: a string, or OpenAI's list of text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def read_messages(body):
    """[(role, text)] of the request, checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role: system, user or assistant", "messages")
        turns.append((message["role"], message_text(message, i)))
    if turns[-1][0] != "user":
        raise bad("the last message must be the user's", "messages")
    return turns


# ---- a request ------------------------------------------------------------------------------------------------------

class Settings:
    """What the server applies where a request says nothing: its --temperature, --top_p, --top_k and
    --max_new_tokens (by default the family's official sampling), the context length and the prompt format."""

    def __init__(self, args, family, context_length, model_name, conversation):
        top_p, temperature = chat.SAMPLING_DEFAULTS[family.name]
        self.temperature = temperature if args.temperature is None else args.temperature
        self.top_p = top_p if args.top_p is None else args.top_p
        self.top_k, self.max_tokens = args.top_k, args.max_new_tokens
        self.context_length, self.model_name, self.conversation = context_length, model_name, conversation


def check_request(body, settings):
    """(turns, sampling) of a chat completion request's body, before anything is tokenized; APIError otherwise."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise APIError(404, f"The model '{str(model)[:80]}' does not exist; this server has '{settings.model_name}'",
                       param="model", code="model_not_found")
    turns = read_messages(body)
    if integer(body, "n", 1, 1) != 1:
        raise bad("only n=1 is supported", "n")
    for name in ("stream", "ignore_eos"):  # ignore_eos: vLLM's extension, for benchmarks
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad(f"'{name}' must be true or false", name)
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in (None, allowed) and not (name == "response_format" and
                                                          body[name] == {"type": "text"}):
            raise bad(f"'{name}' is not supported by this server", name)
    format_refusal(turns, settings.conversation)
    characters = sum(len(text) for _, text in turns)
    if characters > settings.context_length * MAX_CHARS_PER_TOKEN:
        raise bad(f"the messages hold {characters:,} characters, more than a context of "
                  f"{settings.context_length} tokens can hold", "messages", "context_length_exceeded")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("give max_tokens or max_completion_tokens, not both", "max_tokens")
    size_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    sampling = {"temperature": number(body, "temperature", settings.temperature, 0, 2),
                "top_p": number(body, "top_p", settings.top_p, 0, 1, low_open=True),
                "top_k": integer(body, "top_k", settings.top_k, 0),
                "max_tokens": integer(body, size_name, None, 1), "size_name": size_name,
                "stream": bool(body.get("stream")), "ignore_eos": bool(body.get("ignore_eos"))}
    return turns, sampling


def format_refusal(turns, conversation):
    """In the task format (a checkpoint trained on single rows) the last user message is the row's text: a system
    message or earlier turns would be dropped, so they are refused rather than dropped without a word."""
    if conversation.args.format == "chat" or conversation.conversations:
        return
    if len(turns) > 1:
        raise bad("this server answers in the task format (a model trained on single rows: the last user message is "
                  "the row's text), so system messages and earlier turns would be dropped: send one user message, "
                  "or start serve.py with --format chat", "messages")


def prompt_ids(turns, sampling, settings):
    """The prompt's token ids, uncut, with max_tokens settled; APIError when they do not fit (tokenizes: call it off
    the event loop)."""
    conversation = settings.conversation
    system = "\n".join(text for role, text in turns if role == "system") or None
    talk = [(role, text) for role, text in turns if role != "system"]
    history = [(q, a) for (qr, q), (ar, a) in zip(talk[:-1:2], talk[1:-1:2]) if qr == "user" and ar == "assistant"]
    if len(history) * 2 != len(talk) - 1:
        raise bad("the messages before the last must alternate user and assistant", "messages")
    if system and not chat.has_roles(conversation.family):
        raise bad(f"{conversation.family.name} has no system role", "messages")
    ids, fits = conversation.whole_prompt_ids(talk[-1][1], history, system)
    room = settings.context_length - len(ids)
    if not fits:
        raise bad(f"the prompt is {len(ids)} tokens; this checkpoint was trained on prompts of at most "
                  f"{conversation.max_src_len} (its --max_src_len)", "messages", "context_length_exceeded")
    if room < 1:
        raise bad(f"the prompt is {len(ids)} tokens; the context length is {settings.context_length}",
                  "messages", "context_length_exceeded")
    if sampling["max_tokens"] is None:
        sampling["max_tokens"] = min(settings.max_tokens, room)
    elif sampling["max_tokens"] > room:
        raise bad(f"the prompt ({len(ids)} tokens) and {sampling['size_name']} ({sampling['max_tokens']}) exceed the "
                  f"context length {settings.context_length}", sampling["size_name"], "context_length_exceeded")
    return ids


# ---- who may call ---------------------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health", "/", "/chat.js", "/favicon.ico")


class AccessPolicy:
    """The checks every HTTP request passes before a handler sees it: the Host (when bound to loopback: no DNS
    rebinding), the Origin (same origin or --allowed_origins), the API key (`Authorization: Bearer`; /health and
    the chat page are open), JSON bodies only, and the body's declared size."""

    def __init__(self, host, api_key, allowed_origins, max_body_bytes):
        self.loopback = host in LOOPBACK_NAMES
        self.api_key, self.allowed_origins, self.max_body_bytes = api_key, set(allowed_origins), max_body_bytes

    def refusal(self, method, path, headers):
        """The APIError for this request's head, or None."""
        host = headers.get("host", "")
        if self.loopback and host_name(host) not in LOOPBACK_NAMES:
            return APIError(400, "the Host header must name this machine (the server is bound to loopback)",
                            code="invalid_host")
        origin = headers.get("origin")
        if origin and not self.origin_allowed(origin, host):
            return APIError(403, f"requests from {origin[:80]} are not allowed (--allowed_origins)",
                            code="origin_not_allowed")
        if self.api_key and path not in OPEN_PATHS and method != "OPTIONS" and \
                headers.get("authorization", "") != f"Bearer {self.api_key}":
            return APIError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                            kind="authentication_error", code="invalid_api_key")
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(415, f"the body must be JSON (Content-Type: application/json), not "
                                     f"{kind[:60] or 'unnamed'}", code="unsupported_media_type")
            declared = headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
                return body_too_large(self.max_body_bytes)
        return None

    def origin_allowed(self, origin, host):
        return "*" in self.allowed_origins or origin in self.allowed_origins or \
            origin.split("://", 1)[-1] == host  # the server's own page

    def cors_headers(self, origin):
        if not origin or not ("*" in self.allowed_origins or origin in self.allowed_origins):
            return {}
        return {"access-control-allow-origin": origin, "access-control-allow-headers": "authorization, content-type",
                "access-control-allow-methods": "GET, POST, OPTIONS", "vary": "Origin"}


def host_name(host):
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def body_too_large(limit):
    return APIError(413, f"the body is larger than {limit:,} bytes (--max_body_bytes)", code="body_too_large")


# ---- metrics (Prometheus' text format; vLLM's names, so that its dashboards read them) --------------------------

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value):
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name, labels):
        out = [f'{name}_bucket{{{labels}le="{edge}"}} {count}' for edge, count in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{{labels}le="+Inf"}} {self.count}', f"{name}_sum{{{labels.rstrip(',')}}} "
                      f"{self.sum}", f"{name}_count{{{labels.rstrip(',')}}} {self.count}"]


class ServerMetrics:
    """Counters and histograms of the requests served, read by GET /metrics."""

    def __init__(self, model_name):
        self.labels = f'model_name="{model_name}",'
        self.http = {}  # (path, status) -> count
        self.finished = {}  # finish reason -> count
        self.prompt_tokens = self.generation_tokens = 0
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.per_token = Histogram(TOKEN_LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def http_request(self, path, status):
        key = (path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions") else "other",
               status)
        self.http[key] = self.http.get(key, 0) + 1

    def request_ended(self, request, reason):
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens += len(request.prompt_ids)
        self.generation_tokens += len(request.generated)
        now = time.monotonic()
        self.latency.observe(now - request.submitted)
        if request.first_token_at is not None:
            self.first_token.observe(request.first_token_at - request.submitted)
            if len(request.generated) > 1:
                self.per_token.observe((now - request.first_token_at) / (len(request.generated) - 1))

    def text(self, running, waiting):
        m = self.labels
        lines = ["# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{{{m.rstrip(',')}}} {running}",
                 "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting{{{m.rstrip(',')}}} {waiting}",
                 "# TYPE vllm:prompt_tokens_total counter",
                 f"vllm:prompt_tokens_total{{{m.rstrip(',')}}} {self.prompt_tokens}",
                 "# TYPE vllm:generation_tokens_total counter",
                 f"vllm:generation_tokens_total{{{m.rstrip(',')}}} {self.generation_tokens}",
                 "# TYPE vllm:request_success_total counter"]
        lines += [f'vllm:request_success_total{{{m}finished_reason="{r}"}} {n}' for r, n in self.finished.items()
                  if r in ("stop", "length")]
        lines += ["# TYPE chatglm:request_ended_total counter"]  # every outcome, failures included
        lines += [f'chatglm:request_ended_total{{{m}reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        for name, histogram in (("vllm:time_to_first_token_seconds", self.first_token),
                                ("vllm:time_per_output_token_seconds", self.per_token),
                                ("vllm:e2e_request_latency_seconds", self.latency)):
            lines += [f"# TYPE {name} histogram"] + histogram.lines(name, m)
        lines += ["# TYPE http_requests_total counter"]
        lines += [f'http_requests_total{{handler="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.http.items())]
        return "\n".join(lines) + "\n"
