"""The peer: what a LLaMA-Factory user gets, i.e. transformers' Trainer with a PEFT LoRA, on a transformers-layout GLM-4
folder (glm-4-9b-chat-hf or GLM-4-0414), on the same rows our scripts train on.

The set-up is LLaMA-Factory's defaults for a LoRA SFT run on one GPU where they bear on speed: the folder's own
transformers class in bf16 with SDPA attention, LoRA r 8 (alpha 16, no dropout) on q_proj, k_proj, v_proj, rows
padded to the longest of their batch (DataCollatorForSeq2Seq), fused AdamW, no packing, no DeepSpeed. Gradient
checkpointing is off (LLaMA-Factory turns it on unless told not to; off is the faster setting, so the comparison
favours the peer). The rows are tokenized by the suite's own data code in the family's training layout, so both
sides see the same token ids.

    python bench/peer_trainer_peft.py --model_dir /tmp/glm4-hf --train_path spo_train.jsonl --steps 100

Prints one JSON line: ms per step (median over the steps after `--warmup`), real tokens per second, peak GiB.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def training_rows(model_dir, train_path, max_len, max_src_len):
    from data_set import Seq2SeqDataset
    from model_family import family_for, load_tokenizer
    from training_options import DEFAULT_PROMPT
    family = family_for(model_dir)
    tokenizer = load_tokenizer(model_dir, family)
    rows = Seq2SeqDataset(train_path, tokenizer, family, max_len, max_src_len, DEFAULT_PROMPT, True, lambda *a: None)
    return tokenizer, [{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in range(len(rows))]


class StepTimer:
    """A TrainerCallback that times each optimizer step on the GPU's clock (synchronised at both ends)."""

    def __init__(self):
        self.seconds, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_len", type=int, default=768)
    parser.add_argument("--max_src_len", type=int, default=450)
    parser.add_argument("--output_dir", default="/tmp/peer_trainer_peft")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    tokenizer, rows = training_rows(args.model_dir, args.train_path, args.max_len, args.max_src_len)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj"]))
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.1, bf16=gpu, optim="adamw_torch_fused" if gpu
        else "adamw_torch", logging_steps=10, save_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, gradient_checkpointing=False, use_cpu=not gpu)
    timer = StepTimer()
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, callbacks=[timer],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = sorted(timer.seconds[args.warmup:]) or sorted(timer.seconds)
    median = timed[len(timed) // 2]
    tokens = sum(len(r["input_ids"]) for r in rows) / len(rows) * args.batch_size
    print(json.dumps({"run": "peer: Trainer + PEFT", "model_dir": args.model_dir, "steps": len(timer.seconds),
                      "ms_per_step": round(1000 * median, 1), "real_tokens_per_s": round(tokens / median),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if gpu else None}))


if __name__ == "__main__":
    main()
