"""The model-family seam: everything the suite knows about a particular model lives here.

A family names its model, config and tokenizer classes, the files of its folder, how a training row and a
generation prompt are laid out in tokens, and the parameter names that the fine-tuning methods touch. The
scripts ask `family_for(model_dir)` and never look at a model's internals themselves. Families served: ChatGLM-6B,
ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B (THUDM's folders), and GLM-4 in transformers' layout (glm-4-9b-chat-hf,
GLM-4-0414; modeling_glm4.py). Every family has every method and feature. Adding one means writing its layout functions and one `ModelFamily` entry in FAMILIES (its
`recognise` says which folders are its own).

Loading checks the folder first and fails with one line that names the path and what is wrong.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import PreTrainedTokenizerFast

from configuration_chatglm import ChatGLMConfig
from folders import ModelFolderError, read_config_json  # noqa: F401 (both are this seam's, too)
from configuration_chatglm2 import ChatGLMConfig as ChatGLM2Config
from modeling_chatglm import ChatGLMForConditionalGeneration
from modeling_chatglm import packed_row_inputs as chatglm6b_packed_row_inputs
from modeling_chatglm2 import ChatGLMForConditionalGeneration as ChatGLM2ForConditionalGeneration
from modeling_chatglm2 import packed_row_inputs as chatglm2_packed_row_inputs
from modeling_glm4 import Glm4ForCausalLM, Glm4SuiteConfig, GlmForCausalLM, GlmSuiteConfig
from tokenization_chatglm import ChatGLMTokenizer
from tokenization_chatglm2 import ChatGLMTokenizer as ChatGLM2Tokenizer
from tokenization_glm4 import ChatGLM4Tokenizer

# bitsandbytes (imported by PEFT, later) warns on every start, on CPUs with AVX-512 bf16, that an optional kernel
# package is not installed; nothing here uses that kernel
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    recognise: Callable  # (config.json as a dict, model folder) -> True when the folder holds this family
    config_class: type
    model_class: type
    tokenizer_class: type
    tokenizer_file: str
    layers_prefix: str  # parameter name prefix of layer N: layers_prefix.format(N)
    prompt_prefix: str  # parameter name prefix of the prompt (prefix) encoder
    lora_target: str  # default LoRA target modules
    build_training_ids: Callable  # (tokenizer, source_ids, answer_ids) -> (input_ids, labels)
    build_prompt_ids: Callable  # (tokenizer, source_ids) -> input_ids that generation continues
    # chat families only: (tokenizer, [(role, content_ids), ...]) -> (input_ids, labels) / prompt input_ids
    build_conversation_ids: Callable = None
    build_conversation_prompt: Callable = None
    tokenizer_kwargs: dict = field(default_factory=dict)
    stop_tokens: tuple = ()  # names of tokens that end an answer besides the eos token
    answer_text: Callable = str.strip  # generated text -> the answer
    # (one row's input_ids, model config) -> (position_ids, bool mask) of the row alone: for packing rows
    packed_row_inputs: Callable = None
    tokenizer_chat_template: bool = False  # chat prompts from the tokenizer's apply_chat_template
    architectures: tuple = ()  # config.json's `architectures` this family loads (empty: any)

    def num_layers(self, config):
        return getattr(config, "num_layers", None) or config.num_hidden_layers

    def layout_overhead(self, tokenizer):
        """Tokens the layout adds around a source and an answer (for length budgets)."""
        return len(self.build_training_ids(tokenizer, [], [])[0])

    def stop_token_ids(self, tokenizer):
        return [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in self.stop_tokens]


# ---- ChatGLM-6B: `prompt+text [gMASK] <sop> answer <eop>` ----------------------------------------------------------

def chatglm6b_training_ids(tokenizer, source_ids, answer_ids):
    """`source [gMASK] <sop> answer <eop>`; labels -100 on the context, from <sop> on the tokens themselves."""
    input_ids = list(source_ids) + [tokenizer.gmask_token_id, tokenizer.bos_token_id] + list(answer_ids) + \
        [tokenizer.eos_token_id]
    context = len(source_ids) + 1
    return input_ids, [-100] * context + input_ids[context:]


def chatglm6b_prompt_ids(tokenizer, source_ids):
    return list(source_ids) + [tokenizer.gmask_token_id, tokenizer.bos_token_id]


def is_chatglm6b(config, model_dir):
    return config.get("model_type") == "chatglm" and "padded_vocab_size" not in config


CHATGLM6B = ModelFamily(
    name="chatglm", recognise=is_chatglm6b, config_class=ChatGLMConfig,
    model_class=ChatGLMForConditionalGeneration, tokenizer_class=ChatGLMTokenizer, tokenizer_file="ice_text.model",
    layers_prefix="transformer.layers.{}.", prompt_prefix="transformer.prefix_encoder.",
    lora_target="query_key_value", build_training_ids=chatglm6b_training_ids,
    build_prompt_ids=chatglm6b_prompt_ids, packed_row_inputs=chatglm6b_packed_row_inputs,
)


# ---- ChatGLM2-6B: `[gMASK] sop prompt+text answer eos` ------------------------------------------------------------

def glm2_prefix(tokenizer):
    return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]


def chatglm2_training_ids(tokenizer, source_ids, answer_ids):
    """`[gMASK] sop source answer eos`; labels -100 on `[gMASK] sop source`, then the answer and eos."""
    context = glm2_prefix(tokenizer) + list(source_ids)
    input_ids = context + list(answer_ids) + [tokenizer.eos_token_id]
    return input_ids, [-100] * len(context) + input_ids[len(context):]


def chatglm2_prompt_ids(tokenizer, source_ids):
    return glm2_prefix(tokenizer) + list(source_ids)


def has_chatglm3_signs(config, model_dir):
    """ChatGLM3 shares ChatGLM2's config; its tokenizer files name the role tokens (or its name says so)."""
    if "chatglm3" in str(config.get("_name_or_path", "")).lower():
        return True
    for name in ("tokenizer_config.json", "tokenization_chatglm.py"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if "<|assistant|>" in text or "<|observation|>" in text or '"role_tokens": true' in text:
                return True
    return False


def is_chatglm2(config, model_dir):
    return config.get("model_type") == "chatglm" and "padded_vocab_size" in config and \
        not has_chatglm3_signs(config, model_dir) and not is_glm4(config, model_dir)


CHATGLM2 = ModelFamily(
    name="chatglm2", recognise=is_chatglm2, config_class=ChatGLM2Config, model_class=ChatGLM2ForConditionalGeneration,
    tokenizer_class=ChatGLM2Tokenizer, tokenizer_file="tokenizer.model", tokenizer_kwargs={"role_tokens": False},
    layers_prefix="transformer.encoder.layers.{}.", prompt_prefix="transformer.prefix_encoder.",
    lora_target="query_key_value", build_training_ids=chatglm2_training_ids, build_prompt_ids=chatglm2_prompt_ids,
    packed_row_inputs=chatglm2_packed_row_inputs,
)


# ---- ChatGLM3-6B: the chat layout `[gMASK] sop <|user|>\n prompt+text <|assistant|>\n answer eos` ----------------

def role_turn_ids(prefix, header_of, turns, end_id):
    """`prefix`, each turn as `header_of(role)` + content, then `end_id`. As in the official fine-tuning, a token is
    learned when the token before it belongs to an assistant turn: the assistant's metadata line and content, and
    whatever follows it (the next role token, or the end)."""
    input_ids, after_assistant = list(prefix), [False] * len(prefix)
    for role, content_ids in turns:
        turn = header_of(role) + list(content_ids)
        input_ids += turn
        after_assistant += [role == "assistant"] * len(turn)
    input_ids.append(end_id)
    labels = [-100] + [t if learned else -100 for t, learned in zip(input_ids[1:], after_assistant)]
    return input_ids, labels


def role_prompt_ids(prefix, header_of, turns, assistant_id):
    """The turns so far, then the assistant's role token: generation writes the metadata line and the answer."""
    input_ids = list(prefix)
    for role, content_ids in turns:
        input_ids += header_of(role) + list(content_ids)
    return input_ids + [assistant_id]


def chatglm3_conversation_ids(tokenizer, turns, end_id=None):
    """`[gMASK] sop` and each turn as `<|role|>\n content`, then eos (or `end_id`)."""
    return role_turn_ids(glm2_prefix(tokenizer), tokenizer.role_header_ids, turns,
                         tokenizer.eos_token_id if end_id is None else end_id)


def chatglm3_conversation_prompt(tokenizer, turns):
    return role_prompt_ids(glm2_prefix(tokenizer), tokenizer.role_header_ids, turns,
                           tokenizer.get_command("<|assistant|>"))


def chatglm3_training_ids(tokenizer, source_ids, answer_ids):
    return chatglm3_conversation_ids(tokenizer, [("user", source_ids), ("assistant", answer_ids)])


def chatglm3_prompt_ids(tokenizer, source_ids):
    return chatglm3_conversation_prompt(tokenizer, [("user", source_ids)])


def chatglm3_answer_text(text):
    """Drop the (empty) metadata line the assistant turn starts with, as the official chat does."""
    metadata, newline, content = text.partition("\n")
    return content.strip() if newline and not metadata.strip() else text.strip()


def is_chatglm3(config, model_dir):
    return config.get("model_type") == "chatglm" and "padded_vocab_size" in config and \
        has_chatglm3_signs(config, model_dir) and not is_glm4(config, model_dir)


CHATGLM3 = ModelFamily(
    name="chatglm3", recognise=is_chatglm3, config_class=ChatGLM2Config, model_class=ChatGLM2ForConditionalGeneration,
    tokenizer_class=ChatGLM2Tokenizer, tokenizer_file="tokenizer.model", tokenizer_kwargs={"role_tokens": True},
    layers_prefix="transformer.encoder.layers.{}.", prompt_prefix="transformer.prefix_encoder.",
    lora_target="query_key_value", build_training_ids=chatglm3_training_ids, build_prompt_ids=chatglm3_prompt_ids,
    build_conversation_ids=chatglm3_conversation_ids, build_conversation_prompt=chatglm3_conversation_prompt,
    stop_tokens=("<|user|>", "<|observation|>"), answer_text=chatglm3_answer_text,
    packed_row_inputs=chatglm2_packed_row_inputs,
)



# ---- GLM-4-9B (THUDM's folder): ChatGLM3's model with rope_ratio, a tiktoken BPE, turns ended by <|user|> --------

def glm4_conversation_ids(tokenizer, turns):
    """ChatGLM3's layout (`[gMASK]<sop>`, each turn `<|role|>\n content`), ended by `<|user|>` as THUDM's GLM-4
    fine-tuning ends a conversation ("EOS for chat": the chat model stops at the next user turn)."""
    return chatglm3_conversation_ids(tokenizer, turns, end_id=tokenizer.get_command("<|user|>"))


def glm4_training_ids(tokenizer, source_ids, answer_ids):
    return glm4_conversation_ids(tokenizer, [("user", source_ids), ("assistant", answer_ids)])


def is_glm4(config, model_dir):
    """GLM-4 shares ChatGLM2's config fields; its tokenizer is ChatGLM4Tokenizer (tiktoken), its vocabulary 151,552."""
    if config.get("model_type") != "chatglm" or "padded_vocab_size" not in config:
        return False
    if config.get("padded_vocab_size") == 151552 or "glm-4" in str(config.get("_name_or_path", "")).lower():
        return True
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return "ChatGLM4Tokenizer" in f.read()
    return False


GLM4 = ModelFamily(
    name="glm4", recognise=is_glm4, config_class=ChatGLM2Config, model_class=ChatGLM2ForConditionalGeneration,
    tokenizer_class=ChatGLM4Tokenizer, tokenizer_file="tokenizer.model",
    layers_prefix="transformer.encoder.layers.{}.", prompt_prefix="transformer.prefix_encoder.",
    lora_target="query_key_value", build_training_ids=glm4_training_ids, build_prompt_ids=chatglm3_prompt_ids,
    build_conversation_ids=glm4_conversation_ids, build_conversation_prompt=chatglm3_conversation_prompt,
    stop_tokens=("<|user|>", "<|observation|>"), answer_text=chatglm3_answer_text,
    packed_row_inputs=chatglm2_packed_row_inputs,
)



# ---- GLM-4 in transformers' layout (glm-4-9b-chat-hf, GLM-4-0414): GLM-4's chat markers, a tokenizer.json ------

def native_token(tokenizer, name):
    return tokenizer.convert_tokens_to_ids(name)


def native_prefix(tokenizer):
    return [native_token(tokenizer, "[gMASK]"), native_token(tokenizer, "<sop>")]


def native_header(tokenizer):
    newline = tokenizer.encode("\n", add_special_tokens=False)
    return lambda role: [native_token(tokenizer, f"<|{role}|>")] + newline


def native_conversation_ids(tokenizer, turns):
    """What the tokenizer's chat template writes (`[gMASK]<sop>`, each turn `<|role|>\n content`), ended by
    `<|user|>` as THUDM's GLM-4 fine-tuning does."""
    return role_turn_ids(native_prefix(tokenizer), native_header(tokenizer), turns, native_token(tokenizer, "<|user|>"))


def native_conversation_prompt(tokenizer, turns):
    return role_prompt_ids(native_prefix(tokenizer), native_header(tokenizer), turns,
                           native_token(tokenizer, "<|assistant|>"))


def native_training_ids(tokenizer, source_ids, answer_ids):
    return native_conversation_ids(tokenizer, [("user", source_ids), ("assistant", answer_ids)])


def native_prompt_ids(tokenizer, source_ids):
    return native_conversation_prompt(tokenizer, [("user", source_ids)])


def transformers_layout_family(name, model_type, model_class, config_class):
    return ModelFamily(
        name=name, recognise=lambda config, model_dir: config.get("model_type") == model_type,
        config_class=config_class, model_class=model_class, tokenizer_class=PreTrainedTokenizerFast,
        tokenizer_file="tokenizer.json", layers_prefix="model.layers.{}.", prompt_prefix="model.prefix_encoder.",
        lora_target="q_proj,k_proj,v_proj", build_training_ids=native_training_ids,
        build_prompt_ids=native_prompt_ids, build_conversation_ids=native_conversation_ids,
        build_conversation_prompt=native_conversation_prompt, stop_tokens=("<|user|>", "<|observation|>"),
        answer_text=chatglm3_answer_text, packed_row_inputs=chatglm2_packed_row_inputs,
        tokenizer_chat_template=True, architectures=(model_class.__name__,))


GLM4_HF = transformers_layout_family("glm4-hf", "glm", GlmForCausalLM, GlmSuiteConfig)
GLM4_0414 = transformers_layout_family("glm4-0414", "glm4", Glm4ForCausalLM, Glm4SuiteConfig)

FAMILIES = {f.name: f for f in [CHATGLM6B, CHATGLM2, CHATGLM3, GLM4, GLM4_HF, GLM4_0414]}
SERVED = ("served: ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B in THUDM's layout (model_type chatglm), "
          "glm-4-9b-chat-hf (glm: GlmForCausalLM), GLM-4-0414 (glm4: Glm4ForCausalLM)")


def family_for(model_dir, mode=None):
    """The family of a model folder, read from its config.json and tokenizer files (or forced by `mode`)."""
    if mode:
        if mode not in FAMILIES:
            raise ModelFolderError(f"--mode {mode}: unknown model family; known: {', '.join(FAMILIES)}")
        return FAMILIES[mode]
    config = read_config_json(model_dir)
    path = os.path.join(model_dir, "config.json")
    for family in FAMILIES.values():
        if family.recognise(config, model_dir):
            other = [a for a in config.get("architectures") or [] if family.architectures and
                     a not in family.architectures]
            if other:
                raise ModelFolderError(f"{path}: architecture {other[0]} is not served (model_type "
                                       f"{config.get('model_type')!r}: {', '.join(family.architectures)}); "
                                       f"{SERVED}")
            return family
    raise ModelFolderError(f"{path}: model_type {config.get('model_type')!r} is not a model this suite serves; "
                           f"{SERVED}; --mode forces a family")


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
        return family.tokenizer_class.from_pretrained(model_dir, **family.tokenizer_kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise ModelFolderError(str(err)) from None


def folder_quantization_bit(model_dir):
    """The bits of a pre-quantized folder (THUDM's chatglm-6b-int4 etc., or tools/quantize_model.py's), else 0."""
    return int(read_config_json(model_dir).get("quantization_bit") or 0)


def load_model(model_dir, family=None, dtype=torch.float32, quantization_bit=0, keep_float=(), device=None,
               bnb_quantization=None, **config_overrides):
    """The model with its weights; `config_overrides` (e.g. pre_seq_len) add modules the checkpoint lacks.

    `quantization_bit` 8 or 4 quantizes the blocks' linears as THUDM's `model.half().quantize(bits)` does (on
    `device` when given: faster on a GPU), except the modules whose names contain a string of `keep_float`; a
    pre-quantized folder loads as it is. `bnb_quantization` "nf4" or "int8" uses bitsandbytes' layers instead."""
    from quantization import bnb_quantize_model, check_bits, quantize_model
    family = family or family_for(model_dir)
    check_weight_files(model_dir)
    prequantized = folder_quantization_bit(model_dir)
    if quantization_bit:
        try:
            check_bits(quantization_bit)
        except ValueError as err:
            raise ModelFolderError(str(err)) from None
        if prequantized and prequantized != quantization_bit:
            raise ModelFolderError(f"{model_dir}: already quantized to {prequantized} bits (its config.json); "
                                   f"--quantization_bit {quantization_bit} needs the float folder")
    if bnb_quantization and (quantization_bit or prequantized):
        raise ModelFolderError(f"{model_dir}: --quantization {bnb_quantization} quantizes a float folder; it does not "
                               "combine with --quantization_bit or a pre-quantized folder")
    if prequantized and keep_float:
        raise ModelFolderError(f"{model_dir}: pre-quantized to {prequantized} bits, so the layers to train are not "
                               "in full precision: start from the float folder with --quantization_bit")
    quantize_here = quantization_bit and not prequantized
    # THUDM quantizes the fp16 weights: load them in fp16 (fp32 for an fp32 run), quantize, then cast the rest
    model = load_weights(model_dir, family, (torch.float32 if dtype == torch.float32 else torch.float16)
                         if quantize_here else dtype, config_overrides)
    if quantize_here:
        quantize_model(model, quantization_bit, keep=keep_float, device=device)
        model.to(dtype)
    if bnb_quantization:
        try:
            bnb_quantize_model(model, bnb_quantization, dtype, keep=keep_float, device=device)
        except ValueError as err:
            raise ModelFolderError(str(err)) from None
    return model


def load_weights(model_dir, family, dtype, config_overrides):
    from transformers.utils import logging as transformers_logging
    verbosity = transformers_logging.get_verbosity()
    # transformers' load report would call the prompt encoder a checkpoint lacks "newly initialized ... Consider
    # training" before the predict script loads it: what is missing is checked below and said in one line instead
    transformers_logging.set_verbosity_error()
    try:
        config = family.config_class.from_pretrained(model_dir, **config_overrides)
        model, info = family.model_class.from_pretrained(model_dir, config=config, dtype=dtype,
                                                         output_loading_info=True)
    except (ValueError, RuntimeError) as err:  # a setting this model cannot take, weights of another shape
        raise ModelFolderError(f"{model_dir}: {str(err).splitlines()[0]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
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
