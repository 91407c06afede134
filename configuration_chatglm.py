"""Configuration of the ChatGLM-6B model (GLM architecture), with the official field names.

A `config.json` from THUDM's ChatGLM-6B folder loads unchanged. Two fields are ours:
`prompt_embedding_only` switches the prompt encoder to the shallow soft prompt (P-Tuning v1) and
`prefix_dropout` is the dropout the official P-Tuning v2 code applies to the prefix while training.
"""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size=130528,
        hidden_size=4096,
        num_layers=28,
        num_attention_heads=32,
        layernorm_epsilon=1e-5,
        use_cache=True,
        bos_token_id=130004,
        eos_token_id=130005,
        mask_token_id=130000,
        gmask_token_id=130001,
        pad_token_id=3,
        max_sequence_length=2048,
        inner_hidden_size=16384,
        position_encoding_2d=True,
        quantization_bit=0,
        pre_seq_len=None,
        prefix_projection=False,
        prompt_embedding_only=False,
        prefix_dropout=0.1,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.prompt_embedding_only = prompt_embedding_only
        self.prefix_dropout = prefix_dropout
        # the official config.json has no such key, which under transformers 4 meant tied: lm_head shares the
        # input embeddings (transformers 5 no longer defaults it, so it is spelled out here)
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
