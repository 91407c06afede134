"""Predict and score with a whole model folder: a checkpoint from finetuning_full.py, a folder tools/export_model.py
wrote, or a base model (zero-shot, with --prompt_text and the lengths given on the command line).

    python predict_full.py --model_dir output_dir_full --test_path data/spo_test.jsonl --device 0
    python predict_full.py --model_dir exported-model --test_path data/spo_test.jsonl --prompt_text "..." --device 0
"""
from prediction import PredictMethod, main


class FullPredict(PredictMethod):
    name = "full"
    title = "full-parameter"
    checkpoint_is_model = True  # the checkpoint is the model: no base folder is read
    takes_model_folders = True  # any model folder, not only our checkpoints

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        from model_family import load_model
        return load_model(checkpoint_dir, family, dtype=dtype, quantization_bit=args.quantization_bit or 0,
                          bnb_quantization=getattr(args, "quantization", None))


if __name__ == "__main__":
    main(FullPredict())
