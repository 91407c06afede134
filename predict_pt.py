"""Predict and score with a P-Tuning checkpoint from finetuning_pt.py, or from THUDM's P-Tuning v2 recipe
(a folder with config.json and a pytorch_model.bin holding only transformer.prefix_encoder.*).

    python predict_pt.py --model_dir output_dir_pt --test_path data/spo_test.jsonl --device 0

The prompt settings (pre_seq_len, prefix_projection, embedding-only) are read from the checkpoint; given on the
command line they must agree with it.
"""
import argparse
import json
import os

from prediction import PredictMethod, load_partial_state, main

PROMPT_SETTINGS = ("pre_seq_len", "prefix_projection", "prompt_embedding_only")


class PTuningPredict(PredictMethod):
    name = "pt"
    title = "P-Tuning"

    def add_arguments(self, parser):
        parser.add_argument("--pre_seq_len", type=int, default=None, help="check: must match the checkpoint")
        parser.add_argument("--prefix_projection", action=argparse.BooleanOptionalAction, default=None,
                            help="check: must match the checkpoint")

    def checkpoint_settings(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, "config.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: missing; a P-Tuning checkpoint has its config.json with pre_seq_len")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if not config.get("pre_seq_len"):
            raise SystemExit(f"error: {path}: no pre_seq_len; not a P-Tuning checkpoint")
        return {"pre_seq_len": config["pre_seq_len"], "prefix_projection": bool(config.get("prefix_projection")),
                "prompt_embedding_only": bool(config.get("prompt_embedding_only"))}

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        from model_family import load_model
        settings = self.checkpoint_settings(checkpoint_dir)
        for key in ("pre_seq_len", "prefix_projection"):
            given = getattr(args, key)
            if given is not None and given != settings[key]:
                raise SystemExit(f"error: --{key} {given} does not match the checkpoint {checkpoint_dir}, trained with "
                                 + ", ".join(f"{k} {v}" for k, v in settings.items()))
        model = load_model(base_dir, family, dtype=dtype, quantization_bit=args.quantization_bit or 0,
                           bnb_quantization=getattr(args, "quantization", None), **settings)
        load_partial_state(model, checkpoint_dir, required_prefix=family.prompt_prefix)
        return model


if __name__ == "__main__":
    main(PTuningPredict())
