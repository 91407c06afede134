"""Quantize a ChatGLM folder once and save it THUDM's pre-quantized way (like chatglm-6b-int4), to load 4 GB, not 12.

    python tools/quantize_model.py --model_dir ChatGLM-6B --quantization_bit 4 --output_dir ChatGLM-6B-int4

The output folder holds config.json with `quantization_bit`, each block linear as an int8 `...weight` (INT4: two
values packed per byte) with an fp16 `...weight_scale` per output row, everything else in fp16, and the input folder's
other files (tokenizer, THUDM's .py files). Every script of the suite loads it as it is (`--model_dir`); the values
equal what `--quantization_bit` computes at load time, and what THUDM's `model.half().quantize(bits)` computes.
Quantizing runs on the GPU when there is one (seconds), else on the CPU (minutes for 6B).
"""
import argparse
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from folders import readable_by_others  # noqa: E402
from model_family import ModelFolderError, family_for, folder_quantization_bit, load_model  # noqa: E402

WEIGHT_FILES = ("pytorch_model", "model.safetensors", "model-0")


def quantize_folder(model_dir, bits, output_dir, device=None):
    """Write the quantized folder (into a temporary folder renamed when complete); returns the model."""
    family = family_for(model_dir)
    if folder_quantization_bit(model_dir):
        raise ModelFolderError(f"{model_dir}: already quantized to {folder_quantization_bit(model_dir)} bits; "
                               "quantize the float folder")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ModelFolderError(f"{output_dir}: exists and is not empty; choose a new --output_dir")
    model = load_model(model_dir, family, dtype=torch.float16, quantization_bit=bits, device=device)
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(model_dir):  # tokenizer, THUDM's code files, generation config: all but the weights
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and not name.startswith(WEIGHT_FILES) and name != "config.json":
            shutil.copy(path, tmp)
    model.config.torch_dtype = "float16"
    model.to("cpu").save_pretrained(tmp, safe_serialization=True)
    readable_by_others(tmp)
    if os.path.isdir(output_dir):
        os.rmdir(output_dir)
    os.replace(tmp, output_dir)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a float ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folder")
    parser.add_argument("--quantization_bit", type=int, choices=[8, 4], required=True)
    parser.add_argument("--output_dir", required=True, help="the new folder (must not exist, or be empty)")
    parser.add_argument("--device", default=None, help="where to quantize: cpu, or a GPU index (default: GPU 0 "
                        "if there is one)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.device == "cpu" or not torch.cuda.is_available() else
                          f"cuda:{args.device or 0}")
    try:
        quantize_folder(args.model_dir, args.quantization_bit, args.output_dir, device)
    except ModelFolderError as err:
        raise SystemExit(f"error: {err}")
    size = sum(os.path.getsize(os.path.join(args.output_dir, n)) for n in os.listdir(args.output_dir))
    print(f"wrote {args.output_dir}: INT{args.quantization_bit}, {size / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
