"""The distributed process of a fine-tuning run: starting it (DeepSpeed's process group, the device), the DeepSpeed
engine with our optimizer and schedule, compiled blocks and recomputation, and stopping it when the launcher is
stopped. training.py's loop runs on what this builds."""
import atexit
import json
import math
import os
import random
import signal
import socket
import time

import torch

from optimizer import DataParallelAdamW, MasterWeightAdamW
from training_options import RECOMPUTE_MLP_KINDS, own_optimizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def setup_distributed(problem=None):
    """Start torch.distributed through DeepSpeed; a plain `python` launch becomes a one-process group. `problem`: the
    SystemExit this process's start-up checks raised, if any: under the launcher it is first told to the other
    processes (roll_call), so that they stop with it instead of waiting for this one."""
    from datetime import timedelta

    from folders import use_own_extension_builds
    use_own_extension_builds()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        if problem is not None:
            raise problem
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if problem is not None and world_size == 1:  # nobody else to tell
        raise problem
    if rank == 0:
        check_master_port(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)))
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    backend = get_accelerator().communication_backend_name()
    if world_size > 1:  # the process group is built on the roll call's store
        store = roll_call(rank, world_size, problem)
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                             timeout=timedelta(minutes=PROCESS_GROUP_TIMEOUT_MIN))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
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


# Minutes a collective may wait for the other processes (DeepSpeed's default: 10); a process that died is seen at
# once on the CPU (its sockets close), on GPUs by NCCL's watchdog
PROCESS_GROUP_TIMEOUT_MIN = 30
# Seconds the processes of a run wait for each other's start-up checks (a tokenizer and the data: seconds)
ROLL_CALL_S = 300


def roll_call(rank, world_size, problem):
    """Every process says whether its start-up checks passed, through a TCP store at MASTER_ADDR:MASTER_PORT (rank 0
    serves it; the process group is then built on it): one that failed (a data file missing on its node, say) stops
    them all at once, each with one line naming it, where they would otherwise wait for it until a timeout."""
    from datetime import timedelta
    store = torch.distributed.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                       int(os.environ.get("MASTER_PORT", 29500)), world_size, rank == 0,
                                       timedelta(seconds=ROLL_CALL_S), wait_for_workers=False)
    here = f"rank {rank} on node {os.environ.get('CROSS_RANK', 0)} ({socket.gethostname()})"
    store.set(f"roll_call/{rank}", "ok" if problem is None else f"{here}: {stop_message(problem)}")
    statuses, deadline = {}, time.time() + ROLL_CALL_S
    while len(statuses) < world_size and time.time() < deadline:
        for other in range(world_size):
            if other not in statuses and store.check([f"roll_call/{other}"]):
                statuses[other] = store.get(f"roll_call/{other}").decode()
        if any(status != "ok" for status in statuses.values()):
            break
        time.sleep(0.1)
    failures = [status for status in statuses.values() if status != "ok"]
    missing = sorted(set(range(world_size)) - set(statuses))
    if problem is None and not failures and not missing:
        return store
    store.set(f"roll_call_seen/{rank}", "1")
    if rank == 0:  # the store lives in this process: it stays until the others have read why they stop
        while time.time() < deadline and not store.check([f"roll_call_seen/{r}" for r in statuses]):
            time.sleep(0.1)
    if problem is not None:
        raise problem
    if failures:
        raise SystemExit(f"error: {failures[0]}; this process ({here}) stops with it")
    raise SystemExit(f"error: rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not start "
                     f"within {ROLL_CALL_S} s (check the other nodes' commands and their output); {here} stops")


def stop_message(stop):
    text = stop.code if isinstance(stop.code, str) else f"stopped (exit code {stop.code})"
    return text.removeprefix("error: ")


def lost_another_process(err):
    """Whether an exception from a collective means another process of the run is gone (its node died or was
    stopped), rather than a fault of this process's own."""
    text = str(err)
    return isinstance(err, getattr(torch.distributed, "DistError", ())) or \
        any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def check_master_port(address, port):
    """Rank 0 listens on the launcher's --master_port (29500 by default): taken by another run on this machine, it
    would fail there with EADDRINUSE after the imports and op builds. Said now, in one line."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as err:
            if err.errno == 98:  # EADDRINUSE (an address not of this machine's is the other nodes' business)
                raise SystemExit(f"error: port {port} (the deepspeed launcher's --master_port) is in use: another "
                                 "training is running on this machine. Start this one with `deepspeed "
                                 f"--master_port {port + 1} ...` (any free port)") from None


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
