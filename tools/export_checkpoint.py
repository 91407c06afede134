"""Write a checkpoint's trained weights in the form THUDM's own code reads: `pytorch_model.bin` (a torch.save'd dict).

    python tools/export_checkpoint.py --model_dir output_dir_pt            # the run's latest checkpoint, in place
    python tools/export_checkpoint.py --model_dir output_dir_pt/checkpoint-3600 --output_dir for_thudm/

Our checkpoints keep the trained tensors in safetensors. THUDM's P-Tuning v2 recipe (ptuning/main.py, web_demo.py)
loads `pytorch_model.bin` from the checkpoint folder and takes the `transformer.prefix_encoder.*` tensors from it,
with `pre_seq_len` (and `prefix_projection`) from the checkpoint's config.json; a Freeze checkpoint's
`pytorch_model.bin` holds the trained layers under the official names (`model.load_state_dict(state, strict=False)`);
a LoRA checkpoint also gets `adapter_model.bin` for PEFT versions older than safetensors support. The tensors are
the same, name for name, dtype for dtype; nothing in the checkpoint is changed or removed. With --output_dir the
checkpoint folder is copied there first, without what only --resume reads (`ds_state/`, the optimizer shards and
random states).
"""
import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints import CheckpointError, checked_checkpoint, latest_checkpoint  # noqa: E402

# what only --resume reads (optimizer and random states: DeepSpeed's are pickles), never copied into an export
RESUME_ONLY = ("ds_state", "rng_state_*", "optimizer_shard_*", "*.tmp")
# safetensors file of our checkpoints -> the file THUDM's code (or an older PEFT) reads
THUDM_NAMES = {"model.safetensors": "pytorch_model.bin", "adapter_model.safetensors": "adapter_model.bin"}


def export_checkpoint(model_dir, output_dir=None):
    """Write the .bin form of each trained-weights file of a checkpoint; returns the paths written."""
    folder = latest_checkpoint(model_dir) or model_dir
    try:
        checked_checkpoint(folder)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    present = [name for name in THUDM_NAMES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise SystemExit(f"error: {folder}: no model.safetensors or adapter_model.safetensors; not a checkpoint of "
                         "finetuning_lora/pt/freeze.py")
    if output_dir:
        if os.path.abspath(output_dir) != os.path.abspath(folder):
            shutil.copytree(folder, output_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*RESUME_ONLY))
        folder = output_dir
    written = []
    for name in present:
        target = os.path.join(folder, THUDM_NAMES[name])
        tmp = target + ".tmp"
        torch.save(load_file(os.path.join(folder, name)), tmp)
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a checkpoint folder, or a training output folder (its "
                        "latest checkpoint)")
    parser.add_argument("--output_dir", default=None, help="copy the checkpoint here and export the copy (default: "
                        "write beside the safetensors file in the checkpoint itself)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model_dir):
        raise SystemExit(f"error: {args.model_dir}: folder not found")
    for path in export_checkpoint(args.model_dir, args.output_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
