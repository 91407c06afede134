"""The checkpoint folders of a training run: writing them atomically, finding the latest, resuming from it.

An output folder holds `checkpoint-<step>/` folders, a `latest` file naming the newest complete one, the run's
`metrics.jsonl`, and while a run writes into it, `.run.lock` (held with a kernel lock, so a killed run never leaves
it held). A checkpoint folder holds what the method trained, the tokenizer, `training_args.json` and `ds_state/`
(optimizer, scheduler, step, data position) plus `rng_state_<rank>.pt` for `--resume`. Checkpoints are written under
a temporary name and renamed when complete, so a run killed mid-save resumes from the last complete one.

The training scripts write these folders; the predict scripts (and chat/serve) read them.
"""
import fcntl
import functools
import json
import os
import random
import shutil

import torch

TRAINING_ARGS_FILE = "training_args.json"
LOCK_FILE = ".run.lock"
# what a run writes into its output folder besides the checkpoints (removed by --overwrite_output_dir)
RUN_FILES = ("latest", "metrics.jsonl", "loss_curve.png", "tensorboard")


# ---- reading ----------------------------------------------------------------------------------------------------

def latest_checkpoint(output_dir):
    """The newest complete checkpoint folder of a run, or None."""
    pointer = os.path.join(output_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        folder = os.path.join(output_dir, f.read().strip())
    return folder if os.path.isdir(folder) else None


def checkpoint_folders(output_dir):
    """checkpoint-<step> folder names in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(output_dir)
                   if n.startswith("checkpoint-") and n.split("-")[1].isdigit())
    return [f"checkpoint-{s}" for s in steps]


def saved_training_args(checkpoint_dir):
    """The training run's arguments saved in a checkpoint ({} for a folder without them)."""
    path = os.path.join(checkpoint_dir, TRAINING_ARGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)


def weight_shapes(model_dir):
    """{tensor name: shape} of a model folder's weights, read from the safetensors headers (or, for .bin files,
    memory-mapped without unpickling anything but tensors)."""
    import glob
    shapes = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})
    if not shapes:
        for path in sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin"))):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            shapes.update({name: list(t.shape) for name, t in state.items()})
    return shapes


@functools.lru_cache(maxsize=4)
def base_fingerprint(model_dir):
    """What identifies a base model folder: a hash of its config.json and of its weights' names and shapes (not
    their values: reading 12 GB at every save would cost minutes). Computed once per run."""
    import hashlib
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    shapes = weight_shapes(model_dir)
    weights = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    return {"config_sha256": config, "weights_sha256": weights, "tensors": len(shapes)}


def fingerprint_changes(recorded, model_dir):
    """What differs between a recorded fingerprint and the folder now (empty: nothing, or nothing recorded)."""
    if not recorded:
        return []
    now = base_fingerprint.__wrapped__(model_dir)  # read afresh, not the cached value
    return [what for key, what in (("config_sha256", "its config.json"),
                                   ("weights_sha256", "its weights' names or shapes")) if recorded.get(key) != now[key]]


# ---- the output folder of a run -----------------------------------------------------------------------------------

class OutputFolderLock:
    """Held by rank 0 for a whole run: a second run into the same folder is refused instead of mixing checkpoints.

    flock is released by the kernel when the process ends, however it ends, so a killed run never blocks the next."""

    def __init__(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise SystemExit(f"error: {output_dir} is in use by a training run that is still going ({holder}); "
                             "wait for it, stop it, or choose another --output_dir") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()


def check_output_dir(args):
    """Before anything loads: a fresh run (no --resume) into a folder that holds another run's checkpoints is refused
    unless --overwrite_output_dir, which removes them; --resume needs a checkpoint written the same way."""
    existing = checkpoint_folders(args.output_dir)
    if args.resume:
        folder = latest_checkpoint(args.output_dir)
        if folder is None:
            raise SystemExit(f"error: --resume: no complete checkpoint in {args.output_dir} (no 'latest' file); "
                             "drop --resume to start a new run")
        return folder
    if existing or os.path.isfile(os.path.join(args.output_dir, "metrics.jsonl")):
        if not args.overwrite_output_dir:
            raise SystemExit(f"error: {args.output_dir} holds another run ({', '.join(existing[-3:]) or 'metrics.jsonl'}"
                             "): --resume continues it, --overwrite_output_dir deletes it and starts over, or choose "
                             "another --output_dir")
    return None


def clear_output_dir(output_dir):
    """--overwrite_output_dir: remove the checkpoints and files an earlier run wrote (nothing else)."""
    for name in checkpoint_folders(output_dir) + list(RUN_FILES):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)


# What must be the same to resume: the optimizer state's layout depends on them
RESUME_SETTINGS = ("precision", "zero_stage", "offload", "world_size")


def check_resume_settings(folder, args, world_size, own_optimizer):
    """Before the model loads: refuse a checkpoint whose optimizer state this run cannot read, in one line.
    `own_optimizer`: the optimizer.py class name this run will use, or None for DeepSpeed's."""
    saved = saved_training_args(folder)
    now = {"precision": args.precision, "zero_stage": args.zero_stage, "offload": args.offload,
           "world_size": world_size}
    differ = [f"{k} {saved[k]} (now {now[k]})" for k in RESUME_SETTINGS if k in saved and saved[k] != now[k]]
    written = saved.get("optimizer")
    ours = ("MasterWeightAdamW", "DataParallelAdamW")
    if written and (written if written in ours else None) != own_optimizer:
        differ.append(f"optimizer {written} (now {own_optimizer or 'a DeepSpeed ZeRO one'})")
    if differ:
        raise SystemExit(f"error: --resume: {folder} was written with {', '.join(differ)}: resume with the same "
                         "precision, --zero_stage, --offload and number of processes")


def check_same_optimizer(folder, engine):
    """A last check once the engine exists (checkpoints written before training_args.json named every setting)."""
    written, now = saved_training_args(folder).get("optimizer"), type(engine.optimizer).__name__
    if written and written != now:
        raise SystemExit(f"error: --resume: {folder} was written with the {written} optimizer and this run uses "
                         f"{now}: resume with the same precision, --zero_stage, --offload and number of processes")


# ---- writing ----------------------------------------------------------------------------------------------------

def trained_state_dict(engine):
    """name -> CPU tensor of every trainable parameter; under ZeRO-3 gathered from all ranks (all ranks call this)."""
    import deepspeed
    state = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                state[name] = p.detach().cpu().clone()
        else:
            state[name] = p.detach().cpu().clone()
    return state


def save_checkpoint(engine, method, args, tokenizer, progress, rank, world_size):
    """Write checkpoint-<step> atomically: into a temporary folder, renamed when complete; then point `latest` at it."""
    name = f"checkpoint-{progress['step']}"
    final = os.path.join(args.output_dir, name)
    tmp = os.path.join(args.output_dir, f".{name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    engine.save_checkpoint(os.path.join(tmp, "ds_state"), tag="state", client_state=dict(progress),
                           exclude_frozen_parameters=True)
    if hasattr(engine.optimizer, "shard_state_dict"):  # DataParallelAdamW: each process saves its slice's state
        torch.save(engine.optimizer.shard_state_dict(), os.path.join(tmp, f"optimizer_shard_{rank}.pt"))
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_state_{rank}.pt"))
    torch.distributed.barrier()  # every rank has written into tmp before rank 0 renames it
    state = trained_state_dict(engine)
    if rank == 0:
        method.save(engine.module, state, tmp, args)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(os.path.join(tmp, TRAINING_ARGS_FILE),
                          {"method": method.name, "optimizer": type(engine.optimizer).__name__,
                           "world_size": world_size, **vars(args),
                           "base_fingerprint": base_fingerprint(args.model_dir)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(args.output_dir, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(args.output_dir, "latest.tmp"), os.path.join(args.output_dir, "latest"))
        delete_old_checkpoints(args.output_dir, args.keep_checkpoints)
    torch.distributed.barrier()
    return final


def delete_old_checkpoints(output_dir, keep):
    """Remove all but the newest `keep` checkpoint-<step> folders (only after the newest is complete)."""
    if keep <= 0:
        return
    for name in checkpoint_folders(output_dir)[:-keep]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def resume_from_checkpoint(engine, folder, rank):
    """Load the optimizer, scheduler and random state of `folder`; returns the run position it was saved at."""
    check_same_optimizer(folder, engine)
    _, progress = engine.load_checkpoint(os.path.join(folder, "ds_state"), tag="state", load_module_strict=False)
    if hasattr(engine.optimizer, "load_shard_state_dict"):
        engine.optimizer.load_shard_state_dict(
            torch.load(os.path.join(folder, f"optimizer_shard_{rank}.pt"), weights_only=False))
    rng = torch.load(os.path.join(folder, f"rng_state_{rank}.pt"), weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return {k: progress[k] for k in ("step", "epoch", "batches_done")}
