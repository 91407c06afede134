"""The fine-tuning scripts' options: the parser, the checks that need nothing loaded, and the defaults that depend on
the machine (precision, compiling, CUDA graphs, packing, recomputation, the allocator).

`check_options` runs right after parsing, before DeepSpeed, transformers or the weights are imported or read: a
typo in a path or a value that cannot work is reported in seconds, in one line. Nothing here imports torch at
module level for the same reason.
"""
import argparse
import json
import os

DEFAULT_PROMPT = ('你现在是一个信息抽取模型，请你帮我抽取出关系内容为"性能故障", "部件故障", "组成"和 "检测工具"的相关三元组，'
                  '三元组内部用"_"连接，三元组之间用\\n分割。文本：')

# --gradient_checkpointing's kinds (training_engine.enable_checkpointing); the last two recompute inside our model
# files' blocks
CHECKPOINTING_KINDS = ("blocks", "mlp", "mlp+attention")
RECOMPUTE_MLP_KINDS = ("mlp", "mlp+attention")

# A run of fewer forward/backward passes than this finishes sooner without compiling its blocks: on an H200 compiling
# took 55-80 s on a fresh machine (~35 s with a warm cache) and saved 8.9 ms per LoRA step (40.4 -> 31.5 ms, CUDA
# graphs either way; bench/results/startup). The reference run (5 epochs of spo, 3,545 steps) is below it.
COMPILE_PAYS_FROM = 5000

# The training runs' cuBLAS workspace: 4 MiB instead of PyTorch's 32 MiB on Hopper. At the peak of the CUDA-graph step
# 42 allocations of exactly 32 MiB made by the matmuls were alive (bench/memory_at_peak.py; one allocation each when
# the step is not captured); with 4 MiB the peak fell 1.09 GiB (LoRA on INT4 with --gradient_checkpointing mlp 7.59
# -> 6.50 GiB, on bf16 16.41 -> 15.32 GiB; H200, bench/results/quantized) at the same step time within the machines'
# spread (43.7 vs 43.8 ms, 31.9 vs 31.6 ms, two calls). Set in main(), before the first matmul; a value the user set
# wins.
TRAINING_CUBLAS_WORKSPACE = ":4096:1"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each default said once: appended where the help text does not already give it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or \
                action.option_strings == ["-h", "--help"]:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser(method):
    parser = argparse.ArgumentParser(
        description=f"Fine-tune ChatGLM ({method.title}). Launch with `deepspeed finetuning_{method.name}.py ...` (one "
                    "GPU or --num_gpus N; two runs at once on one machine need `deepspeed --master_port PORT`) or "
                    "plain `python`; on a machine without a GPU it runs on the CPU.",
        formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_path", default="data/spo_train.jsonl", help="JSONL or JSON rows: text/answer, "
                      "instruction/input/output or conversations")
    data.add_argument("--eval_path", default=None, help="rows for an evaluation loss at each save")
    data.add_argument("--prompt_text", default=DEFAULT_PROMPT, help="put before each row's text (text/answer rows); "
                      "a {text} in it marks where the text goes instead (default: the reference task's prompt)")
    data.add_argument("--max_len", type=int, default=768, help="longest training row in tokens")
    data.add_argument("--max_src_len", type=int, default=450, help="longest prompt + text in tokens")
    data.add_argument("--skip_bad_rows", action="store_true", help="skip and count bad rows instead of stopping")
    data.add_argument("--task", choices=["triple", "classification", "generation"], default="triple",
                      help="how the predict scripts score this model (recorded in the checkpoint as their default)")
    data.add_argument("--group_by_length", action="store_true",
                      help="batch rows of similar length: less padding (ChatGLM-6B LoRA on an H100: 38.3 -> 30.7 ms "
                           "per step); batches are still drawn in random order")
    data.add_argument("--pack_rows", action=argparse.BooleanOptionalAction, default=None,
                      help="put each batch's rows one after another in one sequence, each attending only to itself, "
                           "instead of padding them to the longest (same loss, fewer tokens computed; default: on a "
                           "GPU with batches of 2 or more rows)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_dir", default="ChatGLM-6B", help="the base model folder (config.json, tokenizer, "
                       "weights)")
    model.add_argument("--mode", default=None, help="model family, if not the one read from the model folder")
    model.add_argument("--quantization_bit", type=int, choices=[8, 4], default=None,
                       help="quantize the frozen base's block linears to INT8 or INT4 at load time (THUDM's format and "
                            "rounding; a folder whose config.json has quantization_bit is loaded as it is): LoRA and "
                            "P-Tuning train over it, Freeze keeps its trained layers in full precision")
    model.add_argument("--quantization", choices=["nf4", "int8"], default=None,
                       help="quantize the frozen base's block linears with bitsandbytes instead: nf4 (QLoRA: NF4 with "
                            "double quantization, matmuls in the training precision) or int8 (LLM.int8()); needs "
                            "pip install bitsandbytes; checkpoints are the same")
    model.add_argument("--gradient_checkpointing", nargs="?", const="blocks", default=None,
                       choices=["none", *CHECKPOINTING_KINDS],
                       help="recompute activations in the backward instead of keeping them: less memory, slower "
                            "steps. Bare or 'blocks': every block's whole forward; 'mlp': only each block's widening "
                            "matmul and activation (the largest thing a frozen block keeps); 'mlp+attention': also "
                            "the packed rows' attention kernels, keeping only their query, key and value. Default: "
                            "mlp+attention on a GPU over an INT8/INT4/NF4 base (the small cards' case: LoRA on INT4, "
                            "H200, one run: 46.6 ms/step at 5.5 GiB; mlp alone 45.0 ms at 6.5 GiB; the bf16 base "
                            "without checkpointing 32.3 ms at 15.3 GiB), none otherwise (bench/results/README.md)")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile each transformer block: steps ~22%% faster (H200, LoRA), after 55-80 s "
                            "of compiling before the first step on a fresh machine (~35 s when the compile cache "
                            "already has this model). Default: on a GPU when the run has at least "
                            f"{COMPILE_PAYS_FROM:,} forward/backward passes (where it pays for itself) or the base "
                            "is quantized; off on the CPU")
    model.add_argument("--pad_to_multiple_of", type=int, default=None,
                       help="pad each batch's length up to a multiple of N (default: 64 on a GPU, where fewer "
                            "distinct shapes made LoRA steps 14%% faster on an H100; 0 on the CPU). The loss is "
                            "unchanged: padding has no labels and comes after every row's tokens")
    model.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay each step's forward and backward as CUDA graphs, one pair per batch shape "
                            "(default: on a GPU unless ZeRO-3; with --gradient_checkpointing the recomputation is "
                            "captured too; see training_graphs.py)")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=f"output_dir_{method.name}", help="where the checkpoints, "
                       "metrics.jsonl and the loss curve go")
    train.add_argument("--num_train_epochs", type=int, default=5, help="passes over the training rows")
    train.add_argument("--max_steps", type=int, default=0, help="the run's optimizer steps; as in transformers' "
                       "Trainer it overrides --num_train_epochs (the rows are read again as often as needed) and the "
                       "learning-rate schedule spans it (default: 0, the epochs decide)")
    train.add_argument("--stop_after_steps", type=int, default=0, help="save and stop at this step as if interrupted; "
                       "the schedule is unchanged and --resume continues (0: never)")
    train.add_argument("--train_batch_size", type=int, default=2, help="rows per GPU per micro-step")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=method.default_learning_rate,
                       help=f"the peak learning rate, reached after the warm-up (default: {method.default_learning_rate}"
                            f" for {method.title}; LoRA, Freeze 1e-4, P-Tuning 2e-2, full 1e-5)")
    train.add_argument("--lr_scheduler", choices=["linear", "cosine", "constant"], default="linear")
    train.add_argument("--warmup_ratio", type=float, default=0.1)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    train.add_argument("--seed", type=int, default=1234)
    precision = train.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bfloat16 (the default on GPUs that have it, and on the CPU)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 with dynamic loss scaling (the default on GPUs without bf16)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    train.set_defaults(precision="auto")
    train.add_argument("--log_steps", type=int, default=10)
    train.add_argument("--save_steps", type=int, default=0, help="also save every N steps (0: at epoch ends only)")
    train.add_argument("--save_epochs", type=int, default=1, help="save at the end of every N-th epoch (0: not at "
                       "epoch ends; --save_steps and the run's end still save). Many short epochs (a small data "
                       "set) would otherwise spend more time saving than training")
    train.add_argument("--keep_checkpoints", type=int, default=method.default_keep_checkpoints,
                       help="keep the newest N checkpoints, delete older ones (0: keep all)")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in "
                       "--output_dir (after Ctrl-C, a kill or a crash) with the same settings and number of "
                       "processes; what differs is refused, each setting named")
    train.add_argument("--resume_with_changes", action="store_true", help="with --resume, accept changes to what "
                       f"can change mid-run: {', '.join('--' + n for n in CHANGEABLE_ON_RESUME)} (a new learning "
                       "rate or length rebuilds the schedule from the step reached); they are recorded")
    train.add_argument("--overwrite_output_dir", action="store_true", help="start over in an --output_dir that holds "
                       "an earlier run: its checkpoints and metrics are deleted (without it such a run is refused)")
    train.add_argument("--dump_final_state", default=None, metavar="FILE",
                       help="also write every parameter of the trained model to this safetensors file (to check "
                            "what training changed)")
    ds = parser.add_argument_group("deepspeed")
    ds.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=1)
    ds.add_argument("--offload", action="store_true", help="keep optimizer states on the CPU (ZeRO >= 1)")
    ds.add_argument("--ds_config", default=None, help="a DeepSpeed JSON config; its keys override the built one")
    ds.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    method.add_arguments(parser.add_argument_group(method.name))
    return parser


# What a resumed run may change with --resume_with_changes (everything else that shapes the run must be equal)
CHANGEABLE_ON_RESUME = ("num_train_epochs", "max_steps", "learning_rate", "save_steps", "save_epochs", "log_steps",
                        "keep_checkpoints", "eval_path")
# Settings that never shape what is trained (speed, where things go, this invocation's own switches)
NOT_COMPARED_ON_RESUME = ("output_dir", "overwrite_output_dir", "resume", "resume_with_changes", "local_rank",
                          "dump_final_state", "compile", "cuda_graphs", "pack_rows", "pad_to_multiple_of",
                          "gradient_checkpointing", "stop_after_steps", "task", "train_path", "model_dir",
                          "resumed_with_changes")


def check_options(args, method):
    """Values that cannot work, refused in one line before anything is imported or loaded; paths checked too."""
    positive = {"max_len": args.max_len, "max_src_len": args.max_src_len, "train_batch_size": args.train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, "log_steps": args.log_steps}
    for name, value in positive.items():
        if value < 1:
            raise SystemExit(f"error: --{name} {value}: must be at least 1")
    if args.max_steps < 0 or (args.num_train_epochs < 1 and not args.max_steps):
        raise SystemExit(f"error: --num_train_epochs {args.num_train_epochs}: a run needs at least one epoch (or "
                         "--max_steps N)")
    if not args.learning_rate > 0:
        raise SystemExit(f"error: --learning_rate {args.learning_rate}: must be above 0")
    if not 0 <= args.warmup_ratio < 1:
        raise SystemExit(f"error: --warmup_ratio {args.warmup_ratio}: must be within [0, 1)")
    for name in ("save_steps", "save_epochs", "keep_checkpoints", "stop_after_steps", "max_grad_norm",
                 "weight_decay"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name} {getattr(args, name)}: must be 0 or more")
    if args.resume_with_changes and not args.resume:
        raise SystemExit("error: --resume_with_changes goes with --resume")
    if args.resume and args.overwrite_output_dir:
        raise SystemExit("error: --resume continues the run in --output_dir, --overwrite_output_dir deletes it: "
                         "one of them")
    method.check_options(args)
    check_paths(args)


def check_paths(args):
    from model_family import ModelFolderError, read_config_json
    for name in ("train_path", "eval_path", "ds_config"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise SystemExit(f"error: --{name} {path}: file not found")
    try:
        read_config_json(args.model_dir)
    except ModelFolderError as err:
        raise SystemExit(f"error: --model_dir: {err}") from None
    if args.ds_config:
        try:
            with open(args.ds_config, encoding="utf-8") as f:
                json.load(f)
        except ValueError as err:
            raise SystemExit(f"error: --ds_config {args.ds_config}: not valid JSON ({err})") from None


# ---- defaults that depend on the machine -----------------------------------------------------------------------------

def resolve_precision(args):
    import torch
    if args.precision != "auto":
        return args.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def quantized_base(args):
    """Whether the run's base is quantized (--quantization_bit, --quantization or a pre-quantized folder)."""
    from model_family import folder_quantization_bit
    return bool(args.quantization_bit or args.quantization or folder_quantization_bit(args.model_dir))


def resolve_compile(args, device, total_steps):
    """--compile: by default on a GPU for runs long enough to win back the compile time, and on quantized bases
    (their measured path is the compiled one)."""
    if args.compile is not None:
        return args.compile
    if device.type != "cuda":
        return False
    return quantized_base(args) or total_steps * args.gradient_accumulation_steps >= COMPILE_PAYS_FROM


def resolve_cuda_graphs(args, device):
    """--cuda_graphs: on by default on a GPU; refused where a captured step cannot work."""
    blocked = ("it needs a GPU" if device.type != "cuda" else
               "ZeRO-3 gathers parameters on the host during the step" if args.zero_stage == 3 else None)
    if args.cuda_graphs and blocked:
        raise SystemExit(f"error: --cuda_graphs cannot be used here: {blocked}")
    return not blocked if args.cuda_graphs is None else args.cuda_graphs


def resolve_pack_rows(args, device):
    """--pack_rows: on by default on a GPU when a batch has several rows."""
    if args.pack_rows is None:
        return device.type == "cuda" and args.train_batch_size > 1
    return args.pack_rows


def resolve_gradient_checkpointing(args, device):
    """--gradient_checkpointing: by default on a GPU over a quantized base, MLPs and packed attention recomputed
    (LoRA on INT4, H200, one call: 46.6 ms/step at 5.54 GiB against 45.0 ms at 6.48 GiB with mlp alone, bf16 32.3
    ms; without checkpointing 39.0 ms at 8.5 GiB in an earlier call, more than an 8 GB card holds). 'none' turns
    it off; the result is None or a kind."""
    kind = args.gradient_checkpointing
    if kind is None and device.type == "cuda" and quantized_base(args):
        kind = "mlp+attention" if args.pack_rows else "mlp"
    return None if kind == "none" else kind


def own_optimizer(args, world_size):
    """The optimizer.py AdamW that replaces DeepSpeed's mixed-precision optimizer at ZeRO-0/1, or None (DeepSpeed's).

    One process in bf16: MasterWeightAdamW (ZeRO-1 partitions nothing there; it takes DeepSpeed's step in fewer
    passes). Several processes in bf16 or fp32: DataParallelAdamW (ZeRO-1's partitioning of the optimizer state,
    the gradients of a param group averaged in one reduce-scatter). DeepSpeed's own for ZeRO-2/3, fp16 (loss
    scaling), --offload and a --ds_config of the user's."""
    if args.zero_stage > 1 or args.offload or args.ds_config:
        return None
    if world_size == 1:
        return "MasterWeightAdamW" if args.precision == "bf16" else None
    return "DataParallelAdamW" if args.precision in ("bf16", "fp32") else None


def choose_allocator(args):
    """On a quantized base (the small cards' case) PyTorch's allocator grows its segments instead of caching fixed
    ones: LoRA on INT4 with --gradient_checkpointing mlp held 11.3 GiB instead of 13.4 GiB (reserved) for the same
    7.6 GiB allocated and the same step time (H200, one call, bench/results/README.md "Eleventh session"). Before
    the first CUDA allocation; a PYTORCH_CUDA_ALLOC_CONF the user set wins."""
    from model_family import ModelFolderError
    try:
        quantized = quantized_base(args)
    except ModelFolderError:
        return  # reported where the model loads
    if quantized:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
