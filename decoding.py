"""Greedy decoding against a preallocated KV cache, the decode step replayed as one CUDA graph on a GPU.

`transformers.generate` grows its cache by concatenation and rebuilds masks and positions on the host at every
step; at batch 50 on a 6B model that host work, not the GPU, sets the pace (45 ms per step where reading the
weights takes 4 ms). Here the prompt is run once through the model's forward (the cache is filled in place), then
every decode step has the same shapes: the new token of each row, its positions (the model's
`decode_position_ids`), and a mask over the whole cache capacity that uncovers one more key per step. Such a step
can be captured once and replayed (`torch.cuda.CUDAGraph`), so a step costs one launch on the host.

The tokens equal greedy `generate()`'s: every row is computed independently of the others, a row that has
finished keeps decoding (its extra tokens are cut at its first stop token), and the host looks at the stop
tokens only every `check_every` steps.

Works for any model of the suite that has `decode_step` and `decode_position_ids` (both model files), including
P-Tuning prefixes (they are written into the cache by the prompt's forward) and LoRA, merged or not.
"""
import torch

from data_set import round_up


class StaticKVCache:
    """Keys and values per layer in buffers of fixed capacity [batch, kv_heads, capacity, head_dim].

    While `cursor` is None (the prompt's forward) `update` writes from slot 0 and returns what it was given, as a
    growing cache would; afterwards it writes the new token at the device tensor `cursor` and returns the first
    `visible` slots (a multiple of the bucket size, so that attention reads little more than what is written;
    the mask hides the slots not yet written).

    A prompt's forward may also cover some rows only, cut to their own longest prompt (`prompt_rows` = (row
    indices, slots cut off the left)): the `leading` prompt slots (prefix keys, soft tokens) go first, the tokens
    where the whole left-padded batch has them."""

    def __init__(self, capacity, batch=None, leading=0):
        self.capacity, self.batch, self.leading = capacity, batch, leading
        self.keys, self.values = {}, {}
        self.cursor = None
        self.prompt_rows = None
        self.visible = capacity

    def get_seq_length(self, layer_idx=0):
        return 0 if self.cursor is None else self.capacity  # the model asks only before the prompt's forward

    def update(self, key, value, layer_idx, cache_kwargs=None):
        if layer_idx not in self.keys:
            shape = (self.batch or key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.cursor is None:  # a prompt's forward: it attends to what it computed itself
            rows, cut = self.prompt_rows or (slice(None), 0)
            lead, end = self.leading, cut + key.shape[2]  # the tokens end where the batch's prompts end
            for buffer, new in ((keys, key), (values, value)):
                buffer[rows, :, :lead] = new[:, :, :lead]
                buffer[rows, :, lead + cut:end] = new[:, :, lead:]
            return key, value
        keys.index_copy_(2, self.cursor, key)
        values.index_copy_(2, self.cursor, value)
        return keys[:, :, :self.visible], values[:, :, :self.visible]


def leading_keys(model):
    """Cache slots before the prompt's tokens: P-Tuning v2 prefix keys or soft prompt tokens."""
    transformer = model.transformer
    return transformer.num_prefix_keys + transformer.num_virtual_tokens


class StaticDecoder:
    """The state of one batch's decoding: static input, cache, mask and output buffers, and the step on them."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens):
        batch, seq = input_ids.shape
        device = input_ids.device
        self.model, self.prompt_ids, self.attention_mask = model, input_ids, attention_mask
        leading = leading_keys(model)
        self.cache = StaticKVCache(leading + seq + max_new_tokens, batch, leading)
        self.key_valid = torch.ones(batch, self.cache.capacity, dtype=torch.bool, device=device)
        self.key_valid[:, leading:leading + seq] = attention_mask.bool()
        self.key_index = torch.arange(self.cache.capacity, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.generated = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.first_slot = leading + seq

    def prefill(self, group_rows=None):
        """The prompt's forward: fills the cache and the first generated token of each row.

        With `group_rows`, rows of similar prompt length go through together, each group cut to its own longest
        prompt: the batch is left-padded to its longest, and that padding costs as much compute as real tokens
        (the 50 spo test prompts: 221 tokens on average, 452 at most)."""
        batch, seq = self.prompt_ids.shape
        lengths = self.attention_mask.sum(dim=1).tolist()
        by_length = sorted(range(batch), key=lambda i: -lengths[i])
        group_rows = group_rows or batch
        for start in range(0, batch, group_rows):
            rows = by_length[start:start + group_rows]
            cut = seq - max(lengths[i] for i in rows)
            index = torch.tensor(rows, device=self.prompt_ids.device)
            self.cache.prompt_rows = (index, cut)
            logits = self.model(input_ids=self.prompt_ids[index, cut:], attention_mask=self.attention_mask[index, cut:],
                                past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            self.tokens[index] = logits.argmax(-1, keepdim=True)
        self.cache.prompt_rows = None
        self.generated[:, :1].copy_(self.tokens)
        self.cache.cursor = torch.full((1,), self.first_slot, dtype=torch.long, device=self.tokens.device)

    def step(self):
        """Feed the last token of each row, write the next one: shapes and memory never change (for a given
        number of visible cache slots)."""
        visible = self.cache.visible
        positions = self.model.decode_position_ids(self.prompt_ids, self.attention_mask, self.step_index)
        mask = (self.key_valid[:, :visible] & (self.key_index[:visible] <= self.cache.cursor))[:, None, None, :]
        logits = self.model.decode_step(self.tokens, positions, mask, self.cache)
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.step_index += 1
        self.cache.cursor += 1
        self.generated.index_copy_(1, self.step_index, self.tokens)


def finished(generated, done_steps, stop_ids):
    """True when every row holds a stop token among its first `done_steps` tokens (one host sync)."""
    stops = torch.tensor(stop_ids, device=generated.device)
    return bool(torch.isin(generated[:, :done_steps], stops).any(dim=1).all())


@torch.no_grad()
def greedy_decode(model, input_ids, attention_mask, max_new_tokens, stop_ids, cuda_graph=None, check_every=16,
                  bucket=64, prefill_rows=13):
    """New tokens [batch, <= max_new_tokens] of greedy decoding for a left-padded batch (not cut at the stop
    tokens; the caller does that). `cuda_graph` defaults to True on a GPU: one graph per `bucket` cache slots.
    The prompts go through `prefill_rows` at a time, by length (13: four groups for the 50 spo test rows)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    decoder = StaticDecoder(model, input_ids, attention_mask, max_new_tokens)
    decoder.prefill(prefill_rows)
    cuda_graph = input_ids.is_cuda if cuda_graph is None else cuda_graph
    graphs = CapturedSteps(decoder.step) if cuda_graph else None
    done = 1
    while done < max_new_tokens:
        if stop_ids and done % check_every == 0 and finished(decoder.generated, done, stop_ids):
            break
        # step done - 1 writes slot first_slot + done - 1; attention sees the slots up to it, rounded up
        decoder.cache.visible = min(round_up(decoder.first_slot + done, bucket), decoder.cache.capacity)
        graphs.run(decoder.cache.visible) if graphs else decoder.step()
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
