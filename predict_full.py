"""Predict and score with a checkpoint from finetuning_full.py (a whole fine-tuned model folder).

    python predict_full.py --model_dir output_dir_full --test_path data/spo_test.jsonl --device 0
"""
from prediction import PredictMethod, main


class FullPredict(PredictMethod):
    name = "full"
    title = "full-parameter"
    checkpoint_is_model = True  # the checkpoint is the model: no base folder is read

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        from model_family import load_model
        return load_model(checkpoint_dir, family, dtype=dtype, quantization_bit=args.quantization_bit or 0,
                          bnb_quantization=getattr(args, "quantization", None))


if __name__ == "__main__":
    main(FullPredict())
