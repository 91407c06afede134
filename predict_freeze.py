"""Predict and score with a Freeze checkpoint from finetuning_freeze.py (the trained layers over the base model).

    python predict_freeze.py --model_dir output_dir_freeze --test_path data/spo_test.jsonl --device 0
"""
from prediction import PredictMethod, load_partial_state, main


class FreezePredict(PredictMethod):
    name = "freeze"
    title = "Freeze"

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        from model_family import load_model
        # on a quantized base (--quantization_bit, as in training) the trained layers stay in full precision
        model = load_model(base_dir, family, dtype=dtype, quantization_bit=args.quantization_bit or 0,
                           keep_float=trained_modules(checkpoint_dir), bnb_quantization=getattr(args, "quantization", None))
        load_partial_state(model, checkpoint_dir)
        return model


def trained_modules(checkpoint_dir):
    """Names of the modules whose parameters the checkpoint holds (`x.weight` -> `x.`)."""
    import os

    from safetensors import safe_open
    path = os.path.join(checkpoint_dir, "model.safetensors")
    if not os.path.isfile(path):
        return ()
    with safe_open(path, "pt") as f:
        return tuple(sorted({name.rsplit(".", 1)[0] + "." for name in f.keys()}))


if __name__ == "__main__":
    main(FreezePredict())
