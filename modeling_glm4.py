"""GLM-4 in transformers' folder layout, for the suite: glm-4-9b-chat-hf (`model_type: glm`, transformers'
GlmForCausalLM) and GLM-4-9B-0414 / GLM-Z1-9B-0414 (`model_type: glm4`, Glm4ForCausalLM). Our own code, the same
function as transformers' classes, under transformers' module and parameter names.

The architecture is THUDM's GLM-4 (ChatGLM3's, rotary base 10000 x rope_ratio) with separate q/k/v projections, a
fused gate/up projection, and in GLM-4-0414 two more norms per layer (after attention and after the MLP, before
each residual). So the forward is modeling_chatglm2.py's (RotaryDecoderStack, RotaryDecoding): every feature of the
suite's fast path (P-Tuning prefixes, packed rows, the static decoder, THUDM's INT8/INT4 linears, MLP recomputation,
compiled blocks, the CUDA-graph step) works on these folders as on THUDM's, while what is saved keeps transformers'
names: a full or Freeze checkpoint, or a merged model, loads with transformers' own AutoModelForCausalLM, and a
LoRA adapter (on q_proj, k_proj, v_proj) with plain PEFT on transformers' class.

Where transformers' classes round differently from THUDM's code, this file follows transformers: the RMSNorm casts
the normalised input to its dtype before scaling by the weight.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, Glm4Config, GlmConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_chatglm import CausalLMForward, NonReentrantCheckpointing, RecomputedInner
from modeling_chatglm2 import (ROPE_BASE, PrefixEncoder, RotaryDecoderStack, RotaryDecoding,
                               SelfAttention as RotarySelfAttention)
from quantization import QuantizedLinear, quantize_model


class SuiteConfigNames:
    """Config mixin: THUDM's field names read transformers' (the shared forward and the suite's tools read those),
    and the prompt-tuning settings, which are written to config.json only when set (a P-Tuning checkpoint's)."""
    attribute_map = {"num_layers": "num_hidden_layers", "kv_channels": "head_dim",
                     "multi_query_group_num": "num_key_value_heads", "ffn_hidden_size": "intermediate_size",
                     "layernorm_epsilon": "rms_norm_eps"}
    pre_seq_len = None
    prefix_projection = False
    prompt_embedding_only = False
    prefix_dropout = 0.1
    quantization_bit = 0

    @property
    def rope_ratio(self):
        return self.rope_parameters["rope_theta"] / ROPE_BASE


class GlmSuiteConfig(SuiteConfigNames, GlmConfig):
    pass


class Glm4SuiteConfig(SuiteConfigNames, Glm4Config):
    pass


def check_rotary(config):
    """The rotary form this architecture has (and rotary_cos_sin computes): half of each head, in pairs, no scaling."""
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 0.5) != 0.5:
        raise ValueError(f"rope_parameters {rope}: only GLM-4's rotary (rope_type default, partial_rotary_factor "
                         "0.5) is supported")


class RMSNorm(nn.Module):
    """transformers' GLM RMSNorm: normalised in float32, rounded to x's dtype, then scaled by the weight. The
    normalisation is F.rms_norm (one kernel each way on a GPU, in float32 for half-precision inputs)."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)


class Attention(RotarySelfAttention):
    """ChatGLM2's attention with q, k and v projected separately (biases per `attention_bias`) and `o_proj`."""

    def __init__(self, config, layer_idx):
        nn.Module.__init__(self)
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_key_value_heads, \
            config.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.groups * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def project_qkv(self, x):
        layers = (self.q_proj, self.k_proj, self.v_proj)
        adapter = plain_lora_adapter(layers)
        if adapter is None:
            return tuple(layer(x) for layer in layers)
        return lora_projections(x, layers, adapter)

    def project_out(self, context):
        return self.o_proj(context)


def plain_lora_adapter(layers):
    """The adapter name when each of `layers` is a PEFT LoRA linear with that one active plain adapter (no DoRA or
    other variant, not merged, enabled) and the same dropout and scaling; None otherwise (PEFT's own forward)."""
    first = layers[0]
    if not hasattr(first, "lora_A") or len(first.active_adapters) != 1:
        return None
    adapter = first.active_adapters[0]
    settings = set()
    for layer in layers:
        if not hasattr(layer, "lora_A") or layer.disable_adapters or layer.merged or \
                list(layer.active_adapters) != [adapter] or adapter not in layer.lora_A or adapter in layer.lora_variant:
            return None
        dropout = layer.lora_dropout[adapter]
        settings.add((dropout.p if isinstance(dropout, nn.Dropout) else 0.0, layer.scaling[adapter]))
    return adapter if len(settings) == 1 else None


def lora_projections(x, layers, adapter):
    """What PEFT computes for LoRA on q, k and v, `base(x) + B(A(dropout(x))) * scaling` each, with the three
    adapters' work done together: one dropout kernel drawing each adapter's own mask, one batched product with
    the three A's (without dropout, one matmul), then each B. The transformers layout's three adapters otherwise
    take three times the small kernels over the same activations that THUDM's fused query_key_value takes once."""
    first = layers[0]
    p, scaling = first.lora_dropout[adapter].p if isinstance(first.lora_dropout[adapter], nn.Dropout) else 0.0, \
        first.scaling[adapter]
    bases = [layer.base_layer(x) for layer in layers]
    weights = [layer.lora_A[adapter].weight for layer in layers]
    inputs = x.to(weights[0].dtype)
    if p and first.training:  # three independent masks, as three nn.Dropout modules would draw
        dropped = F.dropout(inputs.unsqueeze(0).expand(len(layers), *inputs.shape), p, training=True)
        low = torch.matmul(dropped, torch.stack(weights).transpose(1, 2).unsqueeze(1)) * scaling
    else:
        low = (F.linear(inputs, torch.cat(weights)) * scaling).unflatten(-1, (len(layers), -1)).movedim(-2, 0)
    return tuple((base + F.linear(part, layer.lora_B[adapter].weight)).to(base.dtype)
                 for base, part, layer in zip(bases, low, layers))


class MLP(RecomputedInner, nn.Module):
    narrowing_linear = "down_proj"

    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def inner(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return up * nn.functional.silu(gate)


class GlmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention and MLP; GLM-4-0414 (`model_type` glm4) also normalises each sublayer's output."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.sandwich_norms = config.model_type == "glm4"
        if self.sandwich_norms:
            self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, mask, past_key_values=None, prefix_kv=None):
        attention = self.self_attn(self.input_layernorm(hidden), cos, sin, mask, past_key_values, prefix_kv)
        hidden = hidden + (self.post_self_attn_layernorm(attention) if self.sandwich_norms else attention)
        mlp = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + (self.post_mlp_layernorm(mlp) if self.sandwich_norms else mlp)


class GlmPreTrainedModel(NonReentrantCheckpointing, PreTrainedModel):
    config_class = GlmSuiteConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GlmDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, QuantizedLinear):  # its int weights come from quantizing or from a quantized folder
            return
        if getattr(module, "keeps_torch_default_init", False):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class GlmModel(RotaryDecoderStack, GlmPreTrainedModel):
    def __init__(self, config):
        check_rotary(config)
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([GlmDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @property
    def blocks(self):
        return self.layers

    @property
    def final_norm(self):
        return self.norm


class GlmForCausalLM(CausalLMForward, RotaryDecoding, GlmPreTrainedModel, GenerationMixin):
    """glm-4-9b-chat-hf. Saved folders name transformers' class of the same name (this class's name)."""
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = GlmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.quantization_bit:  # a pre-quantized folder (tools/quantize_model.py): its int weights load here
            quantize_model(self, config.quantization_bit, empty=True)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value


class Glm4ForCausalLM(GlmForCausalLM):
    """GLM-4-9B-0414 / GLM-Z1-9B-0414 (and the 32B ones): the same, with the two extra norms per layer."""
    config_class = Glm4SuiteConfig
