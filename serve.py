"""An OpenAI-compatible HTTP server for a base model or a fine-tuned checkpoint.

    python serve.py --model_dir output_dir_lora --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "output_dir_lora", "messages": [{"role": "user", "content": "发动机异响"}], "temperature": 0}'

Endpoints: POST /v1/chat/completions (with "stream": true as server-sent events, as OpenAI's), GET /v1/models,
GET /health. The prompt format is chat.py's default for the folder: a checkpoint gets the layout it was trained on
(the last user message is the row's text), a base folder its family's official chat template (system, user and
assistant messages as history). `"temperature": 0` means greedy; otherwise top_p / temperature / max_tokens as sent
(the family's official defaults when absent).

Concurrent requests are generated together (continuous batching): on the model files (ChatGLM-6B, ChatGLM2/3,
GLM-4 in THUDM's layout) all requests share the rows of one static cache (decoding.SlotDecoder); a request takes a
free row as soon as it arrives, every decode step serves all rows at once (one CUDA graph replay on a GPU), and a
request that ends or whose client hangs up frees its row at once. Greedy and sampling requests share the rows.
transformers' GLM classes, and requests longer than a row (--slot_tokens), run in cohorts on transformers' cache:
the requests that arrive together, stepped in turn with the other cohorts. Bad requests get OpenAI's error JSON
with a 4xx status.
"""
import asyncio
import json
import os
import queue
import threading
import time
import uuid

import torch

import chat


# ---- sampling ---------------------------------------------------------------------------------------------------

def next_tokens(logits, requests, vocab_size):
    """The next token of each row: greedy where temperature is 0, else top-k / top-p sampling at its temperature."""
    logits = logits[:, :vocab_size].float()
    tokens = logits.argmax(-1)
    for row, request in enumerate(requests):
        if request.temperature == 0:
            continue
        scores = logits[row] / request.temperature
        if request.top_k:
            kth = torch.topk(scores, min(request.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probabilities = torch.softmax(scores, -1)
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > request.top_p  # keep the smallest set reaching top_p
        probabilities[order[outside]] = 0
        tokens[row] = torch.multinomial(probabilities / probabilities.sum(), 1)[0]
    return tokens


# ---- the engine -------------------------------------------------------------------------------------------------

class Request:
    def __init__(self, prompt_ids, max_tokens, temperature, top_p, top_k, stop_ids, emit):
        self.prompt_ids, self.max_tokens = prompt_ids, max_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop_ids, self.emit = stop_ids, emit  # emit(token id or None at the end, finish reason)
        self.generated, self.cancelled = [], False


class Cohort:
    """Requests that start together: one left-padded prompt forward, then one step per token for all of them
    (transformers' cache and the model's generate() inputs: any sampling settings per row)."""

    def __init__(self, model, requests, pad_id, vocab_size):
        from prediction import left_pad
        from transformers import DynamicCache
        self.model, self.requests, self.vocab_size = model, requests, vocab_size
        device = next(model.parameters()).device
        ids, mask = left_pad([r.prompt_ids for r in requests], pad_id)
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.cache = DynamicCache()
        self.live = [True] * len(requests)

    def step(self):
        """One forward for the whole cohort; each live request gets its next token. Returns False when all ended."""
        logits = self.model(**self.next_inputs()).logits[:, -1]
        tokens = next_tokens(logits, self.requests, self.vocab_size)
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.requests), 1)], dim=1)
        return self.deliver(tokens.tolist())

    def next_inputs(self):
        """The tokens the cache has not seen, with what the model needs to place them."""
        # the model files place left-padded rows themselves
        return self.model.prepare_inputs_for_generation(self.ids, past_key_values=self.cache,
                                                        attention_mask=self.mask, use_cache=True)

    def deliver(self, tokens):
        for row, (request, token) in enumerate(zip(self.requests, tokens)):
            if self.live[row]:
                self.live[row] = deliver_token(request, token)
        return any(self.live)


class Slots:
    """The requests on the engine's SlotDecoder (decoding.py): continuous batching. A request takes a free row as
    soon as it arrives (its prompt's forward, with the others that arrived in the same step), gets one token per
    decode step of the whole set, and frees its row when it ends or its client leaves."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.requests = [None] * decoder.slots
        self.filled = [0] * decoder.slots  # cache slots each row has written (host copy: no sync to read it)
        self.most_live = 0  # a statistic (bench/bench_serve.py reports it)

    def free_rows(self):
        return [row for row, request in enumerate(self.requests) if request is None]

    def fits(self, request):
        return len(request.prompt_ids) + request.max_tokens + 1 <= self.decoder.longest_row

    def live(self):
        return sum(r is not None for r in self.requests)

    def admit(self, requests):
        rows = self.free_rows()[:len(requests)]
        logits = self.decoder.admit(rows, [r.prompt_ids for r in requests])
        for row, request in zip(rows, requests):
            self.requests[row] = request
            self.filled[row] = self.decoder.leading + len(request.prompt_ids)
        self.deliver(rows, lambda: logits)

    def step(self):
        rows = [row for row, request in enumerate(self.requests) if request is not None]
        self.most_live = max(self.most_live, len(rows))
        self.decoder.run_step(max(self.filled[row] for row in rows) + 1)
        if self.decoder.tokens.is_cuda:  # wait with the GIL released: the HTTP side runs meanwhile
            torch.cuda.current_stream().synchronize()
        for row in rows:
            self.filled[row] += 1
        self.deliver(rows, lambda: self.decoder.logits[rows])

    def deliver(self, rows, logits):
        """Each row's next token (sampled where its request samples; the decoder fed greedy ones already) to its
        request; rows whose request ended are freed. `logits()`: the rows' logits, gathered only when one samples."""
        requests = [self.requests[row] for row in rows]
        if any(r.temperature for r in requests):
            tokens = next_tokens(logits(), requests, self.decoder.vocab_size)
            self.decoder.tokens[rows] = tokens[:, None].to(self.decoder.tokens.device)
        else:
            tokens = self.decoder.tokens[rows, 0]
        ended = [row for row, request, token in zip(rows, requests, tokens.tolist())
                 if not deliver_token(request, token)]
        for row in ended:
            self.requests[row] = None
        if ended:
            self.decoder.release(ended)


def deliver_token(request, token):
    """Hands one new token to a request; False once the request has ended (stop token, length, cancelled)."""
    if request.cancelled:
        return False
    if token in request.stop_ids:
        request.emit(None, "stop")
        return False
    request.generated.append(token)
    request.emit(token, None)
    if len(request.generated) >= request.max_tokens:
        request.emit(None, "length")
        return False
    return True


class Engine:
    """A thread that admits waiting requests and steps them: on the model files' static decoder all requests share
    one set of slots (continuous batching); transformers' GLM classes, and a request longer than a slot, run in
    cohorts on transformers' cache (the requests that arrive together, stepped in turn with the other cohorts)."""

    def __init__(self, model, tokenizer, max_batch=64, gather_idle_s=0.005, gather_busy_s=0.005,
                 static_decoder=True, slot_tokens=2048):
        from prediction import token_count
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.gather_idle_s, self.gather_busy_s = gather_idle_s, gather_busy_s
        self.vocab_size = token_count(tokenizer)  # a padded output layer's extra ids are never chosen
        self.slots = Slots(self.slot_decoder(max_batch, slot_tokens)) if static_decoder else None
        self.waiting, self.cohorts, self.pending = queue.Queue(), [], []
        self.cohorts_started = 0  # a statistic (bench/bench_serve.py reports it)
        threading.Thread(target=self.run, daemon=True, name="engine").start()

    def slot_decoder(self, max_batch, slot_tokens):
        """As many slots as --max_batch asks, fewer where their cache would take over half the free GPU memory."""
        from decoding import SlotDecoder
        element = self.model.get_input_embeddings().weight.element_size()
        per_slot = slot_tokens * SlotDecoder.bytes_per_token(self.model.config, element)
        slots = max_batch
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            slots = max(1, min(max_batch, int(0.5 * free // per_slot)))
        print(f"continuous batching: {slots} slots of {slot_tokens} tokens ({slots * per_slot / 2 ** 30:.2f} GiB "
              f"of cache)", flush=True)
        return SlotDecoder(self.model, slots, slot_tokens, self.vocab_size)

    def active(self):
        """Requests being generated now (a statistic: read without the engine's lock)."""
        slotted = self.slots.live() if self.slots else 0
        return slotted + sum(sum(c.live) for c in list(self.cohorts)) + self.waiting.qsize() + len(self.pending)

    def submit(self, request):
        self.waiting.put(request)

    def take_waiting(self):
        """The requests that start now, or []. A request waits a little (5 ms) for others to join it, so that
        clients that arrive together share one prompt forward."""
        try:
            while True:
                busy = self.cohorts or self.pending or (self.slots and self.slots.live())
                self.pending.append((time.perf_counter(), self.waiting.get(block=not busy)))
        except queue.Empty:
            pass
        self.pending = [(t, r) for t, r in self.pending if not r.cancelled]
        if not self.pending:
            return []
        busy = self.cohorts or (self.slots and self.slots.live())
        waited = time.perf_counter() - self.pending[0][0]
        if waited < (self.gather_busy_s if busy else self.gather_idle_s) and len(self.pending) < self.max_batch:
            if not busy:
                time.sleep(0.001)
            return []
        taken, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        return [r for _, r in taken]

    def start(self, arrived):
        """Slots for the requests that fit while rows are free; a cohort for the rest."""
        if self.slots:
            free = len(self.slots.free_rows())
            slotted = [r for r in arrived if self.slots.fits(r)][:free]
            if slotted:
                self.slots.admit(slotted)
            arrived = [r for r in arrived if r not in slotted]
            if any(self.slots.fits(r) for r in arrived):  # no row free: wait for one
                self.pending = [(time.perf_counter(), r) for r in arrived if self.slots.fits(r)] + self.pending
                arrived = [r for r in arrived if not self.slots.fits(r)]
        if arrived:
            self.cohorts_started += 1
            self.cohorts.append(Cohort(self.model, arrived, self.tokenizer.pad_token_id, self.vocab_size))

    @torch.no_grad()
    def run(self):
        while True:
            arrived = self.take_waiting()
            try:
                if arrived:
                    self.start(arrived)
                if self.slots and self.slots.live():
                    self.slots.step()
            except Exception as err:  # a failed step ends the slots' requests with the reason, the server goes on
                ended = []
                for row, request in enumerate(self.slots.requests if self.slots else []):
                    if request is not None:
                        ended.append(request)
                        self.slots.requests[row] = None
                        self.slots.decoder.release([row])
                in_cohorts = {id(r) for c in self.cohorts for r in c.requests}
                ended += [r for r in arrived if r not in ended and id(r) not in in_cohorts]  # a failed prompt forward
                for request in ended:
                    request.emit(None, f"error: {err}")
            for cohort in list(self.cohorts):
                try:
                    alive = cohort.step()
                except Exception as err:
                    for request in cohort.requests:
                        request.emit(None, f"error: {err}")
                    alive = False
                if not alive:
                    self.cohorts.remove(cohort)


# ---- the HTTP API -----------------------------------------------------------------------------------------------

def error(status, message, kind="invalid_request_error", param=None, code=None):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": code}})


class BadRequest(ValueError):
    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def parse_request(body, server):
    """(prompt ids, settings) of a chat completion request, or BadRequest saying what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("model") not in (None, server.model_name):
        raise BadRequest(f"The model '{body.get('model')}' does not exist; this server has '{server.model_name}'",
                         "model", "model_not_found", 404)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") or \
                not isinstance(message.get("content"), str):
            raise BadRequest("each message needs a role (system, user or assistant) and a string content", "messages")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", "messages")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    talk = [m for m in messages if m["role"] != "system"]
    history = [(q["content"], a["content"]) for q, a in zip(talk[:-1:2], talk[1:-1:2])
               if q["role"] == "user" and a["role"] == "assistant"]
    conversation = server.conversation
    prompt_ids = conversation.prompt_ids(talk[-1]["content"], history,
                                         system if chat.has_roles(conversation.family) else None)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or server.max_new_tokens
    if len(prompt_ids) + max_tokens > server.context_length:
        raise BadRequest(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) exceed the context "
                         f"length {server.context_length}", "messages", "context_length_exceeded")
    top_p, temperature = chat.SAMPLING_DEFAULTS[conversation.family.name]
    temperature = body.get("temperature", temperature)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest("temperature must be a number >= 0", "temperature")
    return prompt_ids, dict(max_tokens=int(max_tokens), temperature=float(temperature),
                            top_p=float(body.get("top_p", top_p)), top_k=int(body.get("top_k", 0) or 0))


class Server:
    def __init__(self, model, tokenizer, family, args, saved, model_name):
        self.model_name, self.max_new_tokens = model_name, args.max_new_tokens
        self.conversation = chat.Conversation(tokenizer, family, args, saved)
        self.context_length = getattr(model.config, "seq_length", None) or \
            getattr(model.config, "max_sequence_length", None) or getattr(model.config, "max_position_embeddings", 2048)
        self.stop_ids = family.stop_token_ids(tokenizer)
        self.engine = Engine(model, tokenizer, args.max_batch, slot_tokens=min(args.slot_tokens, self.context_length))
        self.tokenizer, self.family = tokenizer, family

    def text_of(self, ids):
        return self.family.answer_text(self.tokenizer.decode(ids, skip_special_tokens=True))


def create_app(server):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import StreamingResponse
    app = FastAPI(title="chatglm-finetuning")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.model_name, "active_requests": server.engine.active()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatglm-finetuning"}]}

    @app.post("/v1/chat/completions")
    async def completions(http_request: HTTPRequest):
        try:
            body = json.loads(await http_request.body())
        except ValueError as err:
            return error(400, f"the body is not valid JSON: {err}")
        try:
            prompt_ids, settings = parse_request(body, server)
        except BadRequest as err:
            return error(err.status, str(err), param=err.param, code=err.code)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        request = chat_request(server, prompt_ids, settings, loop, events)
        server.engine.submit(request)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(stream_events(server, request, events, completion_id, created),
                                     media_type="text/event-stream")
        try:
            reason = await collect(events)
        except asyncio.CancelledError:
            request.cancelled = True
            raise
        if reason.startswith("error"):
            return error(500, reason, kind="server_error")
        text = server.text_of(request.generated)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": server.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(request.generated),
                          "total_tokens": len(prompt_ids) + len(request.generated)}}
    return app


def chat_request(server, prompt_ids, settings, loop, events):
    def emit(token, reason):
        loop.call_soon_threadsafe(events.put_nowait, (token, reason))
    return Request(prompt_ids, settings["max_tokens"], settings["temperature"], settings["top_p"], settings["top_k"],
                   server.stop_ids, emit)


async def collect(events):
    while True:
        token, reason = await events.get()
        if token is None:
            return reason


async def stream_events(server, request, events, completion_id, created):
    """OpenAI's chunks as server-sent events: the role, the text as it grows, the finish reason, [DONE]. A client
    that hangs up cancels this generator: its request leaves the engine at the next step."""
    def chunk(delta, reason=None):
        return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                      "model": server.model_name, "choices": [{"index": 0, "delta": delta,
                                                                               "finish_reason": reason}]},
                                     ensure_ascii=False) + "\n\n"
    shown = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            token, reason = await events.get()
            while token is not None and not events.empty():  # decode once for all the tokens that are ready
                token, reason = events.get_nowait()
            if token is None:
                break
            # held back: a trailing U+FFFD, part of a character whose other bytes are still to come (GLM-4's BPE)
            text = server.text_of(request.generated).rstrip("\ufffd")
            if text.startswith(shown) and len(text) > len(shown):
                yield chunk({"content": text[len(shown):]})
                shown = text
        text = server.text_of(request.generated)
        if text != shown and text.startswith(shown):
            yield chunk({"content": text[len(shown):]})
        yield chunk({}, "stop" if reason.startswith("error") else reason)
        yield "data: [DONE]\n\n"
    finally:
        request.cancelled = True  # finished, or the client is gone


def build_parser():
    parser = chat.build_parser()
    parser.description = __doc__
    for action in list(parser._actions):
        if action.dest in ("input", "output", "greedy", "seed"):
            parser._remove_action(action)
            for option in action.option_strings:
                parser._option_string_actions.pop(option, None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default=None, help="the id clients send (default: the folder's name)")
    parser.add_argument("--max_batch", type=int, default=64,
                        help="most requests generated at once (the continuous batch's rows; fewer on a GPU where "
                             "their cache would take over half the free memory)")
    parser.add_argument("--slot_tokens", type=int, default=2048,
                        help="prompt + answer tokens one row of the continuous batch holds; a longer request runs "
                             "on transformers' cache beside it")
    return parser


def main(argv=None):
    import uvicorn
    args = build_parser().parse_args(argv)
    args.input = args.output = None
    args.greedy, args.seed = False, None
    model, tokenizer, family, saved = chat.load_for_chat(args)
    if args.format is None:
        args.format = "task" if saved else "chat"
    server = Server(model, tokenizer, family, args, saved,
                    args.model_name or os.path.basename(os.path.normpath(args.model_dir)))
    print(f"serving {server.model_name} ({family.name}, {args.format} format) on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
