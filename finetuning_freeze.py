"""Fine-tune ChatGLM with Freeze: only the last layers train (default the last five), everything else is frozen.

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_freeze.py --model_dir ChatGLM-6B --num_trainable_layers 5

`--freeze_module_name layers.27.,layers.26.` names the trained modules instead. With `--quantization_bit 8|4` the
other layers are quantized and the trained ones stay in full precision. Saves, per checkpoint,
model.safetensors holding only the trained parameters (official names); predict with predict_freeze.py.
"""
import os

from safetensors.torch import save_file

from training import Method, main


class Freeze(Method):
    name = "freeze"
    title = "Freeze"
    default_learning_rate = 1e-4

    def add_arguments(self, parser):
        parser.add_argument("--num_trainable_layers", type=int, default=5, help="train the last N layers")
        parser.add_argument("--freeze_module_name", default=None,
                            help="comma-separated parameter-name fragments to train instead, e.g. layers.27.,layers.26.")

    def check_options(self, args):
        if not args.freeze_module_name and args.num_trainable_layers < 1:
            raise SystemExit(f"error: --num_trainable_layers {args.num_trainable_layers}: at least 1 layer trains")

    def check_arguments(self, args, family, config):
        layers = family.num_layers(config)
        if not args.freeze_module_name and not 0 < args.num_trainable_layers <= layers:
            raise SystemExit(f"error: --num_trainable_layers {args.num_trainable_layers}: the model has {layers} layers")

    def trained_fragments(self, config, args, family):
        if args.freeze_module_name:
            return [f for f in args.freeze_module_name.split(",") if f]
        layers = family.num_layers(config)
        return [family.layers_prefix.format(i) for i in range(layers - args.num_trainable_layers, layers)]

    def float_modules(self, args, family, config):
        return self.trained_fragments(config, args, family)  # the trained layers are not quantized

    def prepare(self, model, args, family):
        fragments = self.trained_fragments(model.config, args, family)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = any(f in name for f in fragments)
        if not any(p.requires_grad for p in model.parameters()):
            raise SystemExit(f"error: no parameter name contains any of {fragments}")
        return model

    def save(self, model, trained_state, folder, args):
        save_file(trained_state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main(Freeze())
