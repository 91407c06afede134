"""What the fine-tuning scripts share: the training loop, its metrics, and a run from the command to its last step.

A fine-tuning script supplies a `Method` (which parameters train, how the model is wrapped and how the trained
part is saved) and calls `main(method)`. Everything else happens here, in this order:

    options (training_options.py) -> the output folder and what --resume needs -> tokenizer and data
    -> the distributed set-up (training_engine.py) -> the model -> method.prepare -> the DeepSpeed engine
    -> (resume) -> for each epoch, for each batch: forward, backward, step, log, save

Everything that can be checked without DeepSpeed and the weights (options, paths, the output folder, what --resume
needs, the data) is checked before them, in seconds, each failure in one line. The checkpoint folders are
checkpoints.py's. Ctrl-C, SIGTERM or a stopped `deepspeed` launcher end a run with one line that names the
checkpoint `--resume` continues from.
"""
import json
import math
import os
import time

# torch.compile's caches (inductor's code, AOTAutograd's graphs) under the user's cache folder rather than /tmp, so
# that a later run of the same model and shapes reuses them after a reboot too; set before torch reads it
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chatglm-finetuning", "torchinductor"))

import torch  # noqa: E402 (after the cache folder is chosen)
from torch.utils.data import DataLoader  # noqa: E402

from checkpoints import (CheckpointError, OutputFolderLock, SaveFailed, check_output_dir, check_resume,  # noqa: E402
                         clear_output_dir, latest_checkpoint, remove_stale_temporary_folders, resume_from_checkpoint,
                         save_checkpoint, saved_training_args)
from training_engine import (DTYPES, build_engine, compile_blocks, count_parameters, describe_optimizer,  # noqa: E402
                             enable_checkpointing, lost_another_process, seed_everything, setup_distributed,
                             stop_with_launcher)
from training_options import (DEFAULT_PROMPT, TRAINING_CUBLAS_WORKSPACE, build_parser, check_options,  # noqa: E402
                              choose_allocator, own_optimizer, resolve_compile, resolve_cuda_graphs,
                              resolve_gradient_checkpointing, resolve_pack_rows, resolve_precision)

__all__ = ["DEFAULT_PROMPT", "Method", "main"]


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

    def check_options(self, args):
        """Refuse the method's own values that cannot work, in one line, before anything is imported or loaded."""

    def check_arguments(self, args, family, config):
        """Refuse arguments that do not fit the model (its config, read before the weights load) in one line."""

    def float_modules(self, args, family, config):
        """Name fragments of modules that train and so stay in full precision on a quantized base."""
        return ()

    def save(self, model, trained_state, folder, args):
        """Write the trained parameters (`trained_state`: name -> CPU tensor) into `folder`."""
        raise NotImplementedError


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


class LossWindow:
    """The micro-steps since the last log line: their summed loss (on the device: no host wait per step), count and
    tokens, written as one record of metrics.jsonl."""

    def __init__(self, device):
        self.loss, self.device = torch.zeros((), device=device), device
        self.start()

    def start(self):
        self.loss.zero_()
        self.micro_steps, self.tokens, self.started = 0, 0, time.time()

    def add(self, loss, tokens):
        self.loss += loss.detach().float()
        self.micro_steps += 1
        self.tokens += tokens

    def record(self, engine, epoch, step, world_size, batch_loss, cuda_graphs):
        if world_size > 1:  # the mean over all ranks' tokens
            torch.distributed.all_reduce(self.loss)
            self.loss /= world_size
        loss = self.loss.item() / self.micro_steps
        check_finite(loss, step)
        record = {"step": step, "epoch": epoch, "loss": round(loss, 6), "lr": engine.get_lr()[0],
                  "tokens_per_s": round(self.tokens / (time.time() - self.started), 1),
                  "elapsed_s": round(seconds_since_start(), 2)}
        if self.device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        if cuda_graphs:  # every new batch shape is a capture: what they have cost so far
            record.update(captured_shapes=batch_loss.captures, capture_s=round(batch_loss.capture_seconds, 1))
        self.start()
        return record


def saves_now(args, step, total_steps, epoch, epoch_end, interrupted):
    return (args.save_steps and step % args.save_steps == 0) or step >= total_steps or interrupted or \
        (epoch_end and args.save_epochs and (epoch + 1) % args.save_epochs == 0)


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
    window, last_loss, first_step = LossWindow(device), float("nan"), True
    try:
        for epoch in range(progress["epoch"], epochs_to_run(args, batches_per_epoch)):
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
                tokens = int(batch.pop("num_tokens")) * world_size
                loss = batch_loss(batch)
                if world_size > 1:
                    loss = loss * rank_share(batch["labels"], world_size, device)
                engine.backward(loss)
                engine.step()
                window.add(loss, tokens)
                if (i + 1) % args.gradient_accumulation_steps:
                    continue
                progress.update(step=progress["step"] + 1, epoch=epoch, batches_done=i + 1)
                bar.update(1)
                if first_step:
                    first_step = False
                    report_first_step(metrics, progress["step"], device, rank)
                interrupted, epoch_end = progress["step"] == args.stop_after_steps, i + 1 >= batches_per_epoch
                if progress["step"] % args.log_steps == 0 or progress["step"] >= total_steps or epoch_end or \
                        interrupted:
                    record = window.record(engine, epoch, progress["step"], world_size, batch_loss, args.cuda_graphs)
                    last_loss = record["loss"]
                    metrics.write(record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                if saves_now(args, progress["step"], total_steps, epoch, epoch_end, interrupted):
                    if epoch_end:  # the next run position is the next epoch's start
                        progress.update(epoch=epoch + 1, batches_done=0)
                    save_and_evaluate(engine, method, args, tokenizer, eval_loader, metrics, progress, device, rank)
                if interrupted:
                    break
            if progress["step"] >= total_steps or progress["step"] == args.stop_after_steps:
                break
    finally:
        bar.close()  # ends the bar's line: whatever stops the run is said on a line of its own
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
    try:
        folder = save_checkpoint(engine, method, args, tokenizer, progress, rank, torch.distributed.get_world_size())
    except SaveFailed as err:
        latest = latest_checkpoint(args.output_dir)
        raise SystemExit(f"error: could not save step {progress['step']}: {err}. Stopping; nothing of it was kept"
                         + (f", and the latest complete checkpoint is {latest}: free some space and run the same "
                            "command with --resume" if latest else "")) from None
    if eval_loader is not None:
        eval_loss = evaluate(engine, eval_loader, device)
        metrics.write({"step": progress["step"], "eval_loss": round(eval_loss, 6)})
        if rank == 0:
            print(f"step {progress['step']}: eval loss {eval_loss:.4f}")
    if rank == 0:
        print(f"saved {folder}")


def schedule_length(args, sampler):
    """(micro-batches used per epoch, optimizer steps in the run). An epoch's tail that does not fill a whole
    accumulation is dropped, so every epoch ends on an optimizer step. --max_steps, as in transformers' Trainer,
    sets the run's length whatever --num_train_epochs says."""
    accumulation = args.gradient_accumulation_steps
    batches_per_epoch = len(sampler) // args.train_batch_size // accumulation * accumulation
    if batches_per_epoch == 0:
        raise SystemExit(f"error: {args.train_path} has fewer rows than one global batch "
                         f"(batch {args.train_batch_size} x accumulation {accumulation} x ranks)")
    return batches_per_epoch, args.max_steps or batches_per_epoch // accumulation * args.num_train_epochs


def epochs_to_run(args, batches_per_epoch):
    """The epochs the run takes: --num_train_epochs, or as many as --max_steps needs."""
    if not args.max_steps:
        return args.num_train_epochs
    return math.ceil(args.max_steps * args.gradient_accumulation_steps / batches_per_epoch)


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


def claim_output_dir(args, method, rank, world_size):
    """Before DeepSpeed and anything else load: hold the output folder for this run (rank 0), refuse to mix two runs
    in it, and check that the checkpoint to resume from is intact and was written the way this run trains. Returns
    (that checkpoint or None, the changes --resume_with_changes accepted)."""
    global _output_lock  # held until the process ends
    log = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        _output_lock = OutputFolderLock(args.output_dir)
        remove_stale_temporary_folders(args.output_dir)
    try:
        folder = check_output_dir(args, method.name, log)
        changes = check_resume(folder, args, world_size, own_optimizer(args, world_size), log) if folder else {}
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if folder is None and args.overwrite_output_dir and rank == 0:
        clear_output_dir(args.output_dir)
    return folder, changes


_output_lock = None


def check_work_left(folder, total_steps, rank):
    """--resume of a run that has taken all its steps: nothing to do, said in one line (exit 0)."""
    done = (saved_training_args(folder).get("progress") or {}).get("step", 0)
    if done >= total_steps:
        if rank == 0:
                print(f"nothing to do: {folder} finished all {total_steps} steps of this run; raise --num_train_epochs "
                  "or --max_steps with --resume_with_changes to train on, or start a new run", flush=True)
        raise SystemExit(0)


def launch_rank():
    """(rank, world size) as the launcher set them, before the process group exists (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def report_interrupted(args, rank):
    """Ctrl-C, SIGTERM or a stopped launcher: say what is saved and how to continue, without a traceback."""
    if rank == 0:
        folder = latest_checkpoint(args.output_dir)
        print(f"\ninterrupted: {'the latest complete checkpoint is ' + folder if folder else 'no checkpoint saved yet'}"
              + ("; run the same command with --resume to continue from it" if folder else ""), flush=True)
    raise SystemExit(130)


def main(method, argv=None):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", TRAINING_CUBLAS_WORKSPACE)
    args = build_parser(method).parse_args(argv)
    rank, world_size = launch_rank()
    try:
        return run(method, args, rank, world_size)
    except KeyboardInterrupt:
        report_interrupted(args, rank)


class RunStart:
    """What the start-up checks found: the checkpoint to resume (and the changes accepted), the data, the length."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def check_and_read(method, args, rank, world_size):
    """Everything before DeepSpeed: options and paths (seconds after the command), the output folder and what
    --resume needs, the tokenizer and the data. Each failure is a SystemExit with one line."""
    from data_set import EpochSampler
    check_options(args, method)
    args.model_dir, args.train_path = os.path.abspath(args.model_dir), os.path.abspath(args.train_path)
    choose_allocator(args)
    args.precision = resolve_precision(args)
    resume_folder, changes = claim_output_dir(args, method, rank, world_size)
    if changes:  # what the continued run changed is recorded with its checkpoints
        args.resumed_with_changes = {name: list(values) for name, values in changes.items()}
    seed_everything(args.seed)
    family, tokenizer, train_set, eval_loader = load_data(args, rank)
    sampler = EpochSampler(train_set.lengths, args.train_batch_size, args.seed, rank, world_size,
                           args.group_by_length)
    _, total_steps = schedule_length(args, sampler)
    if resume_folder:
        check_work_left(resume_folder, total_steps, rank)
    return RunStart(resume_folder=resume_folder, changes=changes, family=family, tokenizer=tokenizer,
                    train_set=train_set, eval_loader=eval_loader, sampler=sampler, total_steps=total_steps)


def run(method, args, rank, world_size):
    stop_with_launcher()
    try:
        start, problem = check_and_read(method, args, rank, world_size), None
    except SystemExit as stop:  # told to the other processes first (a data file missing on one node, say)
        start, problem = None, stop
    mark_startup("checks and data")
    rank, world_size, device = setup_distributed(problem)
    torch.distributed.barrier()  # rank 0 holds the folder and has cleared it before anyone writes
    resume_folder, changes, family, tokenizer = start.resume_folder, start.changes, start.family, start.tokenizer
    mark_startup("distributed set-up")
    args.pack_rows = resolve_pack_rows(args, device)
    args.cuda_graphs = resolve_cuda_graphs(args, device)
    if args.pad_to_multiple_of is None:
        args.pad_to_multiple_of = 64 if device.type == "cuda" else 0
    args.compile = resolve_compile(args, device, start.total_steps)
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
    engine = build_engine(model, args, world_size, device, start.total_steps)
    mark_startup("DeepSpeed")
    if rank == 0:
        print(f"{describe_optimizer(engine, args)}, {args.precision}; batches: "
              f"{'rows packed into one sequence' if args.pack_rows else 'rows padded'}"
              f"{'; recomputed in the backward: ' + str(args.gradient_checkpointing) if args.gradient_checkpointing else ''}")
    progress = {"step": 0, "epoch": 0, "batches_done": 0}
    if resume_folder:
        try:
            progress = resume_from_checkpoint(engine, resume_folder, rank, changes)
        except CheckpointError as err:
            raise SystemExit(f"error: --resume: {err}") from None
        mark_startup("resume")
        if rank == 0:
            print(f"resumed from {resume_folder} at step {progress['step']}")
    try:
        last_loss = train(engine, method, family, args, tokenizer, start.train_set, start.eval_loader, start.sampler,
                          device, rank, world_size, progress)
    except Exception as err:  # noqa: BLE001 (re-raised unless it is another process's end)
        if world_size > 1 and lost_another_process(err):
            latest = latest_checkpoint(args.output_dir)
            raise SystemExit(f"error: another process of this run is gone ({str(err).splitlines()[0][:120]}); "
                             f"stopping. The latest complete checkpoint is {latest or 'none yet'}: run the same "
                             "command with --resume on every node") from None
        raise
    if rank == 0:
        print(f"done: {progress['step']} steps, last loss {last_loss:.4f}; checkpoint {latest_checkpoint(args.output_dir)}")
        if args.dump_final_state:
            from safetensors.torch import save_file
            save_file({k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()},
                      args.dump_final_state)
    torch.distributed.barrier()
    return engine.module, last_loss
