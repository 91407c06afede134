"""ChatGLM2-6B / ChatGLM3-6B for transformers 5: the same function as the official implementation, our own code.

Pre-norm decoder with RMSNorm (computed in float32), SwiGLU feed-forward, multi-query attention with
`multi_query_group_num` key/value groups, a fused qkv projection with bias, and rotary embedding on the first half
of each head in interleaved pairs. Positions are plain token positions, counted per row from its first real token
(so left-padded batches decode like single rows). Loads the official checkpoints by their parameter names
(`transformer.embedding.word_embeddings`, `transformer.encoder.layers.N.self_attention.query_key_value`,
`transformer.output_layer`, `transformer.prefix_encoder.*`, ...). P-Tuning v2 prefixes (`pre_seq_len`,
`prefix_projection`) give per-layer keys/values for each group, as the official prefix encoder does; with
`prompt_embedding_only` (ours; the official code has no such mode) the prompt is soft input embeddings put before
the row, at positions 0 .. pre_seq_len - 1.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from configuration_chatglm2 import ChatGLMConfig
from quantization import QuantizedLinear, quantize_model
from modeling_chatglm import (MASKED_SCORE, SDPA_BACKENDS, CausalLMForward, NonReentrantCheckpointing, PackedRows,
                              PromptSlots, RecomputedInner, first_index, keep_torch_default_init,
                              packed_rows_attention, soft_prompt_length, with_soft_prompt_per_row)

ROPE_BASE = 10000.0


def left_padding(attention_mask, batch, device):
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    width = attention_mask.shape[1]
    return first_index(attention_mask != 0, torch.full((batch,), width, device=device))


def packed_row_inputs(input_ids, config):
    """(soft prompt slots, position_ids [slots + n], bidirectional length) of one unpadded row alone: the soft
    prompt tokens (embedding-only prompt tuning) first, positions from 0, causal attention."""
    soft = soft_prompt_length(config)
    return soft, torch.arange(soft + input_ids.shape[0]), 0


def rotary_cos_sin(positions, head_dim, rope_ratio, dtype):
    """cos, sin [batch, 1, seq, head_dim / 4]: one angle per pair of the rotated half of the head."""
    rot_dim = head_dim // 2
    base = ROPE_BASE * rope_ratio
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float) / rot_dim))
    angles = positions.float()[:, None, :, None] * theta
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate interleaved pairs (x0, x1) of the first 2 * pairs channels; the rest of the head passes through."""
    rot = 2 * cos.shape[-1]
    x0, x1 = x[..., :rot].unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


class RMSNorm(nn.Module):
    """THUDM's RMSNorm: x / rms(x) times the weight, in float32, rounded once to x's dtype. F.rms_norm computes
    that (in float32 for half-precision inputs) as one kernel on a GPU, forward and backward: a 6B block's two
    norms were ~15 small kernels each way."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(variance + self.eps))).to(x.dtype)


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys and values for every key/value group (P-Tuning v2), optionally through an MLP; or, with
    `prompt_embedding_only`, soft input embeddings put before the input (P-Tuning v1, ours)."""

    def __init__(self, config):
        super().__init__()
        kv_size = config.hidden_size if config.prompt_embedding_only else \
            config.num_layers * config.kv_channels * config.multi_query_group_num * 2
        self.prefix_projection = config.prefix_projection
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(nn.Linear(kv_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, kv_size))
        keep_torch_default_init(self)

    def forward(self):
        prefix = self.embedding.weight
        return self.trans(prefix) if self.prefix_projection else prefix


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.multi_query_group_num, \
            config.kv_channels
        self.q_size, self.kv_size = self.heads * self.head_dim, self.groups * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.q_size, config.hidden_size, bias=config.add_bias_linear)

    def project_qkv(self, x):
        return self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def project_out(self, context):
        return self.dense(context)

    def forward(self, x, cos, sin, mask, past_key_values=None, prefix_kv=None):
        batch, seq, _ = x.shape
        query, key, value = self.project_qkv(x)
        query = apply_rotary(query.view(batch, seq, self.heads, -1).transpose(1, 2), cos, sin)
        key = apply_rotary(key.view(batch, seq, self.groups, -1).transpose(1, 2), cos, sin)
        value = value.view(batch, seq, self.groups, -1).transpose(1, 2)
        if prefix_kv is not None:
            key, value = torch.cat([prefix_kv[0], key], dim=2), torch.cat([prefix_kv[1], value], dim=2)
        if getattr(past_key_values, "attends_decode_step", False):  # decoding.StaticKVCache, past the prompt
            context = past_key_values.attend(query, key, value, self.layer_idx)
            return self.project_out(context.transpose(1, 2).reshape(batch, seq, -1))
        if isinstance(mask, PackedRows):  # flash attention reads each group's keys for its heads itself
            return self.project_out(mask.attend(query, key, value).transpose(1, 2).reshape(batch, seq, -1))
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        # each group of keys/values serves heads / groups consecutive query heads
        if seq == 1 and mask is not None:  # decoding: a group's heads become its query rows, the cache is not copied
            context = self.attend(query.reshape(batch, self.groups, -1, self.head_dim), key, value, mask)
            return self.project_out(context.reshape(batch, 1, -1))
        key = key.repeat_interleave(self.heads // self.groups, dim=1)
        value = value.repeat_interleave(self.heads // self.groups, dim=1)
        context = self.attend(query, key, value, mask)
        return self.project_out(context.transpose(1, 2).reshape(batch, seq, -1))

    def attend(self, query, key, value, mask):
        scale = 1.0 / math.sqrt(self.head_dim)
        # the model passes no mask only when attention is plainly causal over as many keys as queries (no cache
        # yet, no prefix, no padding); a shape comparison here would break torch.compile's graph
        causal = mask is None
        if self.config._attn_implementation != "eager":
            with sdpa_kernel(SDPA_BACKENDS):
                return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                      scale=scale)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if causal:
            mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, MASKED_SCORE)
        return torch.matmul(F.softmax(scores.float(), dim=-1).to(value.dtype), value)


class MLP(RecomputedInner, nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def inner(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return F.silu(gate) * up


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, cos, sin, mask, past_key_values=None, prefix_kv=None):
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), cos, sin, mask, past_key_values,
                                              prefix_kv)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class ChatGLMPreTrainedModel(NonReentrantCheckpointing, PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]  # recomputed

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, QuantizedLinear):  # its int weights come from quantizing or from a quantized folder
            return
        if getattr(module, "keeps_torch_default_init", False):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class RotaryDecoderStack(PromptSlots):
    """The decoder stack's forward, shared by the two folder layouts of this architecture (mixin): THUDM's
    (ChatGLMModel below) and transformers' GLM-4 classes (modeling_glm4.py). A layout names its modules through
    `blocks` (the layers), `final_norm` and its input embeddings; its config reads `kv_channels`, `rope_ratio`,
    `multi_query_group_num`, `num_layers` and the prompt settings."""

    def prefix_key_values(self, batch, dtype):
        cfg = self.config
        prefix = self.prefix_encoder().to(dtype).view(cfg.pre_seq_len, cfg.num_layers * 2, cfg.multi_query_group_num,
                                                      cfg.kv_channels)
        prefix = self.prefix_dropout(prefix[None].expand(batch, -1, -1, -1, -1)).permute(2, 0, 3, 1, 4)
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(cfg.num_layers)]

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, packed_rows=None, **kwargs):
        batch, seq = input_ids.shape
        device = input_ids.device
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = self.cached_tokens(past_key_values)
        first_call = past_key_values is None or past_key_values.get_seq_length() == 0
        virtual = self.num_virtual_tokens if first_call else 0
        hidden = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:  # soft prompt tokens take positions 0 .. n-1, the row's tokens follow them
            if packed_rows is not None:
                raise ValueError("packed rows need their own position_ids (data_set.PackRows makes both)")
            pad = left_padding(attention_mask, batch, device)
            position_ids = (torch.arange(past, past + seq, device=device)[None] - pad[:, None]).clamp(min=0) + \
                self.num_virtual_tokens
        if virtual:
            soft_prompt = self.prefix_dropout(self.prefix_encoder().to(hidden.dtype))
            if packed_rows is not None:  # each packed row has slots for its own soft prompt
                hidden, virtual = with_soft_prompt_per_row(hidden, packed_rows, soft_prompt), 0
        if virtual:
            hidden = torch.cat([soft_prompt[None].expand(batch, -1, -1), hidden], dim=1)
            position_ids = torch.cat([torch.arange(virtual, device=device)[None].expand(batch, -1), position_ids], 1)
        cos, sin = rotary_cos_sin(position_ids, self.config.kv_channels, self.config.rope_ratio, hidden.dtype)
        if packed_rows is not None:
            mask = packed_rows_attention(packed_rows, hidden, self.num_prefix_keys, False, self.config, past,
                                         self.recompute_packed_attention)
        else:
            mask = self.build_attention_mask(attention_mask, batch, seq, past, first_call, device)
        prefix_kv = self.prefix_key_values(batch, hidden.dtype) if first_call and self.num_prefix_keys else None
        for i, layer in enumerate(self.blocks):
            hidden = layer(hidden, cos, sin, mask, past_key_values, None if prefix_kv is None else prefix_kv[i])
        hidden = self.final_norm(hidden[:, virtual:])
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)

    def build_attention_mask(self, attention_mask, batch, seq, past, first_call, device):
        """Bool [batch, 1, queries, keys] (True = may attend), or None when plain causal attention is exact.

        Keys are [prefix keys | soft prompt tokens | cached tokens | new tokens]; on the first call the queries are
        [soft prompt tokens | new tokens]."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        leading = self.num_prefix_keys + self.num_virtual_tokens
        if not padded and not leading and past == 0:
            return None
        tokens = past + seq
        key_valid = torch.ones(batch, tokens, dtype=torch.bool, device=device) if attention_mask is None else \
            attention_mask[:, -tokens:].bool()
        key_valid = torch.cat([key_valid.new_ones(batch, leading), key_valid], dim=1)
        virtual = self.num_virtual_tokens if first_call else 0
        q_idx = torch.arange(seq + virtual, device=device)[:, None] + leading - virtual + past
        k_idx = torch.arange(key_valid.shape[1], device=device)[None, :]
        return ((k_idx <= q_idx)[None] & key_valid[:, None, :])[:, None]

    def decode_hidden(self, input_ids, position_ids, cache):
        """The final hidden state [batch, 1, hidden] of one new token per row, against decoding.StaticKVCache."""
        hidden = self.get_input_embeddings()(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.kv_channels, self.config.rope_ratio, hidden.dtype)
        for layer in self.blocks:
            hidden = layer(hidden, cos, sin, None, cache)
        return self.final_norm(hidden)


class ChatGLMModel(RotaryDecoderStack, ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    @property
    def blocks(self):
        return self.encoder.layers

    @property
    def final_norm(self):
        return self.encoder.final_layernorm


class RotaryDecoding:
    """The fixed-shape decode step that decoding.py replays as a CUDA graph, and generate()'s inputs: shared by both
    folder layouts (mixin of a causal LM whose `base_model` is a RotaryDecoderStack)."""

    def decode_position_ids(self, prompt_ids, attention_mask, step):
        """Positions [batch, 1] of the token fed at decode step `step` (a device tensor; 0 is the first generated
        token): the row's prompt length (padding not counted) + step, after any soft prompt tokens."""
        batch, seq = prompt_ids.shape
        pad = left_padding(attention_mask, batch, prompt_ids.device)
        return (seq - pad + step + self.base_model.num_virtual_tokens)[:, None]

    def decode_step(self, input_ids, position_ids, cache):
        """Logits [batch, vocab] of one new token per row, against decoding.StaticKVCache (which attends, over
        each row's own keys). No host synchronisation, no shape that varies."""
        return self.get_output_embeddings()(self.base_model.decode_hidden(input_ids, position_ids, cache))[:, -1]

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        done = self.base_model.cached_tokens(past_key_values)
        return {"input_ids": input_ids[:, done:], "attention_mask": attention_mask,
                "past_key_values": past_key_values, "use_cache": kwargs.get("use_cache", True)}


class ChatGLMForConditionalGeneration(CausalLMForward, RotaryDecoding, ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        if getattr(config, "quantization_bit", 0):  # a pre-quantized folder: its int weights and scales load here
            quantize_model(self, config.quantization_bit, empty=True)
        self.post_init()

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value
