"""ChatGLM-6B (the GLM architecture) for transformers 5: config-driven, SDPA attention, KV cache, prompt tuning.

Computes what THUDM's official ChatGLM-6B implementation computes and loads its checkpoints by the official
parameter names. What differs is how, not what:
- activations are laid out [batch, seq, hidden] (the official code used [seq, batch, hidden]);
- attention runs through `scaled_dot_product_attention` (`attn_implementation="eager"` keeps a plain softmax);
- rotary tables are computed in float32 from the positions, once per forward, for all layers;
- generation uses the standard `DynamicCache` and left padding is masked, so a batch decodes like single rows;
- the model never freezes parameters: the fine-tuning scripts decide what trains.

The GLM layout: `prompt tokens, [gMASK], <sop>, answer..., <eop>`. Everything before `<sop>` is the context,
which attends bidirectionally; from `<sop>` on attention is causal. Positions are two-dimensional: the first
counts through the context and then stays at the `[gMASK]` position, the second (the block position) is 0 in
the context and counts 1, 2, ... from `<sop>` on.

Prompt tuning (`pre_seq_len`): by default the prefix encoder produces keys and values for every layer
(P-Tuning v2, with `prefix_projection` through a two-layer MLP); with `prompt_embedding_only` it produces
`pre_seq_len` soft token embeddings put before the input (P-Tuning v1), which are part of the context.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from configuration_chatglm import ChatGLMConfig
from quantization import QuantizedLinear, quantize_model

ROPE_BASE = 10000.0
MASKED_SCORE = -10000.0  # the official code fills masked scores with this, not -inf
RESIDUAL_ALPHA = (2 * 28) ** 0.5
# cuDNN attention builds a new plan for every new sequence length, and here every batch and every decode step has
# one (hundreds of ms each on an H100); the flash / memory-efficient kernels take any length at no set-up cost.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ----------------------------------------------------------------------------------------------------------------
# Positions, masks and rotary embedding
# ----------------------------------------------------------------------------------------------------------------

def first_index(mask: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of a [batch, seq] bool tensor, `default` where a row has none."""
    return torch.where(mask.any(dim=1), mask.int().argmax(dim=1), default)


def glm_context_info(input_ids, attention_mask, config):
    """Per row: left-padding length, context length (index of <sop>) and [gMASK]/[MASK] index, in token indices.

    A row without <sop> is all context; a row without a mask token has its mask position at 0.
    """
    batch, seq = input_ids.shape
    seq_len = torch.full((batch,), seq, device=input_ids.device)
    if attention_mask is None:
        pad_len = torch.zeros_like(seq_len)
    else:
        pad_len = first_index(attention_mask[:, -seq:] != 0, seq_len)
    context_len = first_index(input_ids == config.bos_token_id, seq_len)
    mask_pos = first_index(input_ids == config.gmask_token_id,
                           first_index(input_ids == config.mask_token_id, torch.zeros_like(seq_len)))
    return pad_len, context_len, mask_pos


def glm_position_ids(input_ids, attention_mask, config, offset=0):
    """2D GLM positions [batch, 2, seq] for rows that may be left-padded.

    Positions are counted from each row's first real token, so a padded row gets the positions it would get alone.
    `offset` shifts the first dimension (used for soft prompt tokens put before the input).
    """
    pad_len, context_len, mask_pos = glm_context_info(input_ids, attention_mask, config)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    rel = (idx - pad_len[:, None]).clamp(min=0)
    rel_context = (context_len - pad_len).clamp(min=0)[:, None]
    in_context = rel < rel_context
    position = torch.where(in_context, rel, (mask_pos - pad_len)[:, None].clamp(min=0)) + offset
    block = torch.where(in_context, torch.zeros_like(rel), rel - rel_context + 1)
    return torch.stack([position, block], dim=1)


def glm_attention_mask(key_valid, context_len, past_len, num_queries):
    """Bool mask [batch, 1, queries, keys], True = may attend.

    Key j is visible to query i when the key is not padding and j <= i or j lies in the (bidirectional) context.
    `past_len` is how many keys precede the queries; `context_len` is in key indices.
    """
    device = key_valid.device
    q_idx = torch.arange(num_queries, device=device)[:, None] + past_len
    k_idx = torch.arange(key_valid.shape[1], device=device)[None, :]
    visible = (k_idx <= q_idx)[None] | (k_idx[None] < context_len[:, None, None])
    return (visible & key_valid[:, None, :])[:, None]


def soft_prompt_length(config):
    """Soft prompt tokens put before the input (embedding-only prompt tuning), else 0."""
    return config.pre_seq_len if (config.pre_seq_len and config.prompt_embedding_only) else 0


def packed_row_inputs(input_ids, config):
    """(soft prompt slots, position_ids [2, slots + n], bidirectional length) of one unpadded row, as the model
    computes them for it alone: what data_set.PackRows records for the row's stretch of a packed sequence. The
    soft prompt tokens (embedding-only prompt tuning) come first and belong to the context, which attends both
    ways (the tokens before <sop>); from <sop> on attention is causal."""
    soft = soft_prompt_length(config)
    row = input_ids[None]
    _, context_len, _ = glm_context_info(row, None, config)
    slots = torch.arange(soft)
    positions = torch.cat([torch.stack([slots, torch.zeros_like(slots)]),
                           glm_position_ids(row, None, config, offset=soft)[0]], dim=1)
    return soft, positions, soft + int(context_len[0])


# ----------------------------------------------------------------------------------------------------------------
# Packed rows: a batch's rows one after another in one sequence (data_set.PackRows), each attending to itself only
# ----------------------------------------------------------------------------------------------------------------

def flash_varlen_available(tensor, head_dim):
    """Flash attention's variable-length kernel runs on `tensor`'s device and dtype (Ampere or newer, half
    precision) for this head size."""
    return (tensor.is_cuda and tensor.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(tensor.device)[0] >= 8 and head_dim % 8 == 0 and head_dim <= 256)


def packed_row_layout(rows, width):
    """Per token of a packed sequence: its row, its position in that row, and whether it is in the row's
    bidirectional part. `rows` [n, 2] holds each row's (length, bidirectional length); the lengths add up to
    `width` (data_set.PackRows gives the padding at the end to the last row, after its tokens)."""
    lengths, bidirectional = rows[:, 0], rows[:, 1]
    row_of = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lengths, output_size=width)
    position = torch.arange(width, device=rows.device) - (lengths.cumsum(0) - lengths)[row_of]
    return row_of, position, position < bidirectional[row_of]


def packed_rows_mask(rows, width, prefix_keys):
    """The bool mask [1, 1, width, prefix_keys + width] of packed rows: each token sees the prefix keys and its own
    row's keys, the bidirectional part both ways and the rest causally (what each row's own mask would be)."""
    row_of, position, in_both_ways = packed_row_layout(rows, width)
    own_row = row_of[:, None] == row_of[None, :]
    visible = own_row & ((position[None, :] <= position[:, None]) | in_both_ways[None, :])
    return torch.cat([visible.new_ones(width, prefix_keys), visible], dim=1)[None, None]


def cumulative_lengths(lengths):
    """[0, l0, l0 + l1, ...] as int32: flash attention's `cu_seqlens`."""
    return F.pad(lengths.cumsum(0), (1, 0)).int()


def with_prefix_slots(token_slot, prefix_start, prefix_keys, spare=0):
    """Gather index into [prefix keys | tokens] that puts token i at `token_slot[i]`, the prefix keys at
    `prefix_start[r] ...` for each row r, and key 0 at the `spare` slots left over at the end."""
    count, width = prefix_start.shape[0], token_slot.shape[0]
    prefix = torch.arange(prefix_keys, device=token_slot.device)
    index = torch.zeros(width + count * prefix_keys + spare, dtype=torch.long, device=token_slot.device)
    index[token_slot] = torch.arange(width, device=token_slot.device) + prefix_keys
    index[(prefix_start[:, None] + prefix).reshape(-1)] = prefix.repeat(count)
    return index


class PackedRows:
    """Attention over packed rows through flash attention's variable-length kernel, which computes only each
    row's own blocks (a mask over the whole sequence makes every block computed; see packed_rows_mask).

    Causal rows (`bidirectional=False`) take one causal call, each row's keys being [prefix keys | its tokens].
    ChatGLM-6B's rows begin with a bidirectional part, so there the tokens are regathered as [every row's causal
    part | every row's bidirectional part] and attend in two calls:
    - causal: each causal part to [prefix keys | its whole row]; the bidirectional parts together form one more
      sequence with a single spare key, whose output (zero where no key is visible) is not used;
    - both ways: each bidirectional part to [prefix keys | itself]; each causal part to itself (not used).
    Every query and key row belongs to a sequence in both calls (the kernel leaves the others unwritten, in the
    backward too), and every index is built here once per forward, on the device, at sizes fixed by the width
    and row count: nothing waits for the host, and a step with packed rows can be captured as a CUDA graph."""

    def __init__(self, rows, width, prefix_keys, bidirectional, recompute=False):
        self.recompute = recompute
        lengths = rows[:, 0]
        both_ways = rows[:, 1] if bidirectional else torch.zeros_like(lengths)
        row_of, _, in_both_ways = packed_row_layout(torch.stack([lengths, both_ways], 1), width)
        count, device = rows.shape[0], rows.device
        each_row, tokens = torch.arange(count, device=device), torch.arange(width, device=device)
        causal = lengths - both_ways
        self.bidirectional = bidirectional
        row_key_starts = lengths.cumsum(0) - lengths + prefix_keys * each_row
        self.causal_keys = with_prefix_slots(tokens + prefix_keys * (row_of + 1), row_key_starts, prefix_keys,
                                             spare=int(bidirectional)) if prefix_keys or bidirectional else None
        if not bidirectional:
            self.causal_query_starts = cumulative_lengths(lengths)
            self.causal_key_starts = cumulative_lengths(lengths + prefix_keys)
            return
        one = torch.ones(1, dtype=lengths.dtype, device=device)
        causal_total = causal.sum()
        self.regathered_at = torch.where(in_both_ways, causal_total + in_both_ways.cumsum(0) - 1,
                                         (~in_both_ways).cumsum(0) - 1)
        self.regather = torch.empty_like(tokens).scatter_(0, self.regathered_at, tokens)
        self.from_both_ways = tokens >= causal_total  # in the regathered order
        self.causal_query_starts = cumulative_lengths(torch.cat([causal, both_ways.sum()[None]]))
        self.causal_key_starts = cumulative_lengths(torch.cat([lengths + prefix_keys, one]))
        self.both_ways_query_starts = cumulative_lengths(torch.cat([causal, both_ways]))
        self.both_ways_key_starts = cumulative_lengths(torch.cat([causal, both_ways + prefix_keys]))
        slot = self.regathered_at + prefix_keys * torch.where(in_both_ways, row_of + 1, 0)
        prefix_starts = causal_total + both_ways.cumsum(0) - both_ways + prefix_keys * each_row
        self.both_ways_keys = with_prefix_slots(slot, prefix_starts, prefix_keys) if prefix_keys else self.regather

    def attend(self, query, key, value):
        """query [1, heads, width, head_dim], key/value [1, kv_heads, prefix_keys + width, head_dim] -> like query.

        With `recompute` the backward keeps only the query, key and value and runs the gathers and the kernels'
        forward again, instead of keeping the gathered copies and each call's output (ChatGLM-6B's two calls: more
        than twice the query, key and value). The value is copied out of the fused projection's output, which it
        would otherwise keep alive whole."""
        if self.recompute and torch.is_grad_enabled():
            # no dropout in the kernels: no RNG state to keep (reading it is refused while a CUDA graph is captured)
            return checkpoint(self.attend_once, query, key, value.contiguous(), use_reentrant=False,
                              preserve_rng_state=False)
        return self.attend_once(query, key, value)

    def attend_once(self, query, key, value):
        query, key, value = (t[0].transpose(0, 1) for t in (query, key, value))  # flash's layout: [tokens, heads, dim]
        width = query.shape[0]
        if self.bidirectional:
            query = query[self.regather]
        causal_key, causal_value = (key, value) if self.causal_keys is None else \
            (key[self.causal_keys], value[self.causal_keys])
        output = flash_varlen(query, causal_key, causal_value, self.causal_query_starts, self.causal_key_starts,
                              width, causal_key.shape[0], causal=True)
        if self.bidirectional:
            both_key, both_value = key[self.both_ways_keys], value[self.both_ways_keys]
            both_ways = flash_varlen(query, both_key, both_value, self.both_ways_query_starts,
                                     self.both_ways_key_starts, width, both_key.shape[0], causal=False)
            output = torch.where(self.from_both_ways[:, None, None], both_ways, output)[self.regathered_at]
        return output.transpose(0, 1)[None]


def with_soft_prompt_per_row(hidden, rows, soft_prompt):
    """hidden [1, width, h] of packed rows with each row's first slots (data_set.PackRows left them for it)
    holding the soft prompt [slots, h]."""
    starts = rows[:, 0].cumsum(0) - rows[:, 0]
    slots = (starts[:, None] + torch.arange(soft_prompt.shape[0], device=rows.device)).reshape(-1)
    return hidden.index_copy(1, slots, soft_prompt.repeat(rows.shape[0], 1)[None])


def packed_rows_attention(rows, hidden, prefix_keys, bidirectional, config, cached, recompute=False):
    """What the layers attend with for rows packed into one sequence (`rows` [n, 2], see data_set.PackRows):
    flash attention over each row's own blocks where it runs (`recompute`: see PackedRows.attend), else the
    block-diagonal mask."""
    if cached:
        raise ValueError("packed rows are for training: they take no cache")
    width, head_dim = hidden.shape[1], getattr(config, "kv_channels", config.hidden_size // config.num_attention_heads)
    if config._attn_implementation != "eager" and flash_varlen_available(hidden, head_dim):
        return PackedRows(rows, width, prefix_keys, bidirectional, recompute)
    return packed_rows_mask(rows, width, prefix_keys)


def flash_varlen(query, key, value, query_starts, key_starts, max_queries, max_keys, causal):
    """Flash attention over sequences laid one after another ([tokens, heads, head_dim]; `*_starts` = cu_seqlens).
    The maxima may be upper bounds (the kernel reads each sequence's own length): the width, fixed per shape.
    A causal query i of a sequence with more keys than queries sees keys up to i + (keys - queries)."""
    return torch.ops.aten._flash_attention_forward(
        query, key, value, query_starts, key_starts, max_queries, max_keys, 0.0, causal, False,
        scale=query.shape[-1] ** -0.5)[0]


def glm_rotary_cos_sin(position_ids, head_dim, dtype):
    """cos and sin [batch, 1, seq, head_dim] for 2D rotary: the first half of each head rotates with the position,
    the second half with the block position. Frequencies are rounded to float16 as in the official checkpoint."""
    rot_dim = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, rot_dim, 2, device=position_ids.device).float() / rot_dim))
    inv_freq = inv_freq.half().float()
    angles = position_ids.float()[..., None] * inv_freq  # [b, 2, s, rot_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)[:, None]  # [b, 1, s, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def labelled_token_loss(head, hidden, labels, label_positions=None):
    """Mean cross-entropy of every labelled next token; only those positions go through the LM head.

    Selecting them with a boolean mask makes the host wait for the GPU to count them. `label_positions` (from
    `data_set.labelled_positions`: flat indices into [batch, seq - 1], padded with -1) is that selection made on
    the CPU beforehand, at a size fixed per batch shape, so the step can be captured as a CUDA graph."""
    shift_labels = labels[:, 1:]
    if label_positions is None:
        keep = shift_labels != -100
        return head_cross_entropy(head, hidden[:, :-1][keep], shift_labels[keep])
    index = label_positions.clamp(min=0)
    rows, cols = index // shift_labels.shape[1], index % shift_labels.shape[1]
    targets = torch.where(label_positions >= 0, shift_labels[rows, cols], -100)
    return head_cross_entropy(head, hidden[rows, cols], targets)


# Rows of logits made at once by the sliced loss: 2^24 float32 logits (64 MiB; 128 rows of ChatGLM-6B's vocabulary).
# 0: no slicing (autograd's cross-entropy over all rows at once; for comparisons).
LOSS_SLICE_LOGITS = 2 ** 24


def head_cross_entropy(head, hidden, targets):
    """Mean cross-entropy of head(hidden) [rows, vocab] against `targets` (-100: not counted).

    A frozen output layer in bf16 or float32 goes through `SlicedHeadLoss`: the same loss and gradient without the
    [rows, vocab] float32 logits (at 768 labels of ChatGLM-6B, 0.4 GB per copy, three copies alive around the
    backward). fp16 keeps the plain path: its gradient is only safe from underflow once the loss scale is in it;
    so do a trained head (full fine-tuning) and a head whose weight DeepSpeed ZeRO-3 has partitioned."""
    plain_linear = type(head) is nn.Linear and head.bias is None and not head._forward_hooks \
        and not head._forward_pre_hooks
    if LOSS_SLICE_LOGITS and plain_linear and not head.weight.requires_grad and not hasattr(head.weight, "ds_id") \
            and hidden.dtype in (torch.bfloat16, torch.float32):
        return SlicedHeadLoss.apply(hidden, head.weight, targets, max(1, LOSS_SLICE_LOGITS // head.weight.shape[0]))
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=-100)


class SlicedHeadLoss(torch.autograd.Function):
    """F.cross_entropy(hidden @ weight^T, targets) for a frozen weight, a slice of rows at a time: each slice's
    gradient for `hidden` is made as soon as its logits are (the softmax minus the target, over the count, then
    through the weight in hidden's dtype, as autograd would), so no slice's logits outlive it. The backward only
    scales that gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows_per_slice):
        counted = targets != -100
        count = counted.sum()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows_per_slice):
            part = slice(start, start + rows_per_slice)
            logits = (hidden[part] @ weight.t()).float()
            target, keep = targets[part].clamp(min=0)[:, None], counted[part]
            log_total = torch.logsumexp(logits, dim=-1)
            total = total + torch.where(keep, log_total - logits.gather(1, target)[:, 0], 0.0).sum()
            if grad is not None:
                probs = logits.sub_(log_total[:, None]).exp_()
                probs.scatter_add_(1, target, -keep[:, None].to(probs.dtype))
                probs.mul_(torch.where(keep, 1.0 / count, 0.0)[:, None])
                grad[part] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_of_loss):
        grad, = ctx.saved_tensors
        return (grad.float() * grad_of_loss).to(grad.dtype), None, None, None


def rotate_halves(x):
    """rotate_half applied separately to each half of the head (the two rotary dimensions)."""
    x1, x2, x3, x4 = x.chunk(4, dim=-1)
    return torch.cat([-x2, x1, -x4, x3], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

def keep_torch_default_init(module):
    """Mark the linear and embedding layers of `module` to keep PyTorch's default initialisation, as the official
    prefix encoders did (embedding N(0, 1)); `_init_weights` honours the mark."""
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Embedding)):
            child.keeps_torch_default_init = True


class NonReentrantCheckpointing:
    """Mixin for a PreTrainedModel: gradient checkpointing that keeps gradients flowing when the embeddings are
    frozen (LoRA, prefix tuning), which the reentrant variant does not. Without dropout in the blocks the
    recomputation needs no saved RNG state; not saving it lets the step be captured as a CUDA graph (reading the
    generator's state is refused during a capture)."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        dropout = any(getattr(self.config, name, 0) or 0 for name in ("hidden_dropout", "attention_dropout"))
        kwargs = {"use_reentrant": False, "preserve_rng_state": bool(dropout), **(gradient_checkpointing_kwargs or {})}
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def recompute_mlp_enable(self, attention=False):
        """Checkpoint only each block's widening matmul and activation (see RecomputedInner). ChatGLM-6B: a third
        of a block's forward matmuls recomputed, for ~40% of what a frozen block keeps for the backward. With
        `attention`, packed rows' attention kernels too (PackedRows.attend)."""
        found = [m for m in self.modules() if isinstance(m, RecomputedInner)]
        if not found:
            raise ValueError(f"--gradient_checkpointing mlp: {type(self).__name__} has no MLP that can recompute")
        for module in found:
            module.recompute_inner = True
        for module in self.modules():
            if isinstance(module, PromptSlots):
                module.recompute_packed_attention = attention


class PrefixEncoder(nn.Module):
    """Trainable prompt: per-layer keys/values (P-Tuning v2) or soft input embeddings (embedding only)."""

    def __init__(self, config):
        super().__init__()
        if config.prompt_embedding_only:
            out_dim = config.hidden_size
        else:
            out_dim = config.num_layers * config.hidden_size * 2
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, out_dim),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, out_dim)
        keep_torch_default_init(self)

    def forward(self):
        prefix = self.embedding.weight  # the official code looks up arange(pre_seq_len): the whole table
        return self.trans(prefix) if self.prefix_projection else prefix


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, cos, sin, attention_mask, past_key_values=None, prefix_kv=None):
        batch, seq, _ = hidden_states.shape
        # the fused projection is laid out per head: [q_h, k_h, v_h] for each head h
        qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        query = query * cos + rotate_halves(query) * sin
        key = key * cos + rotate_halves(key) * sin
        if prefix_kv is not None:  # prefix keys/values carry no rotary position
            key = torch.cat([prefix_kv[0], key], dim=2)
            value = torch.cat([prefix_kv[1], value], dim=2)
        if getattr(past_key_values, "attends_decode_step", False):  # decoding.StaticKVCache, past the prompt
            context = past_key_values.attend(query, key, value, self.layer_idx)
        elif isinstance(attention_mask, PackedRows):
            context = attention_mask.attend(query, key, value)
        else:
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            context = self.attend(query, key, value, attention_mask)
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))

    def attend(self, query, key, value, attention_mask):
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.config._attn_implementation != "eager":
            with sdpa_kernel(SDPA_BACKENDS):
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, MASKED_SCORE)
        probs = F.softmax(scores.float(), dim=-1).to(value.dtype)
        return torch.matmul(probs, value)


class RecomputedInner:
    """Mixin for a block's MLP: with `recompute_inner` set, the widening matmul and its activation are recomputed in
    the backward instead of keeping the wide pre-activation (ChatGLM-6B: 4x the hidden size per token; ChatGLM2/3's
    gate and up: 6.7x), the largest tensor a block whose base is frozen saves: `--gradient_checkpointing mlp`.
    `narrowing_linear` names the linear that takes the inner activation back to the hidden size."""
    recompute_inner = False
    narrowing_linear = "dense_4h_to_h"

    def forward(self, x):
        if self.recompute_inner and torch.is_grad_enabled():
            # no dropout inside: no RNG state to keep (reading it is refused while a CUDA graph is captured)
            inner = checkpoint(self.inner, x, use_reentrant=False, preserve_rng_state=False)
        else:
            inner = self.inner(x)
        return getattr(self, self.narrowing_linear)(inner)


class GLU(RecomputedInner, nn.Module):
    """The feed-forward block (the official name; it is a plain GELU MLP)."""

    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def inner(self, x):
        return F.gelu(self.dense_h_to_4h(x), approximate="tanh")


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        # GLM's residual: the normalised input, scaled by alpha, plus the sublayer's output. The official blocks
        # never receive the model's depth and use their default of 28 layers, so alpha is sqrt(56) at every depth.
        self.alpha = RESIDUAL_ALPHA

    def forward(self, hidden_states, cos, sin, attention_mask, past_key_values=None, prefix_kv=None):
        attention_input = self.input_layernorm(hidden_states)
        attention_output = self.attention(attention_input, cos, sin, attention_mask, past_key_values, prefix_kv)
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

class ChatGLMPreTrainedModel(NonReentrantCheckpointing, PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    # the official checkpoints carry float16 rotary frequencies; they are recomputed, so the stored copies are unused
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, QuantizedLinear):  # its int weights come from quantizing or from a quantized folder
            return
        std = 0.02
        if getattr(module, "keeps_torch_default_init", False):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class PromptSlots:
    """Mixin for the base models of both model files: where the trained prompt sits in the cache."""
    recompute_packed_attention = False  # --gradient_checkpointing mlp+attention (PackedRows.attend)

    @property
    def num_virtual_tokens(self):
        """Soft prompt tokens put before the input (embedding-only prompt tuning), else 0."""
        return soft_prompt_length(self.config)

    @property
    def num_prefix_keys(self):
        """Per-layer prefix keys (P-Tuning v2), else 0."""
        return self.config.pre_seq_len if (self.config.pre_seq_len and not self.config.prompt_embedding_only) else 0

    def cached_tokens(self, past_key_values):
        """How many input tokens the cache already holds (prefix keys and soft prompt tokens not counted)."""
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            return 0
        return past_key_values.get_seq_length() - self.num_prefix_keys - self.num_virtual_tokens


class ChatGLMModel(PromptSlots, ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def prefix_key_values(self, batch, dtype):
        """Per layer, (key, value) each [batch, heads, pre_seq_len, head_dim]."""
        cfg = self.config
        prefix = self.prefix_encoder().to(dtype)
        prefix = prefix.view(cfg.pre_seq_len, cfg.num_layers * 2, cfg.num_attention_heads, -1)
        prefix = self.prefix_dropout(prefix[None].expand(batch, -1, -1, -1, -1))
        prefix = prefix.permute(2, 0, 3, 1, 4)  # [layers * 2, batch, heads, pre_seq_len, head_dim]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(cfg.num_layers)]

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, packed_rows=None, **kwargs):
        if input_ids is None:
            raise ValueError("ChatGLM needs input_ids: its masks and positions are read from the [gMASK]/<sop> tokens")
        batch, seq = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = self.cached_tokens(past_key_values)
        first_call = past_key_values is None or past_key_values.get_seq_length() == 0
        virtual = self.num_virtual_tokens if first_call else 0

        hidden = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            if packed_rows is not None:
                raise ValueError("packed rows need their own position_ids (data_set.PackRows makes both)")
            if not first_call:
                raise ValueError("position_ids are needed when decoding from a cache (generate() passes them)")
            position_ids = glm_position_ids(input_ids, attention_mask, self.config, offset=self.num_virtual_tokens)
        if virtual:
            soft_prompt = self.prefix_dropout(self.prefix_encoder().to(hidden.dtype))
            if packed_rows is not None:  # each packed row has slots for its own soft prompt
                hidden, virtual = with_soft_prompt_per_row(hidden, packed_rows, soft_prompt), 0
        if virtual:
            hidden = torch.cat([soft_prompt[None].expand(batch, -1, -1), hidden], dim=1)
            soft = torch.arange(virtual, device=input_ids.device)
            soft_positions = torch.stack([soft, torch.zeros_like(soft)])[None].expand(batch, -1, -1)
            position_ids = torch.cat([soft_positions, position_ids], dim=2)

        if packed_rows is not None:
            mask = packed_rows_attention(packed_rows, hidden, self.num_prefix_keys, True, self.config, past,
                                         self.recompute_packed_attention)
        else:
            mask = self.build_attention_mask(input_ids, attention_mask, past, first_call, virtual)
        prefix_kv = None
        if first_call and self.num_prefix_keys:
            prefix_kv = self.prefix_key_values(batch, hidden.dtype)
        cos, sin = glm_rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                      hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, mask, past_key_values, None if prefix_kv is None else prefix_kv[i])
        hidden = self.final_layernorm(hidden[:, virtual:])
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)

    def build_attention_mask(self, input_ids, attention_mask, past, first_call, virtual):
        """Keys are [prefix keys | soft prompt tokens | cached tokens | new tokens]; returns the bool SDPA mask."""
        batch, seq = input_ids.shape
        device = input_ids.device
        token_keys = past + seq
        if attention_mask is None:
            key_valid = torch.ones(batch, token_keys, dtype=torch.bool, device=device)
        else:
            key_valid = attention_mask[:, -token_keys:].bool()
        leading = self.num_prefix_keys + self.num_virtual_tokens
        key_valid = torch.cat([key_valid.new_ones(batch, leading), key_valid], dim=1)
        if first_call:
            _, context_len, _ = glm_context_info(input_ids, attention_mask, self.config)
            context_len = context_len + leading
        else:
            context_len = torch.zeros(batch, dtype=torch.long, device=device)
        past_keys = leading - virtual + past if not first_call else self.num_prefix_keys
        return glm_attention_mask(key_valid, context_len, past_keys, seq + virtual)


class CausalLMForward:
    """The causal-LM forward of every model file of the suite (mixin of a PreTrainedModel whose `base_model` is the
    decoder stack): `loss_only=True` (training) projects only the positions that have a label, the same loss without
    full logits (`label_positions`: those positions chosen beforehand, see `labelled_token_loss`); `packed_rows`: the
    batch is rows packed into one sequence (data_set.PackRows); `logits_to_keep` for generation."""

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, loss_only=False, logits_to_keep=0,
                label_positions=None, packed_rows=None, **kwargs):
        out = self.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                              packed_rows=packed_rows)
        hidden, head = out.last_hidden_state, self.get_output_embeddings()
        if labels is not None and loss_only:
            loss = labelled_token_loss(head, hidden, labels, label_positions)
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values)
        if logits_to_keep and labels is None:  # generation needs only the last positions' logits
            hidden = hidden[:, -logits_to_keep:]
        logits = head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    @property
    def leading_cache_slots(self):
        """Cache slots before a prompt's tokens: P-Tuning v2 prefix keys or soft prompt tokens (decoding.py)."""
        return self.base_model.num_prefix_keys + self.base_model.num_virtual_tokens


class ChatGLMForConditionalGeneration(CausalLMForward, ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.quantization_bit:  # a pre-quantized folder: its int weights and scales load into these layers
            quantize_model(self, config.quantization_bit, empty=True)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # -- the fixed-shape decode step that decoding.py replays as a CUDA graph ------------------------------------

    def decode_position_ids(self, prompt_ids, attention_mask, step):
        """Positions [batch, 2, 1] of the token fed at decode step `step` (a device tensor; 0 is the first
        generated token): the [gMASK] position, and block position 2 + step (<sop> had 1)."""
        pad_len, _, mask_pos = glm_context_info(prompt_ids, attention_mask, self.config)
        position = (mask_pos - pad_len).clamp(min=0) + self.transformer.num_virtual_tokens
        return torch.stack([position, (2 + step).expand_as(position)], dim=1)[:, :, None]

    def decode_step(self, input_ids, position_ids, cache):
        """Logits [batch, vocab] of one new token per row, against decoding.StaticKVCache (which attends, over
        each row's own keys). No host synchronisation, no shape that varies."""
        t = self.transformer
        hidden = t.word_embeddings(input_ids)
        cos, sin = glm_rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                      hidden.dtype)
        for layer in t.layers:
            hidden = layer(hidden, cos, sin, None, cache)
        return self.lm_head(t.final_layernorm(hidden))[:, -1]

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """Positions come from the whole sequence so far; only the tokens not yet in the cache are fed."""
        position_ids = glm_position_ids(input_ids, attention_mask, self.config,
                                        offset=self.transformer.num_virtual_tokens)
        done = self.transformer.cached_tokens(past_key_values)
        return {
            "input_ids": input_ids[:, done:],
            "position_ids": position_ids[..., done:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache", True),
        }
