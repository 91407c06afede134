"""The model-family seam: everything the suite knows about a particular model lives here.

A family names its model, config and tokenizer classes, the files of its folder, how a training row and a
generation prompt are laid out in tokens, and the parameter names that the fine-tuning methods touch. The
scripts ask `family_for(model_dir)` and never look at a model's internals themselves. Adding a family (ChatGLM2,
ChatGLM3, ...) means adding one `ModelFamily` below.

Loading checks the folder first and fails with one line that names the path and what is wrong.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from configuration_chatglm import ChatGLMConfig
from modeling_chatglm import ChatGLMForConditionalGeneration
from tokenization_chatglm import ChatGLMTokenizer


class ModelFolderError(ValueError):
    """A model folder that cannot be used; the message names the path."""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_type: str  # the `model_type` of its config.json
    config_class: type
    model_class: type
    tokenizer_class: type
    tokenizer_file: str
    layers_prefix: str  # parameter name prefix of layer N: layers_prefix.format(N)
    prompt_prefix: str  # parameter name prefix of the prompt (prefix) encoder
    lora_target: str  # default LoRA target modules
    build_training_ids: Callable  # (tokenizer, source_ids, answer_ids) -> (input_ids, labels)
    build_prompt_ids: Callable  # (tokenizer, source_ids) -> input_ids that generation continues
    special_tokens: int  # tokens the layout adds around source and answer (for length budgets)

    def num_layers(self, config):
        return config.num_layers

    def stop_token_ids(self, tokenizer):
        return [tokenizer.eos_token_id]


def chatglm6b_training_ids(tokenizer, source_ids, answer_ids):
    """`source [gMASK] <sop> answer <eop>`; labels -100 on the context, from <sop> on the tokens themselves."""
    input_ids = list(source_ids) + [tokenizer.gmask_token_id, tokenizer.bos_token_id] + list(answer_ids) + \
        [tokenizer.eos_token_id]
    context = len(source_ids) + 1
    return input_ids, [-100] * context + input_ids[context:]


def chatglm6b_prompt_ids(tokenizer, source_ids):
    return list(source_ids) + [tokenizer.gmask_token_id, tokenizer.bos_token_id]


CHATGLM6B = ModelFamily(
    name="chatglm", model_type="chatglm", config_class=ChatGLMConfig,
    model_class=ChatGLMForConditionalGeneration, tokenizer_class=ChatGLMTokenizer, tokenizer_file="ice_text.model",
    layers_prefix="transformer.layers.{}.", prompt_prefix="transformer.prefix_encoder.",
    lora_target="query_key_value", build_training_ids=chatglm6b_training_ids,
    build_prompt_ids=chatglm6b_prompt_ids, special_tokens=3,
)

FAMILIES = {f.name: f for f in [CHATGLM6B]}


def read_config_json(model_dir):
    if not os.path.isdir(model_dir):
        raise ModelFolderError(f"{model_dir}: model folder not found")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: missing; a model folder holds config.json, the tokenizer and the weights")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None


def family_for(model_dir, mode=None):
    """The family of a model folder, read from its config.json (or forced by `mode`)."""
    if mode:
        if mode not in FAMILIES:
            raise ModelFolderError(f"--mode {mode}: unknown model family; known: {', '.join(FAMILIES)}")
        return FAMILIES[mode]
    config = read_config_json(model_dir)
    model_type = config.get("model_type")
    if model_type == "chatglm" and "padded_vocab_size" in config:  # ChatGLM2/3 share the model_type
        raise ModelFolderError(f"{os.path.join(model_dir, 'config.json')}: a ChatGLM2/ChatGLM3 model; "
                               "modeling_chatglm2.py computes it, but the fine-tuning and predict scripts serve "
                               "ChatGLM-6B only so far")
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise ModelFolderError(f"{os.path.join(model_dir, 'config.json')}: model_type {model_type!r} is not a model "
                           f"this suite serves (expected one of: {', '.join(f.model_type for f in FAMILIES.values())})")


def check_weight_files(model_dir):
    """Raise unless the folder holds complete weights: one file, or every shard its index names."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(model_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
            if missing:
                raise ModelFolderError(f"{model_dir}: partial download, {len(missing)} of {len(shards)} weight "
                                       f"shards missing: {', '.join(missing)}")
            return
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in ("model.safetensors", "pytorch_model.bin")):
        raise ModelFolderError(f"{model_dir}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def load_tokenizer(model_dir, family=None):
    family = family or family_for(model_dir)
    path = os.path.join(model_dir, family.tokenizer_file)
    if not os.path.isfile(path):
        raise ModelFolderError(f"{path}: tokenizer model missing")
    try:
        return family.tokenizer_class.from_pretrained(model_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ModelFolderError(str(err)) from None


def load_model(model_dir, family=None, dtype=torch.float32, **config_overrides):
    """The model with its weights; `config_overrides` (e.g. pre_seq_len) add modules the checkpoint lacks."""
    family = family or family_for(model_dir)
    check_weight_files(model_dir)
    config = family.config_class.from_pretrained(model_dir, **config_overrides)
    model, info = family.model_class.from_pretrained(model_dir, config=config, dtype=dtype, output_loading_info=True)
    new_modules = (family.prompt_prefix,) if config_overrides.get("pre_seq_len") else ()
    missing = [k for k in info["missing_keys"] if not k.startswith(new_modules)]
    unexpected = list(info["unexpected_keys"])
    mismatched = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise ModelFolderError(f"{model_dir}: weights do not match the {family.name} model: "
                               f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                               f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                               + (f"; shape mismatch {mismatched[:4]}" if mismatched else ""))
    return model
