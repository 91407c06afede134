"""Fine-tune every parameter of ChatGLM (full-parameter fine-tuning).

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_full.py --model_dir ChatGLM-6B --learning_rate 1e-5
    deepspeed --num_gpus 2 finetuning_full.py --model_dir ChatGLM-6B --zero_stage 3       # the weights sharded too

A script of its own rather than Freeze with "all layers": what it saves is a whole model, not a part to lay over
the base. Each checkpoint is a complete model folder in the base's layout (config.json, sharded safetensors with
their index, the tokenizer, the base's code files), which predict_full.py, chat.py, serve.py, transformers'
`from_pretrained` and the other predict scripts (as `--ori_model_dir`) load like the base itself.

Memory, ChatGLM-6B in bf16: weights 12 GB, gradients 12 GB, fp32 masters and Adam moments 74 GB (~100 GB with
activations: one 141 GB H200). On several GPUs ZeRO-1 (the default) divides the 74 GB between them, ZeRO-3 the
weights and gradients as well, and --offload moves the optimizer state to CPU memory. Checkpoints also keep the
optimizer state for --resume (74 GB for 6B), so by default only the newest is kept (--keep_checkpoints).
"""
import glob
import os
import shutil

from training import Method, main


class Full(Method):
    name = "full"
    title = "full-parameter"
    default_learning_rate = 1e-5
    default_keep_checkpoints = 1  # each holds the whole model and its optimizer state (~100 GB for 6B)

    def check_arguments(self, args, family, config):
        if args.quantization_bit or args.quantization or config.to_dict().get("quantization_bit"):
            raise SystemExit("error: full fine-tuning trains every weight, and quantized weights cannot train: use "
                             "LoRA or P-Tuning on a quantized base, or the float folder")

    def prepare(self, model, args, family):
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model

    def save(self, model, trained_state, folder, args):
        # trained_state holds every parameter (a tied LM head once, as the model lists it)
        model.save_pretrained(folder, state_dict=trained_state, max_shard_size="4GB", safe_serialization=True)
        for path in glob.glob(os.path.join(args.model_dir, "*.py")):  # the base's code, for trust_remote_code
            shutil.copy(path, folder)


if __name__ == "__main__":
    main(Full())
