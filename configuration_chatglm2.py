"""Configuration of ChatGLM2-6B and ChatGLM3-6B, with the official field names (the official class name too).

Both families share `model_type` "chatglm" with ChatGLM-6B; `model_family.py` tells them apart by their fields
and tokenizer files. `prompt_embedding_only` and `prefix_dropout` are ours, as in configuration_chatglm.py.
"""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    def __init__(self, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=2048, layernorm_epsilon=1e-5, rmsnorm=True,
                 apply_residual_connection_post_layernorm=False, post_layer_norm=True, add_bias_linear=False,
                 add_qkv_bias=True, multi_query_attention=True, multi_query_group_num=2, rope_ratio=1.0,
                 apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, fp32_residual_connection=False,
                 pre_seq_len=None, prefix_projection=False, prompt_embedding_only=False, prefix_dropout=0.1,
                 eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, use_cache=True, **kwargs):
        if not (rmsnorm and post_layer_norm and not apply_residual_connection_post_layernorm):
            raise ValueError("only the published ChatGLM2/3 layout is supported: RMSNorm, final norm, pre-norm residual")
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num if multi_query_attention else num_attention_heads
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.prompt_embedding_only = prompt_embedding_only
        self.prefix_dropout = prefix_dropout
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
