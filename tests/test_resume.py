"""Resume and checkpoints that can be trusted: every setting that shapes a run is compared before the weights load
(a changed data file, LoRA rank or learning rate refused, each named; --resume_with_changes takes what may change and
rebuilds the schedule), no pickle of ours is read (a planted one is not run), a damaged latest checkpoint falls back
to the one before, a full disk stops cleanly with the previous checkpoint intact and resumable to the same loss,
stale temporary folders go, files are readable by others; the new user's cases are one line each."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, launch, launch_all, logged_losses, metrics_of

LORA = ["--lora_r", 4, "--lora_dropout", 0, "--learning_rate", 5e-3]


def lora_args(model_dir, rows, out, *extra, epochs=8):
    return ["--model_dir", model_dir, "--train_path", rows, "--output_dir", out, "--max_len", 128,
            "--max_src_len", 100, "--fp32", "--num_train_epochs", epochs, "--train_batch_size", 2, "--log_steps", 1,
            "--save_steps", 3, *LORA, *extra]


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, few_rows, tmp_path_factory):
    """LoRA for 2 epochs of 3 steps (checkpoints at 3 and 6) planned for 8 epochs (stopped at step 6), beside the
    same run uninterrupted: the reference losses."""
    base = tmp_path_factory.mktemp("resume")
    run, whole = str(base / "run"), str(base / "whole")
    os.makedirs(run)
    os.makedirs(os.path.join(run, ".checkpoint-99.tmp"))  # what a killed save left: removed at the start
    with open(os.path.join(run, ".checkpoint-99.tmp", "optimizer_state.pt"), "w") as f:
        f.write("x" * 1000)
    launch_all([("finetuning_lora.py", *lora_args(tiny_model_dir, few_rows, run, "--stop_after_steps", 6)),
                ("finetuning_lora.py", *lora_args(tiny_model_dir, few_rows, whole))], launcher=False)
    return tiny_model_dir, few_rows, run, whole


def test_stale_temporary_folders_go_and_the_files_are_readable_by_others(saved_run):
    _, _, run, _ = saved_run
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    adapter = os.path.join(run, "checkpoint-6", "adapter_model.safetensors")
    assert os.stat(adapter).st_mode & 0o777 == 0o666 & ~umask  # safetensors alone writes 0600
    assert os.path.isfile(os.path.join(run, "checkpoint-6", "checkpoint_files.json"))


def test_our_state_is_saved_without_pickles(saved_run):
    _, _, run, _ = saved_run
    names = os.listdir(os.path.join(run, "checkpoint-6"))
    assert "rng_state_0.safetensors" in names and not [n for n in names if n.endswith(".pt")]


@pytest.mark.parametrize("change, words", [
    (["--lora_r", 8], "--lora_r 4 (now 8)"),
    (["--learning_rate", 1e-3], "--learning_rate 0.005 (now 0.001)"),
    (["--seed", 7], "--seed 1234 (now 7)"),
    (["--max_len", 120], "--max_len 128 (now 120)"),
])
def test_a_resume_with_changed_settings_is_refused_before_the_weights_load(saved_run, change, words):
    model_dir, rows, run, _ = saved_run
    args = lora_args(model_dir, rows, run, "--resume")
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i:i + 2]
    line = error_line(launch("finetuning_lora.py", *args, launcher=False, check=False))
    assert words in line and "--resume" in line
    assert os.path.isdir(os.path.join(run, "checkpoint-6"))  # nothing lost


def test_a_resume_on_other_rows_is_refused_even_under_the_same_name(saved_run, tmp_path):
    model_dir, rows, run, _ = saved_run
    other = tmp_path / "few.jsonl"
    lines = open(rows, encoding="utf-8").read().splitlines(keepends=True)
    other.write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")  # the same rows in another order
    result = launch("finetuning_lora.py", *lora_args(model_dir, str(other), run, "--resume"), launcher=False,
                    check=False)
    assert "--train_path" in error_line(result) and "other rows" in error_line(result)
    assert "trainable parameters" not in result.stdout  # before anything loaded


def test_resume_with_changes_takes_a_new_length_and_learning_rate_and_records_them(saved_run, tmp_path):
    model_dir, rows, run, _ = saved_run
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    args = lora_args(model_dir, rows, copy, "--resume", epochs=8)
    args[args.index("--learning_rate") + 1] = 1e-3
    refused = launch("finetuning_lora.py", *args, launcher=False, check=False)
    assert "--resume_with_changes accepts these" in error_line(refused)
    result = launch("finetuning_lora.py", *args, "--resume_with_changes", launcher=False)
    assert "resuming with changes: --learning_rate 0.005 -> 0.001" in result.stdout
    after = [r for r in metrics_of(copy) if "lr" in r and r["step"] == 7][-1]
    total, warmup = 24, 2  # 8 epochs of 3 steps; 10% warm-up
    assert after["lr"] == pytest.approx(1e-3 * (1 - (7 - warmup) / (total - warmup)), rel=1e-6)
    with open(os.path.join(copy, "latest")) as f, open(os.path.join(copy, f.read().strip(), "training_args.json")) as g:
        saved = json.load(g)
    assert saved["learning_rate"] == 1e-3 and saved["resumed_with_changes"]["learning_rate"] == [5e-3, 1e-3]


def test_a_planted_pickle_is_never_run(saved_run, tmp_path):
    """A checkpoint folder from elsewhere with a pickle where our random state goes: not unpickled, one line."""
    model_dir, rows, run, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    checkpoint = copy / "checkpoint-6"
    os.remove(checkpoint / "rng_state_0.safetensors")
    with open(checkpoint / "rng_state_0.pt", "wb") as f:
        pickle.dump({"python": Payload()}, f)
    from checkpoints import write_manifest
    write_manifest(str(checkpoint))  # as its author would have listed it
    result = launch("finetuning_lora.py", *lora_args(model_dir, rows, str(copy), "--resume"), launcher=False,
                    check=False)
    assert not marker.exists()
    assert "rng_state_0.pt: not a state this suite wrote" in error_line(result)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(saved_run, tmp_path):
    model_dir, rows, run, whole = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    adapter = copy / "checkpoint-6" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # cut short, as by a full disk or a bad copy
    result = launch("finetuning_lora.py", *lora_args(model_dir, rows, str(copy), "--resume"), launcher=False)
    warning = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "checkpoint-6 is damaged" in warning[0] and "adapter_model.safetensors" in warning[0]
    assert "resumed from" in result.stdout and "checkpoint-3 at step 3" in result.stdout
    assert logged_losses(str(copy))[-1] == pytest.approx(logged_losses(whole)[-1], abs=1e-6)
    # predict names the damaged file in one line
    damaged = tmp_path / "damaged"
    shutil.copytree(run + "/checkpoint-6", damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"")
    predicted = launch("predict_lora.py", "--model_dir", damaged, "--test_path", rows, "--device", "cpu",
                       launcher=False, check=False)
    assert "is damaged" in error_line(predicted) and "adapter_model.safetensors" in error_line(predicted)


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(saved_run):
    model_dir, rows, _, whole = saved_run
    result = launch("finetuning_lora.py", *lora_args(model_dir, rows, whole, "--resume"), launcher=False)
    assert "nothing to do" in result.stdout and "finished all 24 steps" in result.stdout, result.stdout[-2000:]
    assert "trainable parameters" not in result.stdout


TMPFS_MIB = 24  # a few of the tiny model's 5.4 MB checkpoints


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB: a real full disk (needs the right to mount, as root on CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_cleanly_and_the_run_resumes_to_the_same_loss(saved_run, small_disk, tmp_path):
    model_dir, rows, _, whole = saved_run
    out = small_disk / "run"
    result = launch("finetuning_lora.py", *lora_args(model_dir, rows, str(out), "--keep_checkpoints", 0),
                    launcher=False, check=False)
    line = error_line(result)
    assert "could not save step" in line and "MiB free" in line and "--resume" in line
    saved = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert saved and not [n for n in os.listdir(out) if n.endswith(".tmp")]  # nothing half written left
    from checkpoints import checkpoint_problem
    assert all(checkpoint_problem(str(out / n)) is None for n in saved)
    moved = tmp_path / "moved"  # the user frees space: here, the folder moves to a larger disk
    shutil.copytree(out, moved)
    launch("finetuning_lora.py", *lora_args(model_dir, rows, str(moved), "--resume", "--keep_checkpoints", 0),
           launcher=False)
    assert logged_losses(str(moved))[-1] == pytest.approx(logged_losses(whole)[-1], abs=1e-6)


def test_a_disk_that_fills_during_a_save_leaves_the_previous_checkpoint_alone(tmp_path):
    """ENOSPC from inside the writing (the free-space check passed): the temporary folder goes, `latest` stays."""
    import argparse
    import errno

    from checkpoints import SaveFailed, save_checkpoint
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "latest").write_text("checkpoint-3")

    class FullDiskEngine:
        device = torch.device("cpu")
        module = torch.nn.Linear(2, 2)
        optimizer = None

        def save_checkpoint(self, *args, **kwargs):
            os.makedirs(args[0], exist_ok=True)
            with open(os.path.join(args[0], "part"), "w") as f:
                f.write("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    args = argparse.Namespace(output_dir=str(out), keep_checkpoints=3)
    with pytest.raises(SaveFailed, match="No space left on device while writing checkpoint-6"):
        save_checkpoint(FullDiskEngine(), None, args, None, {"step": 6}, 0, 1)
    assert sorted(os.listdir(out)) == ["checkpoint-3", "latest"] and (out / "latest").read_text() == "checkpoint-3"


# ---- the new user's cases ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, extra, words", [
    ("finetuning_lora.py", ["--num_train_epochs", 0], "--num_train_epochs 0: a run needs at least one epoch"),
    ("finetuning_lora.py", ["--lora_r", 0], "--lora_r 0"),
    ("finetuning_pt.py", ["--pre_seq_len", 0], "--pre_seq_len 0"),
    ("finetuning_lora.py", ["--learning_rate", 0], "--learning_rate 0"),
])
def test_values_that_cannot_work_are_refused_before_anything_loads(tiny_model_dir, few_rows, tmp_path, script, extra,
                                                                  words):
    args = ["--model_dir", tiny_model_dir, "--train_path", few_rows, "--output_dir", tmp_path / "out"]
    start = time.time()
    result = launch(script, *args, *[str(a) for a in extra], launcher=False, check=False)
    assert words in error_line(result) and time.time() - start < 60


def test_another_methods_folder_is_named(saved_run, tmp_path):
    model_dir, rows, run, _ = saved_run
    args = ["--model_dir", model_dir, "--train_path", rows, "--output_dir", run, "--max_len", 128, "--max_src_len",
            100, "--fp32"]
    fresh = error_line(launch("finetuning_pt.py", *args, launcher=False, check=False))
    assert "holds a finetuning_lora.py run" in fresh and "--resume continues" not in fresh
    resumed = error_line(launch("finetuning_pt.py", *args, "--resume", launcher=False, check=False))
    assert "this is finetuning_pt.py" in resumed and "resume it with finetuning_lora.py" in resumed


def test_the_base_is_recorded_absolute_and_found_beside_a_moved_checkpoint(saved_run, tmp_path):
    from checkpoints import CheckpointError, saved_training_args, trained_base
    model_dir, _, run, _ = saved_run
    checkpoint = os.path.join(run, "checkpoint-6")
    saved = saved_training_args(checkpoint)
    assert os.path.isabs(saved["model_dir"])
    moved = tmp_path / "project"
    shutil.copytree(model_dir, moved / os.path.basename(model_dir))
    shutil.copytree(run, moved / "run")
    gone = {**saved, "model_dir": "/nowhere/" + os.path.basename(model_dir)}
    assert trained_base(str(moved / "run" / "checkpoint-6"), gone) == str(moved / os.path.basename(model_dir))
    with pytest.raises(CheckpointError, match="pass its folder with --ori_model_dir"):
        trained_base(str(tmp_path / "elsewhere" / "checkpoint-6"), gone)


def test_two_predictions_into_one_folder_and_a_background_one_stopped_by_sigint(saved_run, tmp_path):
    """The second prediction into a folder in use is refused; one started in the background (SIGINT ignored, as a
    non-interactive shell's `&` leaves it) stops on `kill -INT` with its partial file whole."""
    _, rows, run, _ = saved_run
    out = tmp_path / "pred"
    many = tmp_path / "many.jsonl"
    many.write_text(open(rows, encoding="utf-8").read() * 40, encoding="utf-8")
    command = [sys.executable, os.path.join(ROOT, "predict_lora.py"), "--model_dir", run, "--test_path", str(many),
               "--output_dir", str(out), "--device", "cpu", "--batch_size", 1]
    first = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    partial = out / "predictions.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 2):
        time.sleep(0.2)
    second = launch("predict_lora.py", *command[2:], launcher=False, check=False)
    assert "is in use by a prediction that is still going" in error_line(second)
    first.send_signal(signal.SIGINT)
    out_text, _ = first.communicate(timeout=60)
    assert first.returncode == 130 and "--resume to generate only the others" in out_text
    lines = partial.read_text().splitlines()
    assert lines and all(json.loads(line)["tokens"] is not None for line in lines)
