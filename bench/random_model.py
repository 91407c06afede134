"""Model folders of the published sizes with random weights, for benchmarks that run the user's commands.

A run's speed and memory do not depend on the weights' values, so a folder laid out as the published one (config,
tokenizer, sharded safetensors under the official names) but holding random bf16 weights (made on the GPU: std 0.02,
norms 1, biases 0) stands in for it. The tokenizer is a small one trained here on data/ (3,000 pieces): its ids sit
at the bottom of the vocabulary, and the spo rows come out longer than with the real tokenizer. Every layout of one
architecture gets the same tokenizer, so their rows have the same lengths.

    build_random_folder("/tmp/glm4-hf", "glm4-hf")        # glm-4-9b-chat-hf's shape and layout
    build_random_folder("/tmp/chatglm6b", "chatglm")      # ChatGLM-6B's

Families: chatglm (ChatGLM-6B), chatglm2 (ChatGLM2/3-6B), glm4 (GLM-4-9B, THUDM's layout), glm4-hf, glm4-0414.
`tiny` makes 2 layers of width 64 on the CPU, to check a bench script.
"""
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (layers, hidden, heads, feed-forward width, vocabulary) of the published models
SHAPES = {"chatglm": (28, 4096, 32, 16384, 130528), "chatglm2": (28, 4096, 32, 13696, 65024),
          "glm4": (40, 4096, 32, 13696, 151552), "glm4-hf": (40, 4096, 32, 13696, 151552),
          "glm4-0414": (40, 4096, 32, 13696, 151552)}
TINY = (2, 64, 4, 128)
TOKENIZER_PIECES = 3000


def config_and_tokenizer(folder, family, tiny):
    """Write the family's tokenizer into `folder`; return its config at the published (or tiny) size."""
    from tools.make_tiny_model import (DEFAULT_TEXT, NATIVE_CLASSES, native_config, native_glm4_tokenizer,
                                       texts_from, tokenizer_and_config)
    from training_options import DEFAULT_PROMPT
    layers, hidden, heads, inner, vocab = SHAPES[family]
    if tiny:
        layers, hidden, heads, inner = TINY
    texts = texts_from([DEFAULT_TEXT]) + [DEFAULT_PROMPT] * 10
    if family in NATIVE_CLASSES:
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = native_glm4_tokenizer(texts, TOKENIZER_PIECES, scratch)
        tokenizer.save_pretrained(folder)
        return native_config(family, tokenizer, layers, hidden, heads, inner, 8192, None if tiny else vocab)
    config = tokenizer_and_config(family, folder, texts, TOKENIZER_PIECES, vocab - TOKENIZER_PIECES, layers, hidden,
                                  heads, inner, True, 8192)
    if family != "chatglm" and not tiny:
        config.padded_vocab_size = vocab
    return config


def empty_model(family, config):
    """The model on the meta device: its parameter names and shapes (transformers' layouts: transformers' class)."""
    import torch
    import transformers

    from model_family import FAMILIES
    from tools.make_tiny_model import NATIVE_CLASSES
    model_class = getattr(transformers, NATIVE_CLASSES[family][1]) if family in NATIVE_CLASSES else \
        FAMILIES[family].model_class
    with torch.device("meta"):
        return model_class(config)


def build_random_folder(folder, family, tiny=False, shard_bytes=4 << 30, seed=0):
    """The folder (made once: an existing one with its index is kept)."""
    import torch
    from safetensors.torch import save_file

    from tools.make_tiny_model import NATIVE_CLASSES, OFFICIAL_AUTO_MAP, add_tokenizer_auto_map, official_state_dict
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    config = config_and_tokenizer(folder, family, tiny)
    model = empty_model(family, config)
    if family in NATIVE_CLASSES:
        state = model.state_dict()
    else:
        config.auto_map = OFFICIAL_AUTO_MAP[family]
        add_tokenizer_auto_map(folder, family)
        state = official_state_dict(model)
    config.save_pretrained(folder)
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, current, size, total = {}, {}, 0, 0
    names = list(state)
    for number, name in enumerate(names):
        meta = state[name]
        if not meta.is_meta:  # ChatGLM's rotary frequencies, computed
            value = meta
        elif meta.ndim == 2:
            value = torch.randn(meta.shape, device=device, dtype=torch.bfloat16, generator=generator) * 0.02
        else:
            value = (torch.zeros if name.endswith("bias") else torch.ones)(meta.shape, dtype=torch.bfloat16)
        current[name] = value.cpu()
        size += value.numel() * value.element_size()
        if size >= shard_bytes or number == len(names) - 1:  # each shard written as it fills: one in memory
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(current, os.path.join(folder, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in current})
            total += size
            current, size = {}, 0
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "config.json")) as f:
        saved = json.load(f)
    saved["torch_dtype"] = "bfloat16"  # the weights' type, as published folders say it
    saved.pop("dtype", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(saved, f, indent=2)
    return folder
