"""Build a tiny, randomly initialised ChatGLM-6B, ChatGLM2/3-6B or GLM-4 folder laid out like the published ones.

The folder holds `config.json`, the tokenizer (a SentencePiece model trained here on the given text: `ice_text.model`
with ChatGLM-6B's special pieces, or `tokenizer.model` for ChatGLM2/3, whose special tokens follow the
SentencePiece vocabulary; GLM-4: a byte-level BPE, as `tokenizer.model` in THUDM's layout or `tokenizer.json` in
transformers' for `glm4-hf` / `glm4-0414`), `tokenizer_config.json` and the weights under the official parameter
names — sharded `pytorch_model-0000N-of-0000M.bin` with `pytorch_model.bin.index.json` (as published) or
safetensors (transformers' layouts: as transformers' own classes save them). Every script
of the suite runs on it unchanged. It is a stand-in for the real model: it knows nothing.

    python tools/make_tiny_model.py --output_dir /tmp/tiny-chatglm [--family chatglm2] [--num_layers 4 ...]
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configuration_chatglm import ChatGLMConfig  # noqa: E402
from data_set import round_up  # noqa: E402
from configuration_chatglm2 import ChatGLMConfig as ChatGLM2Config  # noqa: E402
from modeling_chatglm import ChatGLMForConditionalGeneration, ROPE_BASE  # noqa: E402
from modeling_chatglm2 import ChatGLMForConditionalGeneration as ChatGLM2ForConditionalGeneration  # noqa: E402
from tokenization_chatglm import ChatGLMTokenizer, train_sentencepiece_model  # noqa: E402
from tokenization_chatglm2 import ChatGLMTokenizer as ChatGLM2Tokenizer  # noqa: E402
from tokenization_glm4 import SPLIT_PATTERN, ChatGLM4Tokenizer, write_bpe_ranks  # noqa: E402

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4", "glm4-hf", "glm4-0414")
# transformers' own GLM classes: config and weights as glm-4-9b-chat-hf / GLM-4-9B-0414 publish them
NATIVE_CLASSES = {"glm4-hf": ("GlmConfig", "GlmForCausalLM", 10000.0 * 500),  # (config, model, rope_theta)
                  "glm4-0414": ("Glm4Config", "Glm4ForCausalLM", 10000.0)}

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def texts_from(paths):
    """Every string value of every row of the given .jsonl/.json files (folders: all such files inside)."""
    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.json*"))) if os.path.isdir(path) else [path]
    texts = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            content = f.read()
        rows = json.loads(content) if content.lstrip().startswith("[") else \
            [json.loads(line) for line in content.splitlines() if line.strip()]
        for row in rows:
            for value in row.values():
                texts += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    if not texts:
        raise SystemExit(f"no text found in {', '.join(paths)}")
    return texts


def train_bpe_ranks(texts, vocab_size):
    """A byte-level BPE learned here, as GLM-4's `tokenizer.model` holds one: the 256 bytes, then the most frequent
    adjacent pair inside the pieces GLM-4's split pattern cuts the text into, merged again and again (ties broken by
    the bytes, so the result is the same every time) until `vocab_size` tokens."""
    import heapq
    from collections import Counter, defaultdict

    import regex
    pattern = regex.compile(SPLIT_PATTERN)
    piece_counts = Counter(piece.encode() for text in texts for piece in pattern.findall(text))
    words = [[bytes([b]) for b in piece] for piece in piece_counts]
    freqs = list(piece_counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    pair_counts, words_with = Counter(), defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            words_with[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(ranks) < vocab_size and heap:
        count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -count or count == 0:
            continue  # a stale entry: the pair's count changed since (its current count has an entry of its own)
        merged = pair[0] + pair[1]
        ranks.setdefault(merged, len(ranks))
        changed = set()
        for i in words_with.pop(pair):
            word = words[i]
            for old in zip(word, word[1:]):
                pair_counts[old] -= freqs[i]
                changed.add(old)
            j, out = 0, []
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            words[i] = out
            for new in zip(out, out[1:]):
                pair_counts[new] += freqs[i]
                words_with[new].add(i)
                changed.add(new)
        pair_counts.pop(pair, None)
        for changed_pair in changed - {pair}:
            heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return ranks


def official_state_dict(model):
    """The state dict as the official checkpoints store it, rotary frequency buffers included (ChatGLM-6B's
    rounded to float16, as published)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    cfg = model.config
    if hasattr(cfg, "padded_vocab_size"):  # ChatGLM2/3: one buffer, rotary on half of each head
        rot_dim = cfg.kv_channels // 2
        state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (ROPE_BASE ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
        return state
    rot_dim = cfg.hidden_size // cfg.num_attention_heads // 2
    inv_freq = (1.0 / (ROPE_BASE ** (torch.arange(0, rot_dim, 2).float() / rot_dim))).half()
    for i in range(cfg.num_layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def save_weights(state, output_dir, fmt, shards):
    names = list(state)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    if fmt == "safetensors":
        from safetensors.torch import save_file
        files = ["model.safetensors"] if shards == 1 else \
            [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for file, group in zip(files, groups):
            save_file({k: state[k] for k in group}, os.path.join(output_dir, file), metadata={"format": "pt"})
        index_name = "model.safetensors.index.json"
    else:
        files = ["pytorch_model.bin"] if shards == 1 else \
            [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
        for file, group in zip(files, groups):
            torch.save({k: state[k] for k in group}, os.path.join(output_dir, file))
        index_name = "pytorch_model.bin.index.json"
    if shards > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: files[i] for i, group in enumerate(groups) for k in group}}
        with open(os.path.join(output_dir, index_name), "w") as f:
            json.dump(index, f, indent=2)


def tokenizer_and_config(family, output_dir, texts, vocab_pieces, num_image_tokens, num_layers, hidden_size,
                         num_attention_heads, inner_hidden_size, tie_word_embeddings, max_sequence_length):
    """Train and save the family's tokenizer; return the matching config."""
    if family == "chatglm":
        sp_path = os.path.join(output_dir, "ice_text.model")
        train_sentencepiece_model(texts, sp_path, vocab_size=vocab_pieces)
        tokenizer = ChatGLMTokenizer(sp_path, num_image_tokens=num_image_tokens)
        tokenizer.save_pretrained(output_dir)
        return ChatGLMConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_layers=num_layers,
            num_attention_heads=num_attention_heads, inner_hidden_size=inner_hidden_size,
            max_sequence_length=max_sequence_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
            gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=tie_word_embeddings, architectures=["ChatGLMModel"])
    if family == "glm4":
        return glm4_tokenizer_and_config(output_dir, texts, vocab_pieces, num_layers, hidden_size,
                                         num_attention_heads, inner_hidden_size, max_sequence_length)
    sp_path = os.path.join(output_dir, "tokenizer.model")
    train_sentencepiece_model(texts, sp_path, vocab_size=vocab_pieces, chatglm6b_pieces=False)
    tokenizer = ChatGLM2Tokenizer(sp_path, role_tokens=family == "chatglm3")
    tokenizer.save_pretrained(output_dir)
    return ChatGLM2Config(
        padded_vocab_size=round_up(tokenizer.vocab_size, 64),  # padded like the official 65,024
        hidden_size=hidden_size, num_layers=num_layers, num_attention_heads=num_attention_heads,
        kv_channels=hidden_size // num_attention_heads, ffn_hidden_size=inner_hidden_size, multi_query_group_num=2,
        seq_length=max_sequence_length, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["ChatGLMModel"])


def glm4_tokenizer_and_config(output_dir, texts, vocab_pieces, num_layers, hidden_size, num_attention_heads,
                              inner_hidden_size, max_sequence_length):
    """GLM-4-9B-Chat's layout: a tiktoken BPE file, the special tokens after it, three end tokens, rope_ratio 500."""
    bpe_path = os.path.join(output_dir, "tokenizer.model")
    write_bpe_ranks(train_bpe_ranks(texts, vocab_pieces), bpe_path)
    tokenizer = ChatGLM4Tokenizer(bpe_path)
    tokenizer.save_pretrained(output_dir)
    command = tokenizer.get_command
    return ChatGLM2Config(
        padded_vocab_size=round_up(tokenizer.vocab_size, 64), hidden_size=hidden_size, num_layers=num_layers,
        num_attention_heads=num_attention_heads, kv_channels=hidden_size // num_attention_heads,
        ffn_hidden_size=inner_hidden_size, multi_query_group_num=2, seq_length=max_sequence_length,
        layernorm_epsilon=1.5625e-07, rope_ratio=500, original_rope=True,
        eos_token_id=[command("<|endoftext|>"), command("<|user|>"), command("<|observation|>")],
        pad_token_id=command("<|endoftext|>"), architectures=["ChatGLMModel"])


def build_tiny_model(output_dir, num_layers=4, hidden_size=128, num_attention_heads=4, inner_hidden_size=512,
                     vocab_pieces=3000, num_image_tokens=20000, text=(DEFAULT_TEXT,), weights_format="bin",
                     shards=2, seed=0, tie_word_embeddings=True, max_sequence_length=2048, embedding_std=1.0,
                     init_std=0.2, family="chatglm"):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    os.makedirs(output_dir, exist_ok=True)
    from training_options import DEFAULT_PROMPT  # the default task instruction is text the tokenizer should know
    texts = texts_from(list(text)) + [DEFAULT_PROMPT] * 10
    if family in NATIVE_CLASSES:
        return build_native_tiny_model(output_dir, family, texts, num_layers, hidden_size, num_attention_heads,
                                       inner_hidden_size, vocab_pieces, max_sequence_length, seed, embedding_std,
                                       init_std)
    config = tokenizer_and_config(family, output_dir, texts, vocab_pieces, num_image_tokens, num_layers, hidden_size,
                                  num_attention_heads, inner_hidden_size, tie_word_embeddings, max_sequence_length)
    torch.manual_seed(seed)
    model = (ChatGLMForConditionalGeneration if family == "chatglm" else ChatGLM2ForConditionalGeneration)(config)
    # Scales like a trained model's rather than GPT-style 0.02: with 0.02 a tied head cannot make a confident
    # prediction (its largest logit is about 0.02 * hidden_size) and, after GLM's sqrt(56)-scaled residual, the
    # sublayers barely move the hidden state, so adapters and prefixes could never fit anything.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                head = any(k in name for k in ("embeddings", "lm_head", "output_layer"))
                parameter.normal_(0.0, embedding_std if head else init_std)
    config.auto_map = OFFICIAL_AUTO_MAP[family]
    config.save_pretrained(output_dir)
    add_tokenizer_auto_map(output_dir, family)
    save_weights(official_state_dict(model), output_dir, weights_format, shards)
    return output_dir


def native_glm4_tokenizer(texts, vocab_pieces, scratch):
    """A tokenizer.json as glm-4-9b-chat-hf holds one: GLM-4's byte-level BPE (trained here) converted by
    transformers' TikTokenConverter, the special tokens after it, GLM-4's chat template."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tokenization_glm4 import CHAT_TEMPLATE, SPECIAL_TOKENS
    bpe_path = os.path.join(scratch, "bpe.tiktoken")
    write_bpe_ranks(train_bpe_ranks(texts, vocab_pieces), bpe_path)
    backend = TikTokenConverter(vocab_file=bpe_path, pattern=SPLIT_PATTERN).converted()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE)


def native_config(family, tokenizer, num_layers, hidden_size, num_attention_heads, inner_hidden_size,
                  max_sequence_length, vocab_size=None):
    """transformers' config of a glm-4-9b-chat-hf / GLM-4-9B-0414 folder at these sizes (vocabulary: the tokenizer's,
    padded to 64, unless given)."""
    import transformers
    config_name, _, rope_theta = NATIVE_CLASSES[family]
    special = tokenizer.convert_tokens_to_ids
    return getattr(transformers, config_name)(
        vocab_size=vocab_size or round_up(len(tokenizer), 64), hidden_size=hidden_size,
        intermediate_size=inner_hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=2, head_dim=hidden_size // num_attention_heads, rms_norm_eps=1.5625e-07,
        attention_bias=True, max_position_embeddings=max_sequence_length, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
        pad_token_id=special("<|endoftext|>"),
        eos_token_id=[special("<|endoftext|>"), special("<|user|>"), special("<|observation|>")],
        architectures=[NATIVE_CLASSES[family][1]])


def build_native_tiny_model(output_dir, family, texts, num_layers, hidden_size, num_attention_heads,
                            inner_hidden_size, vocab_pieces, max_sequence_length, seed, embedding_std, init_std):
    import tempfile

    import transformers
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = native_glm4_tokenizer(texts, vocab_pieces, scratch)
    tokenizer.save_pretrained(output_dir)
    config = native_config(family, tokenizer, num_layers, hidden_size, num_attention_heads, inner_hidden_size,
                           max_sequence_length)
    torch.manual_seed(seed)
    model = getattr(transformers, NATIVE_CLASSES[family][1])(config)
    with torch.no_grad():  # scales like a trained model's (see build_tiny_model)
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, embedding_std if "embed_tokens" in name or "lm_head" in name else init_std)
    model.save_pretrained(output_dir)
    return output_dir


# What the official folders' config.json names for trust_remote_code loading (their .py files sit beside it)
OFFICIAL_AUTO_MAP = {
    "chatglm": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}
OFFICIAL_AUTO_MAP["chatglm2"] = OFFICIAL_AUTO_MAP["chatglm3"] = OFFICIAL_AUTO_MAP["glm4"] = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def add_tokenizer_auto_map(output_dir, family):
    """tokenizer_config.json names its class as the official folders do, so that AutoTokenizer with
    trust_remote_code finds tokenization_chatglm.ChatGLMTokenizer (GLM-4: ChatGLM4Tokenizer) in the folder."""
    path = os.path.join(output_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    name = "ChatGLM4Tokenizer" if family == "glm4" else "ChatGLMTokenizer"
    tokenizer_config["auto_map"] = {"AutoTokenizer": [f"tokenization_chatglm.{name}", None]}
    tokenizer_config["tokenizer_class"] = name
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, ensure_ascii=False, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--family", choices=FAMILIES, default="chatglm", help="which model's folder to build")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--inner_hidden_size", type=int, default=512, help="feed-forward width (ChatGLM2/3: "
                        "ffn_hidden_size)")
    parser.add_argument("--vocab_pieces", type=int, default=3000,
                        help="SentencePiece vocabulary size to aim for (fewer when the text is small)")
    parser.add_argument("--num_image_tokens", type=int, default=20000,
                        help="id offset of the text vocabulary, 20000 as in ChatGLM-6B")
    parser.add_argument("--text", nargs="+", default=[DEFAULT_TEXT],
                        help="JSONL/JSON files or folders whose strings train the tokenizer (default: data/)")
    parser.add_argument("--weights_format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--shards", type=int, default=2, help="number of weight files (the official has 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied", action="store_true", help="ChatGLM-6B: a separate lm_head (the official ties "
                        "it; ChatGLM2/3 always have their own output layer)")
    parser.add_argument("--embedding_std", type=float, default=1.0, help="scale of the random embeddings")
    parser.add_argument("--init_std", type=float, default=0.2, help="scale of the random linear weights")
    args = parser.parse_args()
    build_tiny_model(args.output_dir, args.num_layers, args.hidden_size, args.num_attention_heads,
                     args.inner_hidden_size, args.vocab_pieces, args.num_image_tokens, args.text,
                     args.weights_format, args.shards, args.seed, not args.untied,
                     embedding_std=args.embedding_std, init_std=args.init_std, family=args.family)
    print(f"tiny {args.family} stand-in written to {args.output_dir}")


if __name__ == "__main__":
    main()
