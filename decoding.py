"""Greedy decoding against a preallocated KV cache, the decode step replayed as one CUDA graph on a GPU.

`transformers.generate` grows its cache by concatenation and rebuilds masks and positions on the host at every
step; at batch 50 on a 6B model that host work, not the GPU, sets the pace (45 ms per step where reading the
weights takes 4 ms). Here the prompt is run once through the model's forward (the cache is filled in place, each
row's keys without its padding), then every decode step has the same shapes: the new token of each row, its
positions (the model's `decode_position_ids`), and the cache, which does the step's attention over each row's own
keys (`StaticKVCache.attend`). Such a step can be captured once and replayed (`torch.cuda.CUDAGraph`), so a step
costs one launch on the host.

The tokens equal greedy `generate()`'s: every row is computed independently of the others, a row that has
finished keeps decoding (its extra tokens are cut at its first stop token), and the host looks at the stop
tokens only every `check_every` steps.

Works for any model of the suite that has `decode_step` and `decode_position_ids` (both model files), including
P-Tuning prefixes (they are written into the cache by the prompt's forward) and LoRA, merged or not.
"""
import torch

from data_set import round_up
from modeling_chatglm import flash_varlen_available as flash_decoding_available


class StaticKVCache:
    """Keys and values per layer in buffers of fixed capacity [batch, capacity, kv_heads, head_dim], each row's
    slots holding [leading | its own prompt tokens | its generated tokens] with no padding between them.

    A left-padded batch would make every row read as many cached keys as the longest prompt has (the 50 spo test
    prompts: 221 tokens on average, 452 at most), and a decode step's attention is bound by reading the cache. Here
    flash attention's variable-length kernel reads `next_slot + 1` keys per row (`seqused_k`); without it (a CPU,
    an older GPU, fp32) a masked attention reads the first `visible` slots (a multiple of the decoder's bucket).

    The prompt's forward goes through `update` (as a growing cache would: it attends to what it computed itself),
    for some rows at a time (`set_prompt_rows`), each row's padding dropped on the way in. The `leading` slots
    (P-Tuning v2 prefix keys, soft prompt tokens) come first. The decode steps go through `attend`; the decoder
    moves `next_slot` on after each step. The last slot takes the padding's writes and is never read."""

    def __init__(self, capacity, prompt_lengths, leading=0):
        self.capacity = capacity + 1  # + the slot for padding
        self.prompt_lengths, self.leading = prompt_lengths, leading
        self.batch = len(prompt_lengths)
        self.keys, self.values = {}, {}
        self.prompt_rows = self.prompt_slots = None
        self.next_slot = None  # [batch] slot each row writes next
        self.decoding = False  # the model's attention asks: prompt tokens (update) or a decode step (attend)?
        self.visible = self.capacity
        self.flash = False
        self.slot_index = torch.arange(self.capacity, device=prompt_lengths.device)
        rows = torch.arange(self.batch + 1, device=prompt_lengths.device, dtype=torch.int32)
        self.rows = rows[:-1].long()
        # flash attention's packed layout: row i's query is token i, its keys start at slot i * capacity
        self.query_starts, self.key_starts = rows, rows * self.capacity

    @property
    def attends_decode_step(self):  # the model files ask: past the prompt, attention is the cache's own
        return self.decoding

    def get_seq_length(self, layer_idx=0):
        return 0  # the model asks only before the prompt's forward

    def set_prompt_rows(self, rows, width):
        """The next forward is the prompts of `rows` (a device index), left-padded to `width` tokens: where each of
        its `leading + width` key positions goes in the row's slots (padding to the last slot)."""
        position = torch.arange(self.leading + width, device=rows.device)
        padding = width - self.prompt_lengths[rows, None]
        in_prompt = position >= self.leading + padding
        self.prompt_rows = rows
        self.prompt_slots = torch.where(position < self.leading, position,
                                        torch.where(in_prompt, position - padding, self.capacity - 1))

    def start_decoding(self):
        self.prompt_rows = self.prompt_slots = None
        self.next_slot = self.leading + self.prompt_lengths
        self.decoding = True

    def update(self, key, value, layer_idx, cache_kwargs=None):
        if layer_idx not in self.keys:
            shape = (self.batch, self.capacity, key.shape[1], key.shape[3])
            self.keys[layer_idx], self.values[layer_idx] = key.new_zeros(shape), value.new_zeros(shape)
            self.flash = flash_decoding_available(key, key.shape[-1])
        rows, slots = self.prompt_rows[:, None], self.prompt_slots
        self.keys[layer_idx][rows, slots] = key.transpose(1, 2)
        self.values[layer_idx][rows, slots] = value.transpose(1, 2)
        return key, value

    def attend(self, query, key, value, layer_idx):
        """One decode step of a layer: writes each row's new key and value, returns the attention output
        [batch, heads, 1, head_dim] over the row's keys so far (each key/value head serves consecutive query heads)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, self.next_slot] = key[:, :, 0]
        values[self.rows, self.next_slot] = value[:, :, 0]
        batch, heads, _, head_dim = query.shape
        if self.flash:
            output = torch.ops.aten._flash_attention_forward(
                query[:, :, 0], keys.view(-1, *keys.shape[2:]), values.view(-1, *values.shape[2:]),
                self.query_starts, self.key_starts, 1, self.capacity, 0.0, False, False,
                scale=head_dim ** -0.5, seqused_k=(self.next_slot + 1).int())[0]
            return output[:, :, None]
        seen = (self.slot_index[:self.visible] <= self.next_slot[:, None])[:, None, None, :]
        output = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, keys.shape[2], -1, head_dim), keys[:, :self.visible].transpose(1, 2),
            values[:, :self.visible].transpose(1, 2), attn_mask=seen, scale=head_dim ** -0.5)
        return output.reshape(batch, heads, 1, head_dim)


def cache_bytes_per_token(config, dtype_bytes=2):
    """Cache bytes one token takes in every layer (keys and values), from the model's configuration: ChatGLM-6B
    caches every head, ChatGLM2/3 and GLM-4 (`multi_query_group_num`, transformers' `num_key_value_heads`) a few."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "multi_query_group_num", None) or heads
    head_dim = getattr(config, "kv_channels", None) or config.hidden_size // heads
    return 2 * config.num_layers * kv_heads * head_dim * dtype_bytes


def leading_keys(model):
    """Cache slots before the prompt's tokens: P-Tuning v2 prefix keys or soft prompt tokens."""
    return model.leading_cache_slots


def left_pad(prompts, pad_id):
    """Token lists as one left-padded batch: (input_ids, attention_mask), each [rows, longest]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


def text_logits(logits, text_ids):
    """logits [..., outputs] of the ids that stand for text only: those past the tokenizer's (a padded output layer:
    ChatGLM2/3 have 65,024 outputs for 64,798 tokens) cut off, those before its text (ChatGLM-6B's 20,000 image
    tokens, which decode to nothing) at -inf. `text_ids`: a range, or None for every output."""
    if text_ids is None:
        return logits
    logits = logits[..., :text_ids.stop]
    if text_ids.start:
        logits = logits.index_fill(-1, torch.arange(text_ids.start, device=logits.device), float("-inf"))
    return logits


class StaticDecoder:
    """The state of one batch's decoding: static input, cache and output buffers, and the step on them."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens, text_ids=None):
        batch, seq = input_ids.shape
        device = input_ids.device
        self.model, self.prompt_ids, self.attention_mask = model, input_ids, attention_mask
        self.text_ids = text_ids  # only ids that stand for text are chosen (text_logits)
        self.prompt_lengths = attention_mask.sum(dim=1)
        self.cache = StaticKVCache(leading_keys(model) + seq + max_new_tokens, self.prompt_lengths,
                                   leading_keys(model))
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.generated = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)

    def prefill(self, group_rows=None):
        """The prompt's forward: fills the cache and the first generated token of each row.

        With `group_rows`, rows of similar prompt length go through together, each group cut to its own longest
        prompt: the batch is left-padded to its longest, and that padding costs as much compute as real tokens
        (the 50 spo test prompts: 221 tokens on average, 452 at most)."""
        batch, seq = self.prompt_ids.shape
        lengths = self.prompt_lengths.tolist()
        by_length = sorted(range(batch), key=lambda i: -lengths[i])
        group_rows = group_rows or batch
        for start in range(0, batch, group_rows):
            rows = by_length[start:start + group_rows]
            width = max(lengths[i] for i in rows)
            index = torch.tensor(rows, device=self.prompt_ids.device)
            self.cache.set_prompt_rows(index, width)
            logits = self.model(input_ids=self.prompt_ids[index, seq - width:],
                                attention_mask=self.attention_mask[index, seq - width:],
                                past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            self.tokens[index] = text_logits(logits, self.text_ids).argmax(-1, keepdim=True)
        self.cache.start_decoding()
        self.generated[:, :1].copy_(self.tokens)

    def step(self):
        """Feed the last token of each row, write the next one: shapes and memory never change (for a given
        number of visible cache slots)."""
        positions = self.model.decode_position_ids(self.prompt_ids, self.attention_mask, self.step_index)
        logits = self.model.decode_step(self.tokens, positions, self.cache)
        self.tokens.copy_(text_logits(logits, self.text_ids).argmax(-1, keepdim=True))
        self.step_index += 1
        self.cache.next_slot += 1
        self.generated.index_copy_(1, self.step_index, self.tokens)


class SlotDecoder:
    """Continuous batching for serve.py: a fixed set of rows (slots) of one static cache that requests enter and
    leave between decode steps. Every step decodes all slots at once (an empty slot computes garbage nobody reads:
    a decode step is bound by reading the weights, so the batch is nearly free), with the same shapes each time, so
    on a GPU it is one CUDA graph replay per number of visible cache slots.

    `admit` runs the new prompts' forward into free slots (their keys without padding, as StaticDecoder.prefill)
    and returns their next-token logits; `step` feeds each slot's last token. Each row's positions are its own: the
    model's `decode_position_ids` at steps 0 and 1 give a start and an increment (both model files' positions grow
    linearly with the step). `logits` keeps the last step's logits [slots, vocab] for the rows that sample."""

    def __init__(self, model, slots, capacity, text_ids):
        device = next(model.parameters()).device
        self.model, self.slots, self.text_ids = model, slots, text_ids
        self.leading = leading_keys(model)
        self.cache = StaticKVCache(self.leading + capacity, torch.zeros(slots, dtype=torch.long, device=device),
                                   self.leading)
        self.cache.next_slot = torch.zeros(slots, dtype=torch.long, device=device)
        self.live = torch.zeros(slots, dtype=torch.long, device=device)  # an empty row stays on its slot 0: reads 1 key
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(slots, text_ids.stop, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        self.start_positions = self.position_increments = None  # shaped by the first admission
        self.graphs = CapturedSteps(self.step) if device.type == "cuda" else None

    @property
    def longest_row(self):
        """Cache slots a row may fill: its prompt, its answer and any leading keys."""
        return self.cache.capacity - 1 - self.leading

    @staticmethod
    def bytes_per_token(config, dtype_bytes=2):
        return cache_bytes_per_token(config, dtype_bytes)

    def admit(self, rows, prompts):
        """Run `prompts` (lists of ids) into the free slots `rows`; returns their next-token logits [n, vocab]."""
        device = self.tokens.device
        ids, mask = (t.to(device) for t in left_pad(prompts, 0))
        index = torch.tensor(rows, device=device)
        lengths = mask.sum(dim=1)
        cache = self.cache
        cache.prompt_lengths[index] = lengths
        cache.set_prompt_rows(index, ids.shape[1])
        cache.decoding = False
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
            logits = text_logits(logits, self.text_ids).float()
        finally:
            cache.decoding, cache.prompt_rows, cache.prompt_slots = True, None, None
        cache.next_slot[index] = self.leading + lengths
        start = self.model.decode_position_ids(ids, mask, torch.zeros(1, dtype=torch.long, device=device))
        increment = self.model.decode_position_ids(ids, mask, torch.ones(1, dtype=torch.long, device=device)) - start
        if self.start_positions is None:
            self.start_positions = start.new_zeros((self.slots, *start.shape[1:]))
            self.position_increments = start.new_zeros((self.slots, *start.shape[1:]))
        self.start_positions[index], self.position_increments[index] = start, increment
        self.steps[index] = 0
        self.live[index] = 1
        self.tokens[index] = logits.argmax(-1, keepdim=True)
        return logits

    def release(self, rows):
        """Rows whose request ended: they go on being computed, on one key, until a prompt takes them."""
        index = torch.tensor(rows, device=self.tokens.device)
        self.live[index] = 0
        self.cache.next_slot[index] = 0

    def step(self):
        """One decode step for every slot: shapes and memory never change (for a given number of visible slots)."""
        steps = self.steps.view(-1, *[1] * (self.start_positions.dim() - 1))
        positions = self.start_positions + self.position_increments * steps
        logits = text_logits(self.model.decode_step(self.tokens, positions, self.cache), self.text_ids)
        self.logits.copy_(logits)
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.steps += 1
        self.cache.next_slot.add_(self.live)

    def run_step(self, visible):
        """`step`, as a CUDA graph on a GPU; `visible`: cache slots attention reads without flash attention."""
        if not self.cache.flash:
            self.cache.visible = min(round_up(visible, 64), self.cache.capacity)
        self.graphs.run(self.cache.visible) if self.graphs else self.step()


def finished(generated, done_steps, stop_ids):
    """True when every row holds a stop token among its first `done_steps` tokens (one host sync)."""
    stops = torch.tensor(stop_ids, device=generated.device)
    return bool(torch.isin(generated[:, :done_steps], stops).any(dim=1).all())


@torch.no_grad()
def greedy_decode(model, input_ids, attention_mask, max_new_tokens, stop_ids, cuda_graph=None, check_every=16,
                  bucket=64, prefill_rows=13, text_ids=None):
    """New tokens [batch, <= max_new_tokens] of greedy decoding for a left-padded batch (not cut at the stop
    tokens; the caller does that). `cuda_graph` defaults to True on a GPU: one graph for every step with flash
    attention, else one per `bucket` cache slots.
    The prompts go through `prefill_rows` at a time, by length (13: four groups for the 50 spo test rows).
    `text_ids`: the ids that may be chosen (text_logits)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    decoder = StaticDecoder(model, input_ids, attention_mask, max_new_tokens, text_ids)
    decoder.prefill(prefill_rows)
    cuda_graph = input_ids.is_cuda if cuda_graph is None else cuda_graph
    graphs = CapturedSteps(decoder.step) if cuda_graph else None
    cache = decoder.cache
    longest = cache.leading + int(decoder.prompt_lengths.max())  # slots the longest row holds before step one
    done = 1
    while done < max_new_tokens:
        if stop_ids and done % check_every == 0 and finished(decoder.generated, done, stop_ids):
            break
        # without flash attention, attention reads the slots the longest row has written, rounded up
        if not cache.flash:
            cache.visible = min(round_up(longest + done, bucket), cache.capacity)
        graphs.run(cache.visible) if graphs else decoder.step()
        done += 1
    return decoder.generated[:, :done]


class CapturedSteps:
    """The decode step as CUDA graphs, one per number of visible cache slots, captured when first needed.

    The first call warms up on a side stream (lazy initialisation, kernel selection) and so runs the step for
    real; later captures only record, then replay. The graphs share one memory pool: they never run at once."""

    def __init__(self, step):
        self.step, self.graphs, self.pool = step, {}, None

    def run(self, key):
        if key in self.graphs:
            self.graphs[key].replay()
            return
        if not self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.step()
            torch.cuda.current_stream().wait_stream(stream)
            ran = True
        else:
            ran = False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step()
        self.pool = graph.pool()
        self.graphs[key] = graph
        if not ran:
            graph.replay()
