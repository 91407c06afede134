"""Build a tiny, randomly initialised ChatGLM-6B folder laid out exactly like THUDM's official one.

The folder holds `config.json`, `ice_text.model` (a SentencePiece model trained here on the given text, with
ChatGLM-6B's special pieces), `tokenizer_config.json` and the weights under the official parameter names —
sharded `pytorch_model-0000N-of-0000M.bin` with `pytorch_model.bin.index.json` (as published) or safetensors.
Every script of the suite runs on it unchanged. It is a stand-in for ChatGLM-6B: it knows nothing.

    python tools/make_tiny_model.py --output_dir /tmp/tiny-chatglm [--num_layers 4 --hidden_size 128 ...]
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configuration_chatglm import ChatGLMConfig  # noqa: E402
from modeling_chatglm import ChatGLMForConditionalGeneration, ROPE_BASE  # noqa: E402
from tokenization_chatglm import ChatGLMTokenizer, train_sentencepiece_model  # noqa: E402

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


def official_state_dict(model):
    """The state dict as the official checkpoints store it: the float16-rounded rotary frequencies included."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    cfg = model.config
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


def build_tiny_model(output_dir, num_layers=4, hidden_size=128, num_attention_heads=4, inner_hidden_size=512,
                     vocab_pieces=3000, num_image_tokens=20000, text=(DEFAULT_TEXT,), weights_format="bin",
                     shards=2, seed=0, tie_word_embeddings=True, max_sequence_length=2048, embedding_std=1.0, init_std=0.2):
    os.makedirs(output_dir, exist_ok=True)
    sp_path = os.path.join(output_dir, "ice_text.model")
    from training import DEFAULT_PROMPT  # the default task instruction is text the tokenizer should know
    train_sentencepiece_model(texts_from(list(text)) + [DEFAULT_PROMPT] * 10, sp_path, vocab_size=vocab_pieces)
    tokenizer = ChatGLMTokenizer(sp_path, num_image_tokens=num_image_tokens)
    tokenizer.save_pretrained(output_dir)
    config = ChatGLMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_attention_heads=num_attention_heads, inner_hidden_size=inner_hidden_size,
        max_sequence_length=max_sequence_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings, architectures=["ChatGLMModel"],
    )
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config)
    # Scales like a trained model's rather than GPT-style 0.02: with 0.02 a tied head cannot make a confident
    # prediction (its largest logit is about 0.02 * hidden_size) and, after GLM's sqrt(56)-scaled residual, the
    # sublayers barely move the hidden state, so adapters and prefixes could never fit anything.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, embedding_std if "embeddings" in name or "lm_head" in name else init_std)
    config.save_pretrained(output_dir)
    save_weights(official_state_dict(model), output_dir, weights_format, shards)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--inner_hidden_size", type=int, default=512)
    parser.add_argument("--vocab_pieces", type=int, default=3000,
                        help="SentencePiece vocabulary size to aim for (fewer when the text is small)")
    parser.add_argument("--num_image_tokens", type=int, default=20000,
                        help="id offset of the text vocabulary, 20000 as in ChatGLM-6B")
    parser.add_argument("--text", nargs="+", default=[DEFAULT_TEXT],
                        help="JSONL/JSON files or folders whose strings train the tokenizer (default: data/)")
    parser.add_argument("--weights_format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--shards", type=int, default=2, help="number of weight files (the official has 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied", action="store_true", help="a separate lm_head (the official ties it)")
    parser.add_argument("--embedding_std", type=float, default=1.0, help="scale of the random embeddings")
    parser.add_argument("--init_std", type=float, default=0.2, help="scale of the random linear weights")
    args = parser.parse_args()
    build_tiny_model(args.output_dir, args.num_layers, args.hidden_size, args.num_attention_heads,
                     args.inner_hidden_size, args.vocab_pieces, args.num_image_tokens, args.text,
                     args.weights_format, args.shards, args.seed, not args.untied,
                     embedding_std=args.embedding_std, init_std=args.init_std)
    print(f"tiny ChatGLM-6B stand-in written to {args.output_dir}")


if __name__ == "__main__":
    main()
