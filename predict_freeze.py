"""Predict and score with a Freeze checkpoint from finetuning_freeze.py (the trained layers over the base model).

    python predict_freeze.py --model_dir output_dir_freeze --test_path data/spo_test.jsonl --device 0
"""
from prediction import PredictMethod, load_partial_state, main


class FreezePredict(PredictMethod):
    name = "freeze"
    title = "Freeze"

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        from model_family import load_model
        model = load_model(base_dir, family, dtype=dtype)
        load_partial_state(model, checkpoint_dir)
        return model


if __name__ == "__main__":
    main(FreezePredict())
