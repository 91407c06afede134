"""Turn a checkpoint into a complete model folder that vLLM, SGLang, TGI, transformers and llama.cpp's converter load.

    python tools/export_model.py --checkpoint output_dir_lora --output_dir glm4-spo            # LoRA merged
    python tools/export_model.py --checkpoint output_dir_lora --output_dir glm4-spo-int4 --quantization_bit 4
    python tools/export_model.py --checkpoint output_dir_lora --output_dir spo-adapter --format lora

A LoRA checkpoint's adapters are merged into the weights, a Freeze checkpoint's trained layers laid over the base,
a full fine-tuning checkpoint taken as it is. The folder is in the base's own layout, names and config: THUDM's
for ChatGLM-6B / ChatGLM2/3 / glm-4-9b folders (config.json's `auto_map` and the base's .py files kept: load them
with trust_remote_code), transformers' for glm-4-9b-chat-hf / GLM-4-0414 (AutoModelForCausalLM loads them as they
are). It holds config.json, generation_config.json, the tokenizer files and chat template, sharded safetensors with
their index (every tensor name and shape the base has), and a README.md saying what it was trained from. No
optimizer state, and no pickle, goes into it.

`--quantization_bit 4|8` writes THUDM's pre-quantized layout (what tools/quantize_model.py writes) of the merged
weights: the folder for small cards. `--format lora` writes only the adapter (PEFT's adapter_config.json and
adapter_model.safetensors): what `vllm serve BASE --enable-lora --lora-modules NAME=FOLDER` loads for ChatGLM2/3,
GLM-4 and the transformers-layout folders. P-Tuning cannot be merged (its prefix is keys and values, not a change
of weights): predict_pt.py, chat.py and serve.py load it, tools/export_checkpoint.py writes THUDM's form.

The folder is written under a temporary name and renamed when complete; a folder that exists is refused unless
--overwrite; the free disk space is checked first; the base must be the one the checkpoint was trained on (its
config.json and weights' names and shapes, recorded at training time).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import (CheckpointError, checked_checkpoint, fingerprint_changes, latest_checkpoint,  # noqa: E402
                         saved_training_args, trained_base, weight_shapes)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
WEIGHT_FILES = ("pytorch_model", "model.safetensors", "model-0", "model.safetensors.index.json")
NOT_COPIED = ("config.json", "README.md", "training_args.json", "metrics.jsonl", "latest", ".run.lock")


class ExportError(Exception):
    """A checkpoint, base or output folder this tool cannot use; the message says why in one line."""


def say(message):
    print(message, flush=True)


def suite_version():
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ---- what is exported, from what -------------------------------------------------------------------------------------

def inputs_of(checkpoint_arg, base_arg):
    """(checkpoint folder, its training args, the base folder), checked."""
    if not os.path.isdir(checkpoint_arg):
        raise ExportError(f"{checkpoint_arg}: checkpoint folder not found")
    checkpoint = latest_checkpoint(checkpoint_arg) or checkpoint_arg
    try:
        saved = saved_training_args(checked_checkpoint(checkpoint))
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    method = saved.get("method")
    if method is None:
        raise ExportError(f"{checkpoint}: no training_args.json; not a checkpoint of the finetuning scripts")
    if method == "pt":
        raise ExportError(f"{checkpoint}: a P-Tuning checkpoint cannot be merged into the weights (its prefix is "
                          "per-layer keys and values, not a change of any weight): predict_pt.py, chat.py and "
                          "serve.py load it as it is; tools/export_checkpoint.py writes THUDM's P-Tuning v2 form")
    try:
        base = trained_base(checkpoint, saved, base_arg)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    changed = fingerprint_changes(saved.get("base_fingerprint"), base)
    if changed:
        raise ExportError(f"{base}: not the base {checkpoint} was trained on ({' and '.join(changed)} changed since); "
                          "pass the right one with --ori_model_dir")
    from model_family import folder_quantization_bit
    if folder_quantization_bit(base) and method != "full":
        raise ExportError(f"{base}: a pre-quantized folder; merging needs the float weights: pass the float base "
                          "with --ori_model_dir")
    return checkpoint, saved, base


def check_output(output_dir, overwrite, needed_bytes):
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(f"{output_dir}: exists and is not empty; choose another --output_dir or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ExportError(f"{parent}: {free / 2 ** 30:.1f} GiB free, the export needs about "
                          f"{needed_bytes / 2 ** 30:.1f} GiB; nothing was written")


def export_dtype(arg, base):
    """--dtype, else the base's own (its config.json's torch_dtype), fp16 where it names none."""
    if arg:
        return DTYPES[arg]
    with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    named = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    return named.get(config.get("torch_dtype") or config.get("dtype"), torch.float16)


def merged_model(checkpoint, saved, base, dtype):
    """The base with what the checkpoint trained applied, in `dtype` (one copy of the model in memory)."""
    from model_family import family_for, load_model
    from prediction import load_partial_state
    method = saved["method"]
    if method == "full":
        return load_model(checkpoint, family_for(checkpoint, saved.get("mode")), dtype=dtype)
    family = family_for(base, saved.get("mode"))
    model = load_model(base, family, dtype=dtype)
    if method == "lora":
        from peft import PeftModel
        return PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    load_partial_state(model, checkpoint)
    return model


# ---- writing ---------------------------------------------------------------------------------------------------------

def parse_size(text):
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    number = text.upper().strip()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if number.endswith(unit):
            return int(float(number[:-len(unit)]) * factor)
    return int(number)


def write_shards(state, names, folder, max_shard_bytes):
    """`names` of `state` as safetensors shards of at most `max_shard_bytes` (a larger tensor gets one of its own),
    with model.safetensors.index.json; a tensor sharing memory with one written before is copied (safetensors
    stores no shared tensors)."""
    from safetensors.torch import save_file
    groups, size = [[]], 0
    for name in names:
        tensor_bytes = state[name].numel() * state[name].element_size()
        if groups[-1] and size + tensor_bytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += tensor_bytes
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    seen = set()
    for number, (file, group) in enumerate(zip(files, groups), 1):
        shard = {}
        for name in group:
            tensor = state[name].detach().contiguous()
            if tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            shard[name] = tensor
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        say(f"  wrote {file} ({number}/{len(files)})")
    total = sum(state[n].numel() * state[n].element_size() for n in names)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {n: file for file, group in zip(files, groups) for n in group}}, f, indent=2)


def base_tensors(base, names):
    """Tensors the base folder holds that the model does not (THUDM's stored rotary frequencies)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(base, "model*.safetensors"))):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            found.update({n: f.get_tensor(n) for n in f.keys() if n in names})
    for path in sorted(glob.glob(os.path.join(base, "pytorch_model*.bin"))):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        found.update({n: state[n].clone() for n in names if n in state})
    return found


def copy_folder_files(base, folder):
    """The base's files besides weights and config: tokenizer, chat template, generation config, THUDM's code."""
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if os.path.isfile(path) and not name.startswith(WEIGHT_FILES) and name not in NOT_COPIED:
            shutil.copy(path, folder)


def write_config(base, folder, dtype, checkpoint, saved):
    with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    config.pop("dtype", None)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        generation = {key: config[key] for key in ("eos_token_id", "pad_token_id", "bos_token_id") if key in config}
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)


def write_readme(folder, checkpoint, saved, base, what):
    steps = os.path.basename(os.path.normpath(checkpoint)).replace("checkpoint-", "")
    lines = [f"# {os.path.basename(os.path.normpath(folder))}", "",
             f"Exported by chatglm-finetuning ({suite_version()}) with `tools/export_model.py` on "
             f"{time.strftime('%Y-%m-%d')}: {what}.", "",
             f"- base model: `{os.path.abspath(base)}`",
             f"- method: {saved['method']}" + (f" (r {saved.get('lora_r')}, alpha {saved.get('lora_alpha')}, on "
                                                f"{saved.get('lora_target') or 'the family default'})"
                                                if saved["method"] == "lora" else ""),
             f"- training data: `{saved.get('train_path')}`, {saved.get('num_train_epochs')} epochs, "
             f"checkpoint at step {steps}",
             f"- prompt: {json.dumps(saved.get('prompt_text', ''), ensure_ascii=False)} (rows were laid out as "
             "`--prompt_text` + text; prompt a deployed model the same way)",
             f"- trained with `--max_len {saved.get('max_len')} --max_src_len {saved.get('max_src_len')}`, "
             f"{saved.get('precision')}"]
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def replace_folder(tmp, output_dir):
    from folders import readable_by_others
    readable_by_others(tmp)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def export_merged(checkpoint, saved, base, output_dir, dtype, max_shard_bytes):
    start = time.time()
    say(f"loading {base} and applying {checkpoint} ({saved['method']}) in {DTYPE_NAMES[dtype]}")
    model = merged_model(checkpoint, saved, base, dtype)
    state = model.state_dict()
    shapes = weight_shapes(checkpoint if saved["method"] == "full" else base)
    missing = [n for n in shapes if n not in state]
    state.update(base_tensors(base if saved["method"] != "full" else checkpoint, set(missing)))
    unknown = [n for n in shapes if n not in state]
    if unknown:
        raise ExportError(f"the model has no tensor for {unknown[:4]} of the base folder")
    wrong = [f"{n} {list(state[n].shape)} vs {shapes[n]}" for n in shapes if list(state[n].shape) != shapes[n]]
    if wrong:
        raise ExportError(f"shapes differ from the base folder's: {wrong[:3]}")
    for name in shapes:
        if state[name].is_floating_point() and state[name].dtype != dtype and "inv_freq" not in name:
            state[name] = state[name].to(dtype)
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        say(f"writing {len(shapes)} tensors into {tmp}")
        write_shards(state, list(shapes), tmp, max_shard_bytes)
        copy_folder_files(base, tmp)
        write_config(checkpoint if saved["method"] == "full" else base, tmp, dtype, checkpoint, saved)
        what = {"lora": "the LoRA adapters merged into the base's weights", "freeze": "the trained layers over the "
                "base's others", "full": "every weight, fine-tuned"}[saved["method"]] + f", {DTYPE_NAMES[dtype]}"
        write_readme(tmp, checkpoint, saved, base, what)
        replace_folder(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {output_dir} in {time.time() - start:.0f} s")


def export_quantized(checkpoint, saved, base, output_dir, bits, max_shard_bytes):
    """The fp16 merged folder, then tools/quantize_model.py's quantization of it: THUDM's rule is stated on fp16
    weights, and the result is then exactly what quantizing that folder gives."""
    from tools.quantize_model import quantize_folder
    merged = output_dir.rstrip("/") + ".float16.tmp"
    shutil.rmtree(merged, ignore_errors=True)
    try:
        export_merged(checkpoint, saved, base, merged, torch.float16, max_shard_bytes)
        say(f"quantizing to INT{bits}")
        tmp = output_dir.rstrip("/") + ".quantized.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        quantize_folder(merged, bits, tmp, torch.device("cuda") if torch.cuda.is_available() else None)
        with open(os.path.join(merged, "README.md"), encoding="utf-8") as f:
            readme = f.read().replace(", float16.", f", then quantized to INT{bits} in THUDM's format "
                                                   "(tools/quantize_model.py).")
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        replace_folder(tmp, output_dir)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    say(f"wrote {output_dir}")


def export_lora(checkpoint, saved, base, output_dir):
    """PEFT's two files and a README: the adapter vLLM's --lora-modules (and PEFT) load."""
    if saved["method"] != "lora":
        raise ExportError(f"{checkpoint}: --format lora needs a LoRA checkpoint, not {saved['method']}")
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(checkpoint, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["base_model_name_or_path"] = os.path.abspath(base)
    with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(checkpoint, "adapter_model.safetensors"), tmp)
    write_readme(tmp, checkpoint, saved, base, "the LoRA adapter alone (PEFT's files); serve it over the base with "
                 "`vllm serve BASE --enable-lora --lora-modules NAME=THIS_FOLDER`")
    replace_folder(tmp, output_dir)
    say(f"wrote {output_dir}")


def size_needed(checkpoint, saved, base, dtype, bits, fmt):
    if fmt == "lora":
        return os.path.getsize(os.path.join(checkpoint, "adapter_model.safetensors")) + (1 << 20)
    source = checkpoint if saved["method"] == "full" else base
    elements = sum(torch.Size(s).numel() for s in weight_shapes(source).values())
    float_bytes = elements * (2 if bits else torch.tensor([], dtype=dtype).element_size())
    return int(float_bytes * (1 + (1.0 if bits else 0.0)) * 1.02) + (64 << 20)  # quantized: the fp16 one first


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a training output folder (its "
                        "latest checkpoint)")
    parser.add_argument("--output_dir", required=True, help="the folder to write")
    parser.add_argument("--ori_model_dir", default=None, help="the base model folder (default: the one the "
                        "checkpoint names)")
    parser.add_argument("--format", choices=["merged", "lora"], default="merged",
                        help="merged: a whole model folder; lora: the adapter alone (vLLM's --lora-modules form)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="the weights' type (default: the base's own; fp32 for checks)")
    parser.add_argument("--quantization_bit", type=int, choices=[8, 4], default=None,
                        help="write THUDM's pre-quantized INT8/INT4 layout of the merged weights")
    parser.add_argument("--max_shard_size", default="4GB", help="largest safetensors file (e.g. 4GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output_dir that exists")
    args = parser.parse_args(argv)
    try:
        checkpoint, saved, base = inputs_of(args.checkpoint, args.ori_model_dir)
        if args.quantization_bit and (args.format == "lora" or args.dtype):
            raise ExportError("--quantization_bit writes the merged weights in THUDM's INT8/INT4 layout: it takes "
                              "neither --format lora nor --dtype")
        dtype = export_dtype(args.dtype, base)
        check_output(args.output_dir, args.overwrite,
                     size_needed(checkpoint, saved, base, dtype, args.quantization_bit, args.format))
        if args.format == "lora":
            export_lora(checkpoint, saved, base, args.output_dir)
        elif args.quantization_bit:
            export_quantized(checkpoint, saved, base, args.output_dir, args.quantization_bit,
                             parse_size(args.max_shard_size))
        else:
            export_merged(checkpoint, saved, base, args.output_dir, dtype, parse_size(args.max_shard_size))
    except ExportError as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:
        raise SystemExit(f"error: writing {args.output_dir}: {err.strerror or err}; nothing was left half "
                         "written") from None


if __name__ == "__main__":
    main()
