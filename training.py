"""What the three fine-tuning scripts share: arguments, DeepSpeed set-up, the training loop, checkpoints, metrics.

A fine-tuning script supplies a `Method` (which parameters train, how the model is wrapped and how the trained
part is saved) and calls `main(method)`. Everything else happens here, in this order:

    arguments -> distributed set-up -> tokenizer, data, model -> method.prepare -> deepspeed.initialize
    -> (resume) -> for each epoch, for each batch: forward, backward, step, log, save

Everything that can be checked without the weights (arguments, the output folder, what --resume needs, the data)
is checked before they load, which takes minutes for a 6B model. The checkpoint folders (what they hold, atomic
writes, `latest`, resume) are checkpoints.py's. Ctrl-C, SIGTERM or a stopped `deepspeed` launcher end a run with
one line that names the checkpoint `--resume` continues from.
"""
import argparse
import atexit
import json
import math
import os
import random
import signal
import socket
import time

# torch.compile's caches (inductor's code, AOTAutograd's graphs) under the user's cache folder rather than /tmp, so
# that a later run of the same model and shapes reuses them after a reboot too; set before torch reads it
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chatglm-finetuning", "torchinductor"))

import torch  # noqa: E402 (after the cache folder is chosen)
from torch.utils.data import DataLoader  # noqa: E402

from checkpoints import (OutputFolderLock, check_output_dir, check_resume_settings, clear_output_dir,
                         latest_checkpoint, resume_from_checkpoint, save_checkpoint)
from optimizer import DataParallelAdamW, MasterWeightAdamW

DEFAULT_PROMPT = ('你现在是一个信息抽取模型，请你帮我抽取出关系内容为"性能故障", "部件故障", "组成"和 "检测工具"的相关三元组，'
                  '三元组内部用"_"连接，三元组之间用\\n分割。文本：')


class Method:
    """What differs between fine-tuning methods. Subclasses override what applies to them."""
    name = "method"
    title = "a method"
    default_learning_rate = 1e-4
    default_keep_checkpoints = 3

    def add_arguments(self, parser):
        pass

    def config_overrides(self, args):
        """Config fields that add modules to the model (e.g. the prefix encoder)."""
        return {}

    def prepare(self, model, args, family):
        """Choose what trains (requires_grad) and wrap the model if needed; returns the model to train."""
        raise NotImplementedError

    def check_arguments(self, args, family, config):
        """Refuse arguments that do not fit the model (its config, read before the weights load) in one line."""

    def float_modules(self, args, family, config):
        """Name fragments of modules that train and so stay in full precision on a quantized base."""
        return ()

    def save(self, model, trained_state, folder, args):
        """Write the trained parameters (`trained_state`: name -> CPU tensor) into `folder`."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

# --gradient_checkpointing's kinds (enable_checkpointing); the last two recompute inside our model files' blocks
CHECKPOINTING_KINDS = ("blocks", "mlp", "mlp+attention")
RECOMPUTE_MLP_KINDS = ("mlp", "mlp+attention")


def build_parser(method):
    parser = argparse.ArgumentParser(
        description=f"Fine-tune ChatGLM ({method.title}). Launch with `deepspeed finetuning_{method.name}.py ...` (one GPU or "
                    "--num_gpus N) or plain `python`; on a machine without a GPU it runs on the CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_path", default="data/spo_train.jsonl", help="JSONL or JSON rows: text/answer or "
                      "instruction/input/output")
    data.add_argument("--eval_path", default=None, help="rows for an evaluation loss at each save")
    data.add_argument("--prompt_text", default=DEFAULT_PROMPT, help="put before each row's text (text/answer rows)")
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
                            "(default: on a GPU unless ZeRO-3; with --gradient_checkpointing the recomputation is captured "
                            "too; see training_graphs.py)")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=f"output_dir_{method.name}")
    train.add_argument("--num_train_epochs", type=int, default=5)
    train.add_argument("--max_steps", type=int, default=0, help="end the run after this many optimizer steps "
                       "(0: no limit); the learning-rate schedule is fitted to it")
    train.add_argument("--stop_after_steps", type=int, default=0, help="save and stop at this step as if interrupted; "
                       "the schedule is unchanged and --resume continues (0: never)")
    train.add_argument("--train_batch_size", type=int, default=2, help="rows per GPU per micro-step")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=method.default_learning_rate)
    train.add_argument("--lr_scheduler", choices=["linear", "cosine", "constant"], default="linear")
    train.add_argument("--warmup_ratio", type=float, default=0.1)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    train.add_argument("--seed", type=int, default=1234)
    precision = train.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 with dynamic loss scaling")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    train.set_defaults(precision="auto")
    train.add_argument("--log_steps", type=int, default=10)
    train.add_argument("--save_steps", type=int, default=0, help="also save every N steps (0: at epoch ends only)")
    train.add_argument("--save_epochs", type=int, default=1, help="save at the end of every N-th epoch (0: not at "
                       "epoch ends; --save_steps and the run's end still save). Many short epochs (a small data "
                       "set) would otherwise spend more time saving than training")
    train.add_argument("--keep_checkpoints", type=int, default=method.default_keep_checkpoints,
                       help="keep the newest N checkpoints, delete older ones (0: keep all)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir "
                       "(after Ctrl-C, a kill or a crash; the same settings and number of processes)")
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


def resolve_precision(args):
    if args.precision != "auto":
        return args.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


# A run of fewer forward/backward passes than this finishes sooner without compiling its blocks: on an H200 compiling
# took 55-80 s on a fresh machine (~35 s with a warm cache) and saved 8.9 ms per LoRA step (40.4 -> 31.5 ms, CUDA
# graphs either way; bench/results/startup). The reference run (5 epochs of spo, 3,545 steps) is below it.
COMPILE_PAYS_FROM = 5000


def resolve_compile(args, device, total_steps):
    """--compile: by default on a GPU for runs long enough to win back the compile time, and on quantized bases
    (their measured path is the compiled one)."""
    if args.compile is not None:
        return args.compile
    if device.type != "cuda":
        return False
    from model_family import folder_quantization_bit
    quantized = bool(args.quantization_bit or args.quantization or folder_quantization_bit(args.model_dir))
    return quantized or total_steps * args.gradient_accumulation_steps >= COMPILE_PAYS_FROM


def resolve_cuda_graphs(args, device):
    """--cuda_graphs: on by default on a GPU; refused where a captured step cannot work."""
    blocked = ("it needs a GPU" if device.type != "cuda" else
               "ZeRO-3 gathers parameters on the host during the step" if args.zero_stage == 3 else None)
    if args.cuda_graphs and blocked:
        raise SystemExit(f"error: --cuda_graphs cannot be used here: {blocked}")
    return not blocked if args.cuda_graphs is None else args.cuda_graphs


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


def resolve_pack_rows(args, device):
    """--pack_rows: on by default on a GPU when a batch has several rows."""
    if args.pack_rows is None:
        return device.type == "cuda" and args.train_batch_size > 1
    return args.pack_rows


def deepspeed_config(args, world_size):
    if own_optimizer(args, world_size):
        # DeepSpeed without mixed precision of its own: the optimizer keeps the fp32 masters, reduces and clips
        return {"train_micro_batch_size_per_gpu": args.train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "train_batch_size": args.train_batch_size * args.gradient_accumulation_steps * world_size,
                "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
                "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    config = {
        "train_micro_batch_size_per_gpu": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if args.precision == "bf16":
        # DeepSpeed's bf16 overflow check tests each gradient tensor for inf/NaN and waits for the GPU each step
        # (LoRA on an H100: 46.2 -> 39.6 ms per step without it, bench/results); bf16 has no loss scale to adjust,
        # and a non-finite loss stops the run at the next log step (check_finite) before anything is saved
        config["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif args.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if args.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if args.ds_config:
        try:
            with open(args.ds_config, encoding="utf-8") as f:
                config.update(json.load(f))
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --ds_config {args.ds_config}: {err}") from None
    return config


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------

def setup_distributed():
    """Start torch.distributed through DeepSpeed; a plain `python` launch becomes a one-process group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(get_accelerator().device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        atexit.register(remove_cpu_comm_buffer, torch.distributed.get_rank())
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


# DeepSpeed's CPU communication writes a 66 MB buffer per rank here (memory), named by user, address, port and rank
CPU_COMM_BUFFER_PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def remove_cpu_comm_buffer(rank):
    """DeepSpeed never removes its CPU communication buffer: each rank removes its own as the process ends."""
    path = f"{CPU_COMM_BUFFER_PREFIX}{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    try:
        os.remove(path)
    except OSError:
        pass


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def make_optimizer(model, args, device, kind=None):
    """torch's AdamW, or `kind` ("MasterWeightAdamW", "DataParallelAdamW": own_optimizer's choice) from optimizer.py."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    adamw = dict(lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    if kind:
        optimizer_class = {"MasterWeightAdamW": MasterWeightAdamW, "DataParallelAdamW": DataParallelAdamW}[kind]
        return optimizer_class(groups, max_grad_norm=args.max_grad_norm, **adamw)
    return torch.optim.AdamW(groups, **adamw)


def make_scheduler(optimizer, args, total_steps):
    warmup = int(total_steps * args.warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compile_blocks(model, mode=None):
    """torch.compile every transformer block, with the sequence length dynamic so one graph serves every batch.

    A 6B step at batch 2 is bound by the host launching ~2,800 small kernels; compiled blocks fuse the pointwise
    work (rotary, residuals, norms, GELU) into few kernels. The block classes are the model's `_no_split_modules`.
    `mode="reduce-overhead"` also replays each block as a CUDA graph; that needs fixed shapes, so it compiles
    one graph per sequence length (pad batches to a multiple, e.g. 64, to keep their number small).
    """
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    if mode == "reduce-overhead":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in model.modules():
        if type(module).__name__ in block_names:
            module.compile(dynamic=mode != "reduce-overhead", mode=mode)


def build_engine(model, args, world_size, device, total_steps):
    """deepspeed.initialize with our optimizer (fused AdamW on GPU) and scheduler, or DeepSpeed's for --offload."""
    import deepspeed
    config = deepspeed_config(args, world_size)
    if args.offload:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": args.learning_rate, "betas": [0.9, 0.95],
                                                           "weight_decay": args.weight_decay}}
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
        scheduler = make_scheduler(optimizer, args, total_steps)
        engine.lr_scheduler = scheduler
    else:
        kind = own_optimizer(args, world_size)
        if kind:
            # the fp32 masters are made where the parameters are now (DeepSpeed would move them later), from bf16
            # parameters as DeepSpeed's bf16 engine would cast them: PEFT keeps LoRA's adapters in fp32, which made
            # every adapter matmul an fp32 one with its input cast to fp32
            model.to(device=device, dtype=DTYPES[args.precision])
        optimizer = make_optimizer(model, args, device, kind)
        scheduler = make_scheduler(optimizer, args, total_steps)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)
        if kind:
            # one process: DeepSpeed would copy every gradient to "reduce" it; several: the optimizer reduces them
            engine.enable_backward_allreduce = False
    return engine


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl in the output folder, TensorBoard events when tensorboard is installed, a loss curve at the end."""

    def __init__(self, output_dir, enabled):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                pass

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def plot(self, png_path):
        if not self.enabled or not os.path.isfile(self.path):
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        records = [json.loads(line) for line in open(self.path, encoding="utf-8")]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "eval_loss"):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, loader, device):
    engine.eval()
    total, count = 0.0, 0
    for batch in loader:
        labels = batch["labels"]
        n = int((labels[:, 1:] != -100).sum())
        total += engine(**to_device(batch, device), loss_only=True).loss.float().item() * n
        count += n
    engine.train()
    return total / max(count, 1)


def rank_share(labels, world_size, device):
    """Factor that turns this rank's mean token loss into its share of the mean over every rank's tokens.

    DeepSpeed averages gradients over ranks, which weights each rank's mean equally; rows differ in length, so
    scaling by (local tokens x ranks / global tokens) makes N ranks compute the loss one rank computes on the
    same global batch."""
    local = torch.tensor(float((labels[:, 1:] != -100).sum()), device=device)
    total = local.clone()
    torch.distributed.all_reduce(total)
    return local * world_size / total


def check_finite(loss_value, step):
    if not math.isfinite(loss_value):
        raise SystemExit(f"step {step}: the loss is {loss_value}; stopping without saving. Lower --learning_rate, "
                         "use --bf16 instead of --fp16, or check the data.")


def loss_function(engine, args, device):
    """batch (CPU tensors) -> mean token loss: through DeepSpeed's engine, or by CUDA graph replay."""
    if args.cuda_graphs:
        from training_graphs import TrainingGraphs
        return TrainingGraphs(engine.module, device)
    return lambda batch: engine(**to_device(batch, device), loss_only=True).loss


def train(engine, method, family, args, tokenizer, train_set, eval_loader, sampler, device, rank, world_size,
          progress):
    """The epoch/batch loop; returns the last logged loss."""
    from tqdm import tqdm
    pack = (family.packed_row_inputs, engine.module.config) if args.pack_rows else None
    collate = train_loader_collate(tokenizer, args.pad_to_multiple_of, args.cuda_graphs, pack)
    batch_loss = loss_function(engine, args, device)
    batches_per_epoch, total_steps = schedule_length(args, sampler)
    metrics = MetricsLog(args.output_dir, rank == 0)
    bar = tqdm(total=total_steps, initial=progress["step"], disable=rank != 0, desc=method.name, dynamic_ncols=True)
    window_loss, window_micro, window_tokens, window_start = torch.zeros((), device=device), 0, 0, time.time()
    last_loss, first_step = float("nan"), True
    for epoch in range(progress["epoch"], args.num_train_epochs):
        sampler.set_epoch(epoch)
        # a private generator: creating the loader must not draw from the global RNG that dropout uses
        loader = DataLoader(train_set, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                            generator=torch.Generator())
        skip = progress["batches_done"] if epoch == progress["epoch"] else 0
        for i, batch in enumerate(loader):
            if i >= batches_per_epoch or progress["step"] >= total_steps:
                break
            if i < skip:
                continue
            window_tokens += int(batch.pop("num_tokens")) * world_size
            loss = batch_loss(batch)
            if world_size > 1:
                loss = loss * rank_share(batch["labels"], world_size, device)
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().float()
            window_micro += 1
            if (i + 1) % args.gradient_accumulation_steps:
                continue
            progress.update(step=progress["step"] + 1, epoch=epoch, batches_done=i + 1)
            bar.update(1)
            if first_step:
                first_step = False
                report_first_step(metrics, progress["step"], device, rank)
            interrupted = progress["step"] == args.stop_after_steps
            at_end = progress["step"] >= total_steps or i + 1 >= batches_per_epoch or interrupted
            if progress["step"] % args.log_steps == 0 or at_end:
                if world_size > 1:  # the mean over all ranks' tokens
                    torch.distributed.all_reduce(window_loss)
                    window_loss /= world_size
                last_loss = window_loss.item() / window_micro
                check_finite(last_loss, progress["step"])
                elapsed = time.time() - window_start
                record = {"step": progress["step"], "epoch": epoch, "loss": round(last_loss, 6),
                          "lr": engine.get_lr()[0], "tokens_per_s": round(window_tokens / elapsed, 1),
                          "elapsed_s": round(seconds_since_start(), 2)}
                if device.type == "cuda":
                    record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                if args.cuda_graphs:  # every new batch shape is a capture: what they have cost so far
                    record.update(captured_shapes=batch_loss.captures, capture_s=round(batch_loss.capture_seconds, 1))
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss.zero_()
                window_micro, window_tokens, window_start = 0, 0, time.time()
            epoch_end = i + 1 >= batches_per_epoch
            if (args.save_steps and progress["step"] % args.save_steps == 0) or \
                    progress["step"] >= total_steps or interrupted or \
                    (epoch_end and args.save_epochs and (epoch + 1) % args.save_epochs == 0):
                if epoch_end:  # the next run position is the next epoch's start
                    progress.update(epoch=epoch + 1, batches_done=0)
                save_and_evaluate(engine, method, args, tokenizer, eval_loader, metrics, progress, device, rank)
            if interrupted:
                break
        if progress["step"] >= total_steps or progress["step"] == args.stop_after_steps:
            break
    bar.close()
    metrics.plot(os.path.join(args.output_dir, "loss_curve.png"))
    return last_loss


def seconds_since_start():
    """Seconds since this process started (imports included): what a user waits from the command on."""
    import psutil
    return time.time() - psutil.Process().create_time()


# seconds since the start at which each part of the start-up ended, in order (filled in by `run`)
startup_marks = {}


def mark_startup(part):
    startup_marks[part] = seconds_since_start()


def report_first_step(metrics, step, device, rank):
    """The wait from the command to the first optimizer step, part by part, said and logged."""
    mark_startup("first step (compiling, capturing)")
    parts, before = {}, 0.0
    for part, seconds in startup_marks.items():
        parts[part], before = round(seconds - before, 1), seconds
    # `unix_time`: the launcher's own start-up comes before this process's, so a bench times the command from it
    metrics.write({"step": step, "seconds_to_first_step": round(before, 1), "startup_s": parts,
                   "unix_time": round(time.time(), 2)})
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(f"first step done {before:.0f} s after the start: "
                   + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in parts.items()))


def save_and_evaluate(engine, method, args, tokenizer, eval_loader, metrics, progress, device, rank):
    folder = save_checkpoint(engine, method, args, tokenizer, progress, rank, torch.distributed.get_world_size())
    if eval_loader is not None:
        eval_loss = evaluate(engine, eval_loader, device)
        metrics.write({"step": progress["step"], "eval_loss": round(eval_loss, 6)})
        if rank == 0:
            print(f"step {progress['step']}: eval loss {eval_loss:.4f}")
    if rank == 0:
        print(f"saved {folder}")


def schedule_length(args, sampler):
    """(micro-batches used per epoch, optimizer steps in the run). An epoch's tail that does not fill a whole
    accumulation is dropped, so every epoch ends on an optimizer step."""
    accumulation = args.gradient_accumulation_steps
    batches_per_epoch = len(sampler) // args.train_batch_size // accumulation * accumulation
    if batches_per_epoch == 0:
        raise SystemExit(f"error: {args.train_path} has fewer rows than one global batch "
                         f"(batch {args.train_batch_size} x accumulation {accumulation} x ranks)")
    total = batches_per_epoch // accumulation * args.num_train_epochs
    return batches_per_epoch, (min(total, args.max_steps) if args.max_steps else total)


# The CUDA-graph step captures each (length, labelled positions) shape once. Labelled positions padded to 4x the
# length's multiple: a 5-epoch spo run meets 35 shapes instead of 93 (bench/count_batch_shapes.py), about 29 s less
# capturing, for ~0.6 ms more head work per step (H200, bench/bench_capture.py).
LABEL_MULTIPLE_FACTOR = 4


def train_loader_collate(tokenizer, multiple=0, with_label_positions=False, pack=None):
    """Rows -> a padded batch, or with `pack` = (the family's packed_row_inputs, model config) one packed sequence."""
    from data_set import PackRows, PadToLongest
    label_multiple = LABEL_MULTIPLE_FACTOR * (multiple or 0)
    pad = PackRows(tokenizer.pad_token_id, *pack, multiple or 0, with_label_positions, label_multiple) if pack else \
        PadToLongest(tokenizer.pad_token_id, multiple or 0, with_label_positions, label_multiple)

    def collate(rows):
        batch = pad(rows)
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
        return batch
    return collate


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_data(args, rank):
    """Family, tokenizer, training set and evaluation loader (no weights yet); bad input stops with one line."""
    from data_set import DataError, PadToLongest, Seq2SeqDataset
    from model_family import ModelFolderError, family_for, load_tokenizer
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        family = family_for(args.model_dir, args.mode)
        tokenizer = load_tokenizer(args.model_dir, family)
        train_set = Seq2SeqDataset(args.train_path, tokenizer, family, args.max_len, args.max_src_len,
                                   args.prompt_text, args.skip_bad_rows, log)
        eval_loader = None
        if args.eval_path:
            eval_set = Seq2SeqDataset(args.eval_path, tokenizer, family, args.max_len, args.max_src_len,
                                      args.prompt_text, args.skip_bad_rows, log)
            eval_loader = DataLoader(eval_set, batch_size=args.train_batch_size,
                                     collate_fn=PadToLongest(tokenizer.pad_token_id))
    except (ModelFolderError, DataError) as err:
        raise SystemExit(f"error: {err}")
    return family, tokenizer, train_set, eval_loader


def load_base_model(args, method, family, device):
    """The base model's weights, after the method has checked its arguments against the model's config."""
    from model_family import ModelFolderError, folder_quantization_bit, load_model
    try:
        try:
            config = family.config_class.from_pretrained(args.model_dir)
        except ValueError as err:
            raise ModelFolderError(f"{args.model_dir}: {err}") from None
        method.check_arguments(args, family, config)
        if args.quantization_bit and args.quantization:
            raise SystemExit("error: --quantization_bit (THUDM's format) and --quantization (bitsandbytes): one of them")
        if args.zero_stage == 3 and (args.quantization_bit or args.quantization or
                                     folder_quantization_bit(args.model_dir)):
            raise SystemExit("error: a quantized base cannot be sharded by ZeRO-3 (its int8 weights are not "
                             "trained); use --zero_stage 1 or 2")
        return load_model(args.model_dir, family, dtype=DTYPES[args.precision],
                          quantization_bit=args.quantization_bit or 0,
                          keep_float=method.float_modules(args, family, config), device=device,
                          bnb_quantization=args.quantization, **method.config_overrides(args))
    except ModelFolderError as err:
        raise SystemExit(f"error: {err}")


def prepare_output_dir(args, rank, world_size):
    """Before anything loads: hold the output folder for this run, refuse to mix two runs in it, and check that a
    checkpoint to resume from was written the way this run trains. Returns that checkpoint (or None)."""
    global _output_lock  # held until the process ends
    if rank == 0:
        _output_lock = OutputFolderLock(args.output_dir)
    folder = check_output_dir(args)
    if folder is not None:
        check_resume_settings(folder, args, world_size, own_optimizer(args, world_size))
    elif args.overwrite_output_dir and rank == 0:
        clear_output_dir(args.output_dir)
    torch.distributed.barrier()
    return folder


_output_lock = None


def stop_with_launcher():
    """A signal to the `deepspeed` command ends it but not the ranks (its child, DeepSpeed's launch.py, is not told):
    each rank watches the launcher processes above it and stops as on Ctrl-C once they are gone. A SIGTERM (which
    launch.py sends its ranks when it is stopped) is taken as Ctrl-C too, so that the rank says where it stopped."""
    import threading

    import psutil

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    try:
        launchers = [p for p in psutil.Process().parents()[:2] if "deepspeed" in " ".join(p.cmdline())]
    except psutil.Error:
        return
    if not launchers:
        return

    def alive(process):
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch():
        while all(alive(p) for p in launchers):
            time.sleep(1)
        while True:  # again every 15 s, should library code have swallowed a KeyboardInterrupt (seen once in CI)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(15)
    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def report_interrupted(args, rank):
    """Ctrl-C, SIGTERM or a stopped launcher: say what is saved and how to continue, without a traceback."""
    if rank == 0:
        folder = latest_checkpoint(args.output_dir)
        print(f"\ninterrupted: {'the latest complete checkpoint is ' + folder if folder else 'no checkpoint saved yet'}"
              + ("; run the same command with --resume to continue from it" if folder else ""), flush=True)
    raise SystemExit(130)


def describe_optimizer(engine, args):
    name = type(engine.optimizer).__name__
    if name == "MasterWeightAdamW":
        return (f"optimizer: {name} (one process: ZeRO-{args.zero_stage} would partition nothing, so our fused "
                "AdamW keeps the fp32 masters)")
    if name == "DataParallelAdamW":
        return (f"optimizer: {name} (each of {engine.optimizer.world_size} processes steps 1/"
                f"{engine.optimizer.world_size} of the trained parameters, as ZeRO-1; gradients reduce-scattered)")
    return f"optimizer: {name}, DeepSpeed ZeRO stage {engine.zero_optimization_stage()}"


def enable_checkpointing(model, kind):
    """--gradient_checkpointing: None, "blocks" (or True: the bare flag), "mlp" or "mlp+attention"."""
    if kind in RECOMPUTE_MLP_KINDS:
        model.recompute_mlp_enable(attention=kind == "mlp+attention")
    elif kind:
        model.gradient_checkpointing_enable()


def quantized_base(args):
    """Whether the run's base is quantized (--quantization_bit, --quantization or a pre-quantized folder)."""
    from model_family import folder_quantization_bit
    return bool(args.quantization_bit or args.quantization or folder_quantization_bit(args.model_dir))


def resolve_gradient_checkpointing(args, device):
    """--gradient_checkpointing: by default on a GPU over a quantized base, MLPs and packed attention recomputed
    (LoRA on INT4, H200, one call: 46.6 ms/step at 5.54 GiB against 45.0 ms at 6.48 GiB with mlp alone, bf16 32.3
    ms; without checkpointing 39.0 ms at 8.5 GiB in an earlier call, more than an 8 GB card holds). 'none' turns
    it off; the result is None or a kind."""
    kind = args.gradient_checkpointing
    if kind is None and device.type == "cuda" and quantized_base(args):
        kind = "mlp+attention" if args.pack_rows else "mlp"
    return None if kind == "none" else kind


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


# The training runs' cuBLAS workspace: 4 MiB instead of PyTorch's 32 MiB on Hopper. At the peak of the CUDA-graph step
# 42 allocations of exactly 32 MiB made by the matmuls were alive (bench/memory_at_peak.py; one allocation each when
# the step is not captured); with 4 MiB the peak fell 1.09 GiB (LoRA on INT4 with --gradient_checkpointing mlp 7.59
# -> 6.50 GiB, on bf16 16.41 -> 15.32 GiB; H200, bench/results/quantized) at the same step time within the machines'
# spread (43.7 vs 43.8 ms, 31.9 vs 31.6 ms, two calls). Set in main(), before the first matmul; a value the user set
# wins.
TRAINING_CUBLAS_WORKSPACE = ":4096:1"


def main(method, argv=None):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", TRAINING_CUBLAS_WORKSPACE)
    args = build_parser(method).parse_args(argv)
    choose_allocator(args)
    args.precision = resolve_precision(args)
    rank, world_size, device = setup_distributed()
    try:
        return run(method, args, rank, world_size, device)
    except KeyboardInterrupt:
        report_interrupted(args, rank)


def run(method, args, rank, world_size, device):
    stop_with_launcher()
    from data_set import EpochSampler
    args.pack_rows = resolve_pack_rows(args, device)
    args.cuda_graphs = resolve_cuda_graphs(args, device)
    if args.pad_to_multiple_of is None:
        args.pad_to_multiple_of = 64 if device.type == "cuda" else 0
    resume_folder = prepare_output_dir(args, rank, world_size)
    mark_startup("imports and set-up")
    seed_everything(args.seed)
    family, tokenizer, train_set, eval_loader = load_data(args, rank)
    mark_startup("data")
    sampler = EpochSampler(train_set.lengths, args.train_batch_size, args.seed, rank, world_size,
                           args.group_by_length)
    _, total_steps = schedule_length(args, sampler)
    args.compile = resolve_compile(args, device, total_steps)
    args.gradient_checkpointing = resolve_gradient_checkpointing(args, device)
    model = load_base_model(args, method, family, device)
    mark_startup("weights")
    enable_checkpointing(model, args.gradient_checkpointing)
    model = method.prepare(model, args, family)
    if args.compile:
        compile_blocks(model)
    trainable, total = count_parameters(model)
    if rank == 0:
        print(f"{method.name}: trainable parameters {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)")
    engine = build_engine(model, args, world_size, device, total_steps)
    mark_startup("DeepSpeed")
    if rank == 0:
        print(f"{describe_optimizer(engine, args)}, {args.precision}; batches: "
              f"{'rows packed into one sequence' if args.pack_rows else 'rows padded'}"
              f"{'; recomputed in the backward: ' + str(args.gradient_checkpointing) if args.gradient_checkpointing else ''}")
    progress = {"step": 0, "epoch": 0, "batches_done": 0}
    if resume_folder:
        progress = resume_from_checkpoint(engine, resume_folder, rank)
        mark_startup("resume")
        if rank == 0:
            print(f"resumed from {resume_folder} at step {progress['step']}")
    last_loss = train(engine, method, family, args, tokenizer, train_set, eval_loader, sampler, device, rank,
                      world_size, progress)
    if rank == 0:
        print(f"done: {progress['step']} steps, last loss {last_loss:.4f}; checkpoint {latest_checkpoint(args.output_dir)}")
        if args.dump_final_state:
            from safetensors.torch import save_file
            save_file({k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()},
                      args.dump_final_state)
    torch.distributed.barrier()
    return engine.module, last_loss
