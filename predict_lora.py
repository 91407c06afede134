"""Predict and score with a LoRA checkpoint from finetuning_lora.py.

    python predict_lora.py --model_dir output_dir_lora --test_path data/spo_test.jsonl --device 0

The adapters are merged into the weights for speed unless --no_merge (merged and unmerged give the same tokens) or
the base is quantized (--quantization_bit, as in training), where they stay beside the int weights.
"""
import os

from prediction import PredictMethod, main


class LoRAPredict(PredictMethod):
    name = "lora"
    title = "LoRA"

    def add_arguments(self, parser):
        parser.add_argument("--no_merge", action="store_true", help="keep the adapters separate from the weights")

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        from peft import PeftModel

        from model_family import load_model
        if not os.path.isfile(os.path.join(checkpoint_dir, "adapter_config.json")):
            raise SystemExit(f"error: {checkpoint_dir}: no adapter_config.json; not a LoRA checkpoint")
        from model_family import folder_quantization_bit
        base = load_model(base_dir, family, dtype=dtype, quantization_bit=args.quantization_bit or 0,
                          bnb_quantization=getattr(args, "quantization", None))
        model = PeftModel.from_pretrained(base, checkpoint_dir)
        quantized = args.quantization_bit or getattr(args, "quantization", None) or folder_quantization_bit(base_dir)
        # adapters cannot be merged into int8 weights: on a quantized base they stay beside them
        return model if args.no_merge or quantized else model.merge_and_unload()


if __name__ == "__main__":
    main(LoRAPredict())
