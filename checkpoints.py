"""The checkpoint folders of a training run: writing them so that they can be trusted, finding the latest complete
one, and resuming from it only with the settings that wrote it.

An output folder holds `checkpoint-<step>/` folders, a `latest` file naming the newest complete one, the run's
`metrics.jsonl`, and while a run writes into it, `.run.lock` (held with a kernel lock, so a killed run never leaves
it held). A checkpoint folder holds what the method trained, the tokenizer, `training_args.json` (every setting,
the data's and the base's fingerprints, the run's position), `ds_state/` (DeepSpeed's optimizer and scheduler
state: pickles, which DeepSpeed reads with torch.load; never resume a folder you did not write), and our own state
in safetensors (`rng_state_<rank>.safetensors`, `optimizer_shard_<rank>.safetensors`), last `checkpoint_files.json`:
every file's size and checksum. It is written under a temporary name, flushed to the disk, and renamed when
complete; a checkpoint whose files do not match its list is not used (resume falls back to the one before).

The training scripts write these folders; the predict scripts, chat, serve and the exports read them.
"""
import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import zlib

import torch

TRAINING_ARGS_FILE = "training_args.json"
MANIFEST_FILE = "checkpoint_files.json"
LOCK_FILE = ".run.lock"
# what a run writes into its output folder besides the checkpoints (removed by --overwrite_output_dir)
RUN_FILES = ("latest", "metrics.jsonl", "loss_curve.png", "tensorboard")
WHOLE_CHECKSUM_BELOW = 1 << 30  # larger files: their size and the checksum of their first and last 16 MiB
SAMPLED_BYTES = 16 << 20


class CheckpointError(Exception):
    """A checkpoint that cannot be used as it is; the message names the folder or file."""


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
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged ({err}); the checkpoint cannot be read") from None


# ---- each file's size and checksum ------------------------------------------------------------------------------------

def file_checksum(path, size):
    """CRC-32 of the whole file, or of its first and last 16 MiB for files over 1 GiB (a 74 GB optimizer state is
    not read whole at every save; a cut file is caught by its size)."""
    crc = 0
    with open(path, "rb") as f:
        if size <= WHOLE_CHECKSUM_BELOW:
            for block in iter(lambda: f.read(1 << 22), b""):
                crc = zlib.crc32(block, crc)
            return crc
        crc = zlib.crc32(f.read(SAMPLED_BYTES), crc)
        f.seek(size - SAMPLED_BYTES)
        return zlib.crc32(f.read(SAMPLED_BYTES), crc)


def checkpoint_files(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                  for name in names if name != MANIFEST_FILE)


def write_manifest(folder):
    files = {}
    for name in checkpoint_files(folder):
        size = os.path.getsize(os.path.join(folder, name))
        files[name] = {"size": size, "crc32": file_checksum(os.path.join(folder, name), size)}
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)


def checkpoint_problem(folder):
    """Why `folder` cannot be trusted (a file missing, cut or changed since it was written), or None. Folders written
    before checkpoints had a file list are taken as they are."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError):
        return f"{path}: damaged"
    for name, expected in files.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{file}: missing"
        size = os.path.getsize(file)
        if size != expected["size"]:
            return f"{file}: {size:,} bytes, {expected['size']:,} were written"
        if file_checksum(file, size) != expected["crc32"]:
            return f"{file}: its contents changed since it was written (checksum)"
    return None


def checked_checkpoint(folder):
    """`folder` when its files are as written; CheckpointError naming the file otherwise (predict, chat, export)."""
    problem = checkpoint_problem(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
    saved_training_args(folder)  # readable
    return folder


def resumable_checkpoint(output_dir, warn):
    """The newest checkpoint whose files are intact: the `latest` one, else (each skipped one said in a line) the
    complete ones before it."""
    latest = latest_checkpoint(output_dir)
    candidates = [latest] if latest else []
    candidates += [os.path.join(output_dir, n) for n in reversed(checkpoint_folders(output_dir))
                   if os.path.join(output_dir, n) != latest]
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None and os.path.isfile(os.path.join(folder, TRAINING_ARGS_FILE)):
            return folder
        warn(f"warning: {folder} is damaged ({problem or 'no training_args.json'}); trying the checkpoint before it")
    return None


# ---- fingerprints of what a run was trained on ------------------------------------------------------------------------

def weight_shapes(model_dir):
    """{tensor name: shape} of a model folder's weights, read from the safetensors headers (or, for .bin files,
    memory-mapped without unpickling anything but tensors)."""
    import glob
    shapes = {}  # the weights' files only: a checkpoint folder also holds our state in safetensors
    for path in sorted(glob.glob(os.path.join(model_dir, "model*.safetensors"))):
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


@functools.lru_cache(maxsize=8)
def data_fingerprint(path):
    """SHA-256 of a data file's bytes (training files are megabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the output folder of a run -----------------------------------------------------------------------------------

class OutputFolderLock:
    """Held for a whole run (a training's rank 0, a prediction): a second one into the same folder is refused
    instead of mixing their files. flock is released by the kernel when the process ends, however it ends, so a
    killed run never blocks the next."""

    def __init__(self, output_dir, what="a training run", option="--output_dir"):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise SystemExit(f"error: {output_dir} is in use by {what} that is still going ({holder}); wait for it, "
                             f"stop it, or choose another {option}") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()


def stale_temporary_folders(output_dir):
    return [n for n in os.listdir(output_dir) if n.startswith(".checkpoint-") and n.endswith(".tmp")] \
        if os.path.isdir(output_dir) else []


def remove_stale_temporary_folders(output_dir):
    """What saves that were killed left behind (a full fine-tuning one is ~100 GB): removed at every start."""
    for name in stale_temporary_folders(output_dir):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def run_method(output_dir):
    """The method of the run whose checkpoints `output_dir` holds (from its newest readable training_args), or None."""
    for name in reversed(checkpoint_folders(output_dir)):
        try:
            method = saved_training_args(os.path.join(output_dir, name)).get("method")
        except CheckpointError:
            continue
        if method:
            return method
    return None


def check_output_dir(args, method_name, warn):
    """Before anything loads: a fresh run (no --resume) into a folder holding another run's checkpoints is refused
    unless --overwrite_output_dir; --resume needs an intact checkpoint of the same method. Returns it (or None)."""
    existing = checkpoint_folders(args.output_dir)
    other = run_method(args.output_dir)
    if args.resume:
        if other and other != method_name:
            raise SystemExit(f"error: --resume: {args.output_dir} holds a finetuning_{other}.py run, and this is "
                             f"finetuning_{method_name}.py: resume it with finetuning_{other}.py, or choose another "
                             "--output_dir")
        folder = resumable_checkpoint(args.output_dir, warn)
        if folder is None:
            raise SystemExit(f"error: --resume: no complete checkpoint in {args.output_dir}; drop --resume to start "
                             "a new run")
        return folder
    if existing or os.path.isfile(os.path.join(args.output_dir, "metrics.jsonl")):
        if not args.overwrite_output_dir:
            held = f"a finetuning_{other}.py run" if other else "another run"
            hint = "--resume continues it, " if other in (None, method_name) else ""
            raise SystemExit(f"error: {args.output_dir} holds {held} ({', '.join(existing[-3:]) or 'metrics.jsonl'}"
                             f"): {hint}--overwrite_output_dir deletes it and starts over, or choose another "
                             "--output_dir")
    return None


def clear_output_dir(output_dir):
    """--overwrite_output_dir: remove the checkpoints and files an earlier run wrote (nothing else)."""
    for name in checkpoint_folders(output_dir) + list(RUN_FILES) + stale_temporary_folders(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)


# ---- what must be the same to resume ------------------------------------------------------------------------------

def resume_differences(saved, args, world_size, own_optimizer):
    """{setting: (then, now)} of what differs between the run that wrote a checkpoint and this one, for the settings
    that shape the run (training_options.NOT_COMPARED_ON_RESUME are not compared). The data and the base are
    compared by their fingerprints, so a file that moved is still the same file."""
    from training_options import NOT_COMPARED_ON_RESUME
    now = {**vars(args), "world_size": world_size}
    differences = {k: (saved[k], v) for k, v in now.items()
                   if k in saved and k not in NOT_COMPARED_ON_RESUME and saved[k] != v}
    written = saved.get("optimizer")
    if written and (written if written in ("MasterWeightAdamW", "DataParallelAdamW") else None) != own_optimizer:
        differences["optimizer"] = (written, own_optimizer or "a DeepSpeed ZeRO one")
    if saved.get("train_fingerprint") and saved["train_fingerprint"] != data_fingerprint(args.train_path):
        differences["train_path"] = (f"{saved.get('train_path')} (its rows then)", f"{args.train_path} (other rows)")
    changed = fingerprint_changes(saved.get("base_fingerprint"), args.model_dir)
    if changed:
        differences["model_dir"] = (saved.get("model_dir"), f"{args.model_dir} ({' and '.join(changed)} differ)")
    return differences


def check_resume(folder, args, world_size, own_optimizer, log):
    """Before the model loads: refuse a checkpoint written with other settings, each difference named, unless it is
    one --resume_with_changes accepts and that flag is given. Returns the accepted changes {name: (then, now)}."""
    from training_options import CHANGEABLE_ON_RESUME
    differences = resume_differences(saved_training_args(folder), args, world_size, own_optimizer)
    fixed = {k: v for k, v in differences.items() if k not in CHANGEABLE_ON_RESUME}
    changeable = {k: v for k, v in differences.items() if k in CHANGEABLE_ON_RESUME}
    if fixed or (changeable and not args.resume_with_changes):
        listed = "; ".join(f"--{k} {then} (now {now})" for k, (then, now) in {**fixed, **changeable}.items())
        advice = "resume with the settings that wrote it, or start a new run" if fixed else \
            "--resume_with_changes accepts these (the schedule is rebuilt for them), or resume with the old values"
        raise SystemExit(f"error: --resume: {folder} was written with other settings: {listed}: {advice}")
    if changeable:
        log("resuming with changes: " + "; ".join(f"--{k} {then} -> {now}" for k, (then, now) in changeable.items()))
    return changeable


# ---- our own state, without pickles -----------------------------------------------------------------------------------

def save_tree(tree, path):
    """A nest of dicts, lists, tuples, numbers, strings and tensors as one safetensors file: the tensors as tensors,
    the rest as JSON in its metadata (read back without unpickling anything)."""
    from safetensors.torch import save_file
    tensors = {}

    def encode(value, key):
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(value, dict):
            return {"dict": [[k, encode(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"tuple" if isinstance(value, tuple) else "list": [encode(v, f"{key}.{i}")
                                                                      for i, v in enumerate(value)]}
        return {"value": value}
    structure = encode(tree, "state")
    save_file(tensors, path, metadata={"structure": json.dumps(structure)})


def load_tree(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        structure = json.loads(f.metadata()["structure"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def decode(node):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: decode(v) for k, v in node["dict"]}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(decode(v) for v in node["tuple"])
        return node["value"]
    return decode(structure)


def random_states():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def restore_random_states(rng):
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def read_own_state(folder, stem):
    """`stem`.safetensors, or the .pt of checkpoints written before (loaded with weights_only: tensors and plain
    values, no code)."""
    path = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(path):
        return load_tree(path)
    legacy = os.path.join(folder, f"{stem}.pt")
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (whatever a file refused as unsafe or damaged raises)
        raise CheckpointError(f"{legacy}: not a state this suite wrote, or damaged; it was not loaded "
                              f"({type(err).__name__})") from None


# ---- writing ----------------------------------------------------------------------------------------------------

class SaveFailed(Exception):
    """A checkpoint could not be written (disk full, say); nothing of it was kept."""


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


def folder_size(path):
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


def checkpoint_size_estimate(engine, output_dir):
    """Bytes the next checkpoint takes: the previous one's size, or for the first what its parts must hold (each
    trained parameter, its fp32 master and two Adam moments, once more as the method's own file) and 16 MiB for the
    tokenizer and the rest. A save that finds less room than that said stops before writing; one that runs out of
    room anyway stops as cleanly (save_checkpoint)."""
    previous = latest_checkpoint(output_dir)
    if previous:
        return folder_size(previous)
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    return sum(p.numel() * (2 * p.element_size() + 12) for p in trained) + (16 << 20)


def check_free_space(output_dir, needed, name):
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise SaveFailed(f"{free / 2 ** 20:,.0f} MiB free in {output_dir}, and {name} needs about "
                         f"{needed / 2 ** 20:,.0f} MiB")


def sync_folder(folder):
    """Every file under `folder`, and the folder itself, flushed to the disk (a rename is only as good as the data
    it points at: after a power cut an unflushed file can be there by name and empty)."""
    for root, dirs, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        sync_directory(root)


def sync_directory(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def all_ranks_agree(failure, device):
    """The first failure message of any rank (every rank calls this), or None: a rank that cannot write must not
    leave the others waiting at a barrier."""
    if not torch.distributed.is_initialized():
        return failure
    flag = torch.tensor([1.0 if failure else 0.0], device=device)
    torch.distributed.all_reduce(flag)
    if flag.item() and not failure:
        return "another process could not write its part"
    return failure


def save_checkpoint(engine, method, args, tokenizer, progress, rank, world_size):
    """Write checkpoint-<step>: into a temporary folder, flushed, listed (sizes, checksums) and renamed when
    complete; then `latest` points at it. A disk that cannot hold it (checked before, or full during the writing)
    raises SaveFailed with nothing of it left behind."""
    from folders import readable_by_others
    name = f"checkpoint-{progress['step']}"
    final, tmp = os.path.join(args.output_dir, name), os.path.join(args.output_dir, f".{name}.tmp")
    device = engine.device
    failure = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            check_free_space(args.output_dir, checkpoint_size_estimate(engine, args.output_dir), name)
            os.makedirs(tmp)
        except (SaveFailed, OSError) as err:
            failure = str(err)
    failure = all_ranks_agree(failure, device)
    if not failure:
        try:
            engine.save_checkpoint(os.path.join(tmp, "ds_state"), tag="state", client_state=dict(progress),
                                   exclude_frozen_parameters=True)
            if hasattr(engine.optimizer, "shard_state_dict"):  # DataParallelAdamW: each process its slice's state
                save_tree(engine.optimizer.shard_state_dict(), os.path.join(tmp, f"optimizer_shard_{rank}.safetensors"))
            save_tree(random_states(), os.path.join(tmp, f"rng_state_{rank}.safetensors"))
        except OSError as err:
            failure = f"{err.strerror or err} while writing {name}"
        failure = all_ranks_agree(failure, device)
    state = trained_state_dict(engine) if not failure else None
    if rank == 0 and not failure:
        try:
            method.save(engine.module, state, tmp, args)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(os.path.join(tmp, TRAINING_ARGS_FILE), {
                "method": method.name, "optimizer": type(engine.optimizer).__name__, "world_size": world_size,
                **vars(args), "progress": dict(progress), "train_fingerprint": data_fingerprint(args.train_path),
                "base_fingerprint": base_fingerprint(args.model_dir)})
            readable_by_others(tmp)
            write_manifest(tmp)
            sync_folder(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(args.output_dir, "latest.tmp"), "w") as f:
                f.write(name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(args.output_dir, "latest.tmp"), os.path.join(args.output_dir, "latest"))
            sync_directory(args.output_dir)
            delete_old_checkpoints(args.output_dir, args.keep_checkpoints)
        except OSError as err:
            failure = f"{err.strerror or err} while writing {name}"
    failure = all_ranks_agree(failure, device)
    if failure:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(failure)
    return final


def delete_old_checkpoints(output_dir, keep):
    """Remove all but the newest `keep` checkpoint-<step> folders (only after the newest is complete)."""
    if keep <= 0:
        return
    for name in checkpoint_folders(output_dir)[:-keep]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def resume_from_checkpoint(engine, folder, rank, changes):
    """Load the optimizer, scheduler and random state of `folder`; returns the run position it was saved at. A
    learning rate changed with --resume_with_changes becomes the schedule's peak from here on (the schedule's
    length always follows this run's settings)."""
    written, now = saved_training_args(folder).get("optimizer"), type(engine.optimizer).__name__
    if written and written != now:
        raise SystemExit(f"error: --resume: {folder} was written with the {written} optimizer and this run uses "
                         f"{now}: resume with the same precision, --zero_stage, --offload and number of processes")
    _, progress = engine.load_checkpoint(os.path.join(folder, "ds_state"), tag="state", load_module_strict=False)
    if hasattr(engine.optimizer, "load_shard_state_dict"):
        engine.optimizer.load_shard_state_dict(read_own_state(folder, f"optimizer_shard_{rank}"))
    restore_random_states(read_own_state(folder, f"rng_state_{rank}"))
    if "learning_rate" in changes:
        rebuild_learning_rate(engine, changes["learning_rate"][1])
    return {k: progress[k] for k in ("step", "epoch", "batches_done")}


def rebuild_learning_rate(engine, learning_rate):
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for group, lr_lambda in zip(engine.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]


def trained_base(checkpoint, saved, given=None):
    """The base model folder a checkpoint was trained on: `given` (--ori_model_dir), else the path training recorded,
    else a folder of that name beside the training's output folder or the checkpoint (the two moved together)."""
    if given:
        if not os.path.isdir(given):
            raise CheckpointError(f"--ori_model_dir {given}: folder not found")
        return given
    recorded = saved.get("model_dir")
    if not recorded:
        raise CheckpointError(f"{checkpoint} does not say which base model it was trained on: pass --ori_model_dir")
    output_dir = os.path.dirname(os.path.abspath(checkpoint))
    candidates = [recorded] + [os.path.join(place, os.path.basename(os.path.normpath(recorded)))
                               for place in (os.path.dirname(output_dir), output_dir)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise CheckpointError(f"the base model {recorded} that {checkpoint} was trained on is not there (nor beside the "
                          "checkpoint): pass its folder with --ori_model_dir")
