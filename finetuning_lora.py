"""Fine-tune ChatGLM with LoRA: low-rank adapters on the attention projection (`query_key_value`), through PEFT.

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_lora.py --model_dir ChatGLM-6B --lora_r 8

Saves a standard PEFT adapter folder (adapter_config.json, adapter_model.safetensors) per checkpoint; predict with
predict_lora.py. `--help` lists every option.
"""
from training import Method, main


class LoRA(Method):
    name = "lora"
    title = "LoRA"
    default_learning_rate = 1e-4

    def add_arguments(self, parser):
        parser.add_argument("--lora_r", type=int, default=8, help="rank of the adapters")
        parser.add_argument("--lora_alpha", type=int, default=32, help="scaling: updates are multiplied by alpha/r")
        parser.add_argument("--lora_dropout", type=float, default=0.1)
        parser.add_argument("--lora_target", default=None,
                            help="comma-separated module names to adapt (default: the model family's, query_key_value)")

    def check_options(self, args):
        if args.lora_r < 1 or args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1:
            raise SystemExit(f"error: --lora_r {args.lora_r} --lora_alpha {args.lora_alpha} --lora_dropout "
                             f"{args.lora_dropout}: the rank must be at least 1, alpha above 0, dropout within [0, 1)")

    def prepare(self, model, args, family):
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=(args.lora_target or family.lora_target).split(","),
                            task_type="CAUSAL_LM", base_model_name_or_path=args.model_dir)
        return get_peft_model(model, config)  # freezes everything but the adapters

    def save(self, model, trained_state, folder, args):
        model.save_pretrained(folder, state_dict=trained_state)


if __name__ == "__main__":
    main(LoRA())
