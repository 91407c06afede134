"""serve.py's engine: one thread that admits requests and generates for all of them at once.

On the model files' static decoder all requests share the rows (slots) of one cache (decoding.SlotDecoder:
continuous batching): a request takes a free row as soon as one is free, every decode step advances every row
(one CUDA graph replay on a GPU), and a request that ends frees its row at once. A request longer than a row runs
in a cohort on transformers' cache (the long requests that start together). Slots and cohort rows count against one
budget, `max_batch`: never more requests generate at once than that; the others wait in the queue, which holds at
most `max_queue` (submit() refuses more: the server answers 429).

One request's failure is its own: each row samples on its own (a row whose logits cannot be sampled ends alone),
a request whose client left (`cancelled`) or whose `deadline` passed is ended before the next step, and only a
failure of the step itself (the model's forward) ends the requests that were in it. Every request ends with
exactly one `finish(reason, error)` call: reason "stop", "length", "cancelled", "timeout" or "error" (the error's
text is for the server's log, not for the client).
"""
import queue
import threading
import time

import torch

from decoding import text_logits


class QueueFull(Exception):
    """More requests are waiting than --max_queue allows."""


class Request:
    """One chat completion in the engine: what to generate, and how its outcome reaches the HTTP side.

    `on_token(token)` gets each new token and `on_finish(reason, error)` the end, both called on the engine thread."""

    def __init__(self, prompt_ids, max_tokens, temperature, top_p, top_k, stop_ids, on_token, on_finish,
                 deadline=None):
        self.prompt_ids, self.max_tokens = prompt_ids, max_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop_ids, self.on_token, self.on_finish = set(stop_ids), on_token, on_finish
        self.deadline = deadline  # time.monotonic() after which the request ends with "timeout"
        self.generated, self.cancelled, self.finished = [], False, False
        self.submitted = time.monotonic()
        self.first_token_at = None

    def finish(self, reason, error=None):
        if not self.finished:
            self.finished = True
            self.on_finish(reason, error)

    def ended_by_caller(self):
        """The reason this request must end now without another token (its client left, its time is up), or None."""
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "timeout"
        return None

    def take(self, token):
        """One new token; False once the request has ended (stop token or max_tokens)."""
        if self.finished:
            return False
        if token in self.stop_ids:
            self.finish("stop")
            return False
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token)
        self.on_token(token)
        if len(self.generated) >= self.max_tokens:
            self.finish("length")
            return False
        return True


# ---- sampling ---------------------------------------------------------------------------------------------------

# below this temperature sampling cannot be told from greedy decoding, and dividing by it overflows float32
GREEDY_BELOW_TEMPERATURE = 1e-5


def sample_row(logits, request):
    """The next token of one row: the most likely one at temperature 0 (or one too small to sample at), else
    top-k / top-p sampling at the row's temperature (checked at the door: within [0, 2], top_p (0, 1], top_k >= 0)."""
    if request.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    scores = logits.float() / request.temperature
    if request.top_k:
        kth = torch.topk(scores, min(request.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probabilities = torch.softmax(scores, -1)
    ordered, order = probabilities.sort(descending=True)
    outside = ordered.cumsum(-1) - ordered > request.top_p  # keep the smallest set reaching top_p
    probabilities[order[outside]] = 0
    return int(torch.multinomial(probabilities / probabilities.sum(), 1)[0])


def deliver(requests, logits, greedy_tokens):
    """Hand each request its next token (sampled rows from `logits()`, greedy rows from `greedy_tokens`); a row
    that cannot be sampled (logits with NaN, say) ends alone. Returns per request whether it goes on."""
    sampled = [r.temperature >= GREEDY_BELOW_TEMPERATURE for r in requests]
    rows = logits() if any(sampled) else None
    going_on = []
    for i, request in enumerate(requests):
        reason = request.ended_by_caller()
        if reason:
            request.finish(reason)
            going_on.append(False)
            continue
        try:
            token = sample_row(rows[i], request) if sampled[i] else int(greedy_tokens[i])
        except RuntimeError as err:
            request.finish("error", f"sampling failed: {err}")
            going_on.append(False)
            continue
        going_on.append(request.take(token))
    return going_on


# ---- rows of the static cache (continuous batching) and cohorts on transformers' cache ----------------------------

class Slots:
    """The requests on the engine's SlotDecoder (decoding.py), one per row."""

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
        self.hand_out(rows, lambda: logits, logits.argmax(-1).tolist())

    def release_ended(self):
        """Rows whose request's client left or whose time ran out: freed before the step (no token computed)."""
        ended = []
        for row, request in enumerate(self.requests):
            if request is not None and request.ended_by_caller():
                request.finish(request.ended_by_caller())
                self.requests[row] = None
                ended.append(row)
        if ended:
            self.decoder.release(ended)

    def step(self):
        self.release_ended()
        rows = [row for row, request in enumerate(self.requests) if request is not None]
        if not rows:
            return
        self.most_live = max(self.most_live, len(rows))
        self.decoder.run_step(max(self.filled[row] for row in rows) + 1)
        if self.decoder.tokens.is_cuda:  # wait with the GIL released: the HTTP side runs meanwhile
            torch.cuda.current_stream().synchronize()
        for row in rows:
            self.filled[row] += 1
        self.hand_out(rows, lambda: self.decoder.logits[rows], self.decoder.tokens[rows, 0].tolist())

    def hand_out(self, rows, logits, greedy_tokens):
        """Each row's next token to its request (the decoder fed greedy tokens already; sampled ones replace
        them); the rows of requests that ended are freed."""
        requests = [self.requests[row] for row in rows]
        going_on = deliver(requests, logits, greedy_tokens)
        chosen = [r.generated[-1] if on else 0 for r, on in zip(requests, going_on)]
        if any(r.temperature >= GREEDY_BELOW_TEMPERATURE for r in requests):
            self.decoder.tokens[rows] = torch.tensor(chosen, device=self.decoder.tokens.device)[:, None]
        ended = [row for row, on in zip(rows, going_on) if not on]
        for row in ended:
            self.requests[row] = None
        if ended:
            self.decoder.release(ended)

    def end_all(self, reason, error):
        rows = [row for row, request in enumerate(self.requests) if request is not None]
        for row in rows:
            self.requests[row].finish(reason, error)
            self.requests[row] = None
        if rows:
            self.decoder.release(rows)


class Cohort:
    """Long requests that start together: one left-padded prompt forward, then one step per token for all of them
    on transformers' cache (the model's generate() inputs)."""

    def __init__(self, model, requests, pad_id, text_ids):
        from transformers import DynamicCache

        from decoding import left_pad
        self.model, self.requests, self.text_ids = model, requests, text_ids
        device = next(model.parameters()).device
        ids, mask = left_pad([r.prompt_ids for r in requests], pad_id)
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.cache = DynamicCache()
        self.live = [True] * len(requests)

    def rows_in_use(self):
        return sum(self.live)

    def step(self):
        """One forward for the whole cohort; each live request gets its next token. Returns False when all ended."""
        inputs = self.model.prepare_inputs_for_generation(self.ids, past_key_values=self.cache,
                                                          attention_mask=self.mask, use_cache=True)
        logits = text_logits(self.model(**inputs).logits[:, -1], self.text_ids)
        live = [i for i, on in enumerate(self.live) if on]
        going_on = deliver([self.requests[i] for i in live], lambda: logits[live], logits[live].argmax(-1).tolist())
        tokens = torch.zeros(len(self.requests), dtype=torch.long)
        for i, on in zip(live, going_on):
            self.live[i] = on
            tokens[i] = self.requests[i].generated[-1] if on else 0
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids.device)], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.requests), 1)], dim=1)
        return any(self.live)

    def end_all(self, reason, error):
        for request, on in zip(self.requests, self.live):
            if on:
                request.finish(reason, error)
        self.live = [False] * len(self.requests)


# ---- the engine ---------------------------------------------------------------------------------------------------

class Engine:
    """The thread that admits waiting requests and steps them (see the module's docstring)."""

    def __init__(self, model, tokenizer, max_batch=16, max_queue=64, slot_tokens=2048, gather_s=0.005, log=print):
        from prediction import text_ids
        self.model, self.tokenizer, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        self.gather_s, self.log = gather_s, log
        self.text_ids = text_ids(tokenizer)  # ids that stand for no text are never chosen
        self.slots = Slots(self.slot_decoder(max_batch, slot_tokens))
        self.waiting, self.pending, self.cohorts = queue.Queue(), [], []
        self.queued = 0  # submitted and not yet generating (or ended while waiting)
        self.queue_lock = threading.Lock()
        self.cohorts_started = 0  # a statistic (bench/bench_serve.py reports it)
        threading.Thread(target=self.run, daemon=True, name="engine").start()

    def slot_decoder(self, max_batch, slot_tokens):
        """As many rows as --max_batch asks, fewer where their cache would take over half the free GPU memory."""
        from decoding import SlotDecoder, cache_bytes_per_token
        element = self.model.get_input_embeddings().weight.element_size()
        per_slot = slot_tokens * cache_bytes_per_token(self.model.config, element)
        slots = max_batch
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            slots = max(1, min(max_batch, int(0.5 * free // per_slot)))
        self.log(f"continuous batching: {slots} rows of {slot_tokens} tokens ({slots * per_slot / 2 ** 30:.2f} GiB "
                 f"of cache)")
        return SlotDecoder(self.model, slots, slot_tokens, self.text_ids)

    # -- what the HTTP side sees --

    def submit(self, request):
        with self.queue_lock:
            if self.queued >= self.max_queue:
                raise QueueFull(f"{self.queued} requests are waiting (--max_queue {self.max_queue})")
            self.queued += 1
        self.waiting.put(request)

    def running(self):
        """Requests generating now (rows in use: slots and cohort rows)."""
        return self.slots.live() + sum(c.rows_in_use() for c in list(self.cohorts))

    def queue_length(self):
        return self.queued

    # -- the loop --

    def take_waiting(self):
        """The waiting requests, oldest first, once the first has waited `gather_s` for others to join its prompt
        forward; the ones whose caller ended them meanwhile are finished here."""
        busy = bool(self.pending or self.cohorts or self.slots.live())
        try:
            while True:
                self.pending.append(self.waiting.get(block=not busy, timeout=None if busy else 0.5))
                busy = True
        except queue.Empty:
            pass
        kept = []
        for request in self.pending:
            reason = request.ended_by_caller()
            if reason:
                request.finish(reason)
                self.dequeued(1)
            else:
                kept.append(request)
        self.pending = kept
        if kept and time.monotonic() - kept[0].submitted < self.gather_s and not (self.cohorts or self.slots.live()):
            time.sleep(0.001)
            return []
        return kept

    def dequeued(self, count):
        with self.queue_lock:
            self.queued -= count

    def admit(self, pending):
        """Start what the budget allows, oldest first: a free row for a request that fits one, a cohort of its own
        for the long ones; the rest stay pending."""
        budget = self.max_batch - self.running()
        free_rows = len(self.slots.free_rows())
        to_slots, to_cohort, left = [], [], []
        for request in pending:
            if budget and self.slots.fits(request) and free_rows:
                to_slots.append(request)
                free_rows -= 1
                budget -= 1
            elif budget and not self.slots.fits(request):
                to_cohort.append(request)
                budget -= 1
            else:
                left.append(request)
        self.pending = left
        self.dequeued(len(to_slots) + len(to_cohort))
        if to_slots:
            self.start(lambda: self.slots.admit(to_slots), to_slots)
        if to_cohort:
            self.cohorts_started += 1
            self.start(lambda: self.cohorts.append(Cohort(self.model, to_cohort, self.tokenizer.pad_token_id,
                                                          self.text_ids)), to_cohort)

    def start(self, begin, requests):
        """A prompt forward; its failure (out of memory, say) ends just these requests."""
        try:
            begin()
        except Exception as err:  # noqa: BLE001 (any failure of a forward is this batch's alone)
            for request in requests:
                request.finish("error", f"prompt forward failed: {type(err).__name__}: {err}")
            for row, request in enumerate(self.slots.requests):
                if request in requests:
                    self.slots.requests[row] = None
                    self.slots.decoder.release([row])

    @torch.no_grad()
    def run(self):
        while True:
            pending = self.take_waiting()
            if pending:
                self.admit(pending)
            if self.slots.live():
                try:
                    self.slots.step()
                except Exception as err:  # noqa: BLE001 (the step itself failed: its rows end, the server goes on)
                    self.slots.end_all("error", f"decode step failed: {type(err).__name__}: {err}")
            for cohort in list(self.cohorts):
                try:
                    alive = cohort.step()
                except Exception as err:  # noqa: BLE001
                    cohort.end_all("error", f"cohort step failed: {type(err).__name__}: {err}")
                    alive = False
                if not alive:
                    self.cohorts.remove(cohort)
