"""Fine-tune ChatGLM with P-Tuning: only a prompt encoder of `--pre_seq_len` virtual tokens trains.

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_pt.py --model_dir ChatGLM-6B --pre_seq_len 16 --prefix_projection

Three modes: P-Tuning v2 (keys and values for every layer; default), with `--prefix_projection` the same through a
two-layer MLP, and with `--prompt_embedding_only` soft input embeddings only (P-Tuning v1). Saves, per
checkpoint, config.json (with pre_seq_len and the mode) and model.safetensors holding only
`transformer.prefix_encoder.*`, the layout of THUDM's P-Tuning v2 recipe; predict with predict_pt.py.
"""
import os

from safetensors.torch import save_file

from training import Method, main


class PTuning(Method):
    name = "pt"
    title = "P-Tuning"
    default_learning_rate = 2e-2

    def add_arguments(self, parser):
        parser.add_argument("--pre_seq_len", type=int, default=16, help="number of virtual prompt tokens")
        parser.add_argument("--prefix_projection", action="store_true",
                            help="encode the prefix through a two-layer MLP (P-Tuning v2 with projection)")
        parser.add_argument("--prompt_embedding_only", action="store_true",
                            help="soft prompt embeddings at the input only (P-Tuning v1), not per-layer keys/values")
        parser.add_argument("--prefix_dropout", type=float, default=0.1, help="dropout on the prompt while training")

    def check_options(self, args):
        if args.pre_seq_len < 1 or not 0 <= args.prefix_dropout < 1:
            raise SystemExit(f"error: --pre_seq_len {args.pre_seq_len} --prefix_dropout {args.prefix_dropout}: at "
                             "least 1 virtual token, dropout within [0, 1)")

    def config_overrides(self, args):
        return {"pre_seq_len": args.pre_seq_len, "prefix_projection": args.prefix_projection,
                "prompt_embedding_only": args.prompt_embedding_only, "prefix_dropout": args.prefix_dropout}

    def prepare(self, model, args, family):
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(family.prompt_prefix)
        return model

    def save(self, model, trained_state, folder, args):
        model.config.save_pretrained(folder)
        save_file(trained_state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main(PTuning())
