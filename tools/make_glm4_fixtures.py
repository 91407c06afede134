"""Reference outputs for GLM-4-9B's THUDM layout, computed by transformers' own GLM class.

THUDM publishes GLM-4-9B-Chat twice: `glm-4-9b-chat` (model_type "chatglm", their modeling file, the layout our
modeling_chatglm2.py loads) and `glm-4-9b-chat-hf`, the same weights renamed for transformers' `GlmForCausalLM`.
This script builds a tiny random GLM-4 folder in THUDM's layout (tools/make_tiny_model.py --family glm4), renames its
weights the way that conversion does (query_key_value split into q/k/v, dense_h_to_4h -> gate_up_proj, ...), runs
`GlmForCausalLM` in float32 on the CPU and writes what it computes beside the folder, in the format of
../shared/fixtures (golden.json: a padded training batch laid out by our glm4 layout, its loss and logits
statistics, 12 greedy tokens; logits.pt). tests/test_modeling_glm4.py checks our model against it.

    python tools/make_glm4_fixtures.py --output_dir tests/fixtures/glm4/base

Second step, THUDM's own code: with `--official_code DIR` (DIR holds THUDM's glm-4-9b-chat folder, or at least its
configuration_chatglm.py, modeling_chatglm.py and tokenization_chatglm.py), the script loads the fixture folder with
those files through `trust_remote_code` and writes `official.json` (the golden batch's loss and argmax, 12 greedy
tokens, and the ids THUDM's ChatGLM4Tokenizer gives every string of `fixture_texts()`) and `official_logits.pt`.
THUDM's files need the transformers they were written for (4.44), so run this step in a virtual environment of its
own; it imports nothing of this project but this file:

    python3 -m venv --system-site-packages /tmp/glm4-official && /tmp/glm4-official/bin/pip install transformers==4.44.2
    /tmp/glm4-official/bin/python tools/make_glm4_fixtures.py --official_code PATH/glm-4-9b-chat
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def hf_glm_state_dict(state, config):
    """THUDM's parameter names -> transformers' GlmForCausalLM names (what glm-4-9b-chat-hf holds)."""
    heads, groups, head_dim = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    out = {"model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": state["transformer.output_layer.weight"]}
    for i in range(config.num_layers):
        old, new = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[old + f"self_attention.query_key_value.{kind}"].split(
                [heads * head_dim, groups * head_dim, groups * head_dim])
            out[new + f"self_attn.q_proj.{kind}"], out[new + f"self_attn.k_proj.{kind}"] = q, k
            out[new + f"self_attn.v_proj.{kind}"] = v
        out[new + "self_attn.o_proj.weight"] = state[old + "self_attention.dense.weight"]
        out[new + "mlp.gate_up_proj.weight"] = state[old + "mlp.dense_h_to_4h.weight"]
        out[new + "mlp.down_proj.weight"] = state[old + "mlp.dense_4h_to_h.weight"]
        out[new + "input_layernorm.weight"] = state[old + "input_layernorm.weight"]
        out[new + "post_attention_layernorm.weight"] = state[old + "post_attention_layernorm.weight"]
    return out


def hf_glm_model(folder):
    from safetensors.torch import load_file
    from transformers import GlmConfig, GlmForCausalLM

    from configuration_chatglm2 import ChatGLMConfig
    config = ChatGLMConfig.from_pretrained(folder)
    hf_config = GlmConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.multi_query_group_num, head_dim=config.kv_channels,
        rms_norm_eps=config.layernorm_epsilon, max_position_embeddings=config.seq_length,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config.rope_ratio,
                         "partial_rotary_factor": 0.5},
        attention_bias=True, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=False)
    model = GlmForCausalLM._from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(hf_glm_state_dict(load_file(os.path.join(folder, "model.safetensors")),
                                                                  config), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval()


def golden_batch(folder):
    """Two training rows of data/spo_train.jsonl in our glm4 layout, right-padded, labels -100 on the padding."""
    from model_family import family_for, load_tokenizer
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    with open(os.path.join(ROOT, "data", "spo_train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(2)]
    pairs = [family.build_training_ids(tokenizer, tokenizer.encode("抽取：" + r["text"][:60], add_special_tokens=False),
                                       tokenizer.encode(r["answer"][:40], add_special_tokens=False)) for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = [ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in pairs]
    labels = [lab + [-100] * (width - len(lab)) for _, lab in pairs]
    mask = [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pairs]
    prompt = family.build_prompt_ids(tokenizer, tokenizer.encode("抽取：" + rows[0]["text"][:60],
                                                                 add_special_tokens=False))
    return input_ids, labels, mask, prompt


def fixture_texts():
    """Every string value of data/*.jsonl, then a few edge cases of the split pattern (spaces, newlines, emoji)."""
    import glob
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            texts += [v for line in f for v in json.loads(line).values() if isinstance(v, str)]
    return texts + ["Engine at 3000rpm  \n\n  idles", "😀 and 汽车", "  leading spaces", "tab\there\r\nCRLF",
                    "I'LL say we've 12345678"]


def ids_digest(lists_of_ids):
    import hashlib
    return hashlib.sha256(json.dumps(lists_of_ids).encode()).hexdigest()


def official_fixtures(folder, official_code):
    """Run THUDM's GLM-4 model and tokenizer files on the fixture folder (see the module's docstring)."""
    import importlib.util
    from transformers import AutoModelForCausalLM
    with open(os.path.join(folder, "golden.json")) as f:
        golden = json.load(f)
    with tempfile.TemporaryDirectory() as scratch:
        for name in os.listdir(folder):
            shutil.copy(os.path.join(folder, name), scratch)
        for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
            shutil.copy(os.path.join(official_code, name), scratch)
        model = AutoModelForCausalLM.from_pretrained(scratch, trust_remote_code=True, torch_dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        spec = importlib.util.spec_from_file_location("thudm_glm4_tokenizer",
                                                      os.path.join(scratch, "tokenization_chatglm.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tokenizer = module.ChatGLM4Tokenizer.from_pretrained(scratch)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(golden["input_ids"]), attention_mask=torch.tensor(golden["attention_mask"]),
                    labels=torch.tensor(golden["labels"]))
    generated = model.generate(torch.tensor([golden["generate_prompt"]]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None)
    texts = fixture_texts()
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    torch.save(out.logits.float(), os.path.join(folder, "official_logits.pt"))
    official = {"computed_by": "THUDM's glm-4-9b-chat modeling_chatglm.py / tokenization_chatglm.py (eager attention, "
                               "float32, CPU)", "transformers_version": __import__("transformers").__version__,
                "loss": out.loss.item(), "argmax": out.logits.argmax(-1).tolist(),
                "generate_output": generated[0].tolist(), "texts": len(texts), "text_ids_sha256": ids_digest(ids),
                "edge_text_ids": ids[-5:], "with_special_tokens": tokenizer.encode(texts[0])}
    with open(os.path.join(folder, "official.json"), "w") as f:
        json.dump(official, f)
    print(f"THUDM's GLM-4 outputs written to {folder} (loss {out.loss.item():.6f}, {len(texts)} texts tokenized)")


def greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):  # the whole sequence each step: no cache, nothing to get wrong
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "tests", "fixtures", "glm4", "base"))
    parser.add_argument("--official_code", default=None,
                        help="a folder with THUDM's GLM-4 .py files: only run them on the existing fixture folder")
    args = parser.parse_args()
    if args.official_code:
        return official_fixtures(args.output_dir, args.official_code)
    from tools.make_tiny_model import build_tiny_model
    with tempfile.TemporaryDirectory() as scratch:
        build_tiny_model(scratch, num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=96,
                         vocab_pieces=1200, weights_format="safetensors", shards=1, seed=1, family="glm4")
        os.makedirs(args.output_dir, exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(os.path.join(scratch, name), args.output_dir)
    model = hf_glm_model(args.output_dir)
    input_ids, labels, mask, prompt = golden_batch(args.output_dir)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    logits = out.logits.float()
    torch.save(logits, os.path.join(args.output_dir, "logits.pt"))
    golden = {"computed_by": "transformers GlmForCausalLM (eager attention, float32, CPU), weights renamed from "
                             "this folder's THUDM names", "transformers_version": __import__("transformers").__version__,
              "input_ids": input_ids, "labels": labels, "attention_mask": mask, "loss": out.loss.item(),
              "logits_shape": list(logits.shape), "argmax": logits.argmax(-1).tolist(),
              "generate_prompt": prompt, "generate_output": greedy(model, prompt, 12)}
    with open(os.path.join(args.output_dir, "golden.json"), "w") as f:
        json.dump(golden, f)
    print(f"GLM-4 fixtures written to {args.output_dir} (loss {out.loss.item():.6f})")


if __name__ == "__main__":
    main()
