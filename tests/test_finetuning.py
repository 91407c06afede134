"""The fine-tuning scripts through the real deepspeed launcher (CPU accelerator) on a tiny model."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODES, launch, launch_all, metrics_of
from model_family import load_model

# which parameters each mode may change (the prefix of the name, PEFT's wrapper prefix removed)
TRAINED = {
    "freeze": lambda name: name.startswith("transformer.layers.1."),
    "pt2": lambda name: name.startswith("transformer.prefix_encoder."),
    "pt2_projection": lambda name: name.startswith("transformer.prefix_encoder."),
    "pt_embedding_only": lambda name: name.startswith("transformer.prefix_encoder."),
    "lora": lambda name: ".lora_" in name,
    "full": lambda name: True,
}


def latest(output_dir):
    with open(os.path.join(output_dir, "latest")) as f:
        return os.path.join(output_dir, f.read().strip())


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_falls(trained, mode):
    losses = [r["loss"] for r in metrics_of(trained[mode]) if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    if mode != "pt_embedding_only":  # a soft input prompt cannot hold six answers; the others learn them by heart
        assert losses[-1] < 0.05


@pytest.mark.parametrize("mode", list(MODES))
def test_only_the_intended_parameters_change(trained, tiny_model_dir, mode):
    final = load_file(os.path.join(trained[mode], "final_state.safetensors"))
    final = {k.removeprefix("base_model.model."): v for k, v in final.items()}
    base = load_model(tiny_model_dir).state_dict()
    changed, trained_names = [], [k for k in final if TRAINED[mode](k)]
    for name, value in final.items():
        original = base.get(name.replace(".base_layer", ""))
        if TRAINED[mode](name):
            continue
        assert original is not None, name
        if not torch.equal(value, original):
            changed.append(name)
    assert changed == []  # every frozen parameter is bit-identical
    assert trained_names
    if mode in ("freeze", "full"):
        assert any(not torch.equal(final[k], base[k]) for k in trained_names)
    if mode == "full":  # every weight matrix moved, the embedding (tied to the LM head) among them
        assert all(not torch.equal(final[k], base[k]) for k in trained_names if final[k].ndim == 2)


@pytest.mark.parametrize("mode", list(MODES))
def test_checkpoint_holds_only_what_was_trained(trained, mode):
    folder = latest(trained[mode])
    files = set(os.listdir(folder))
    assert {"training_args.json", "ice_text.model", "tokenizer_config.json", "ds_state"} <= files
    if mode == "full":  # a whole model folder, as the base: it loads as a base model would
        assert {"config.json", "model.safetensors"} <= files
        # each checkpoint holds the whole model and its optimizer state: only the newest is kept by default
        assert [n for n in os.listdir(trained[mode]) if n.startswith("checkpoint-")] == [os.path.basename(folder)]
        loaded = load_model(folder).state_dict()
        final = load_file(os.path.join(trained[mode], "final_state.safetensors"))  # the run's last step
        assert loaded.keys() == final.keys()
        assert all(torch.equal(loaded[k], final[k]) for k in final)
    elif mode == "lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        names = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert names and all("lora_" in k for k in names)
    else:
        names = load_file(os.path.join(folder, "model.safetensors"))
        assert names and all(TRAINED[mode](k) for k in names)
    if mode.startswith("pt"):
        config = json.load(open(os.path.join(folder, "config.json")))
        assert config["pre_seq_len"] == 8
        assert config["prefix_projection"] == (mode == "pt2_projection")
        assert config["prompt_embedding_only"] == (mode == "pt_embedding_only")


def test_progress_metrics_and_loss_curve(trained):
    out = trained["lora"]
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))
    record = metrics_of(out)[-1]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(record) and record["tokens_per_s"] > 0
    assert 0 < metrics_of(out)[0]["seconds_to_first_step"] < record["elapsed_s"]


def resume_args(model_dir, rows, out, precision):
    return ["--model_dir", model_dir, "--train_path", rows, "--output_dir", out, "--prompt_text", "抽取：",
            "--num_train_epochs", 3, "--train_batch_size", 2, "--max_len", 128, "--max_src_len", 100, precision,
            "--log_steps", 1, "--learning_rate", 1e-2, "--lora_r", 8, "--save_steps", 2]


def test_ranks_remove_their_shared_memory_buffers_as_they_end(tiny_model_dir, few_rows, tmp_path):
    """DeepSpeed's CPU communication leaves a 66 MB buffer per rank in /dev/shm (memory); each rank removes its own."""
    out = str(tmp_path / "out")
    result = launch("finetuning_lora.py", *resume_args(tiny_model_dir, few_rows, out, "--fp32"), "--stop_after_steps", 1,
                    ranks=2)
    assert os.path.basename(latest(out)) == "checkpoint-1"
    assert result.leftover_shm_buffers == []


# fp32: DeepSpeed's ZeRO-1 optimizer; bf16 in one process: optimizer.MasterWeightAdamW (its fp32 masters must resume)
PRECISIONS = ("--fp32", "--bf16")


@pytest.fixture(scope="module")
def resumed_runs(tiny_model_dir, few_rows, tmp_path_factory):
    """LoRA in fp32 and in bf16: a whole run, and one stopped at step 4 then resumed with --resume; and a copy of
    the stopped bf16 run resumed with another optimizer (refused). Each stage's launches run side by side."""
    root = tmp_path_factory.mktemp("resume")
    runs = {(precision, part): str(root / f"{precision[2:]}-{part}") for precision in PRECISIONS
            for part in ("whole", "pieces")}
    launch_all([("finetuning_lora.py", *resume_args(tiny_model_dir, few_rows, out, precision),
                 *(["--stop_after_steps", 4] if part == "pieces" else [])) for (precision, part), out in runs.items()])
    stopped_at = {precision: os.path.basename(latest(runs[precision, "pieces"])) for precision in PRECISIONS}
    other_optimizer = str(root / "bf16-other-optimizer")
    shutil.copytree(runs["--bf16", "pieces"], other_optimizer)
    for precision in PRECISIONS:  # a save killed half way leaves a temporary folder behind; it must be ignored
        os.makedirs(os.path.join(runs[precision, "pieces"], ".checkpoint-6.tmp", "ds_state"))
    resumes = [(runs[precision, "pieces"], precision, []) for precision in PRECISIONS]
    resumes.append((other_optimizer, "--bf16", ["--zero_stage", 2]))
    results = launch_all([("finetuning_lora.py", *resume_args(tiny_model_dir, few_rows, out, precision), "--resume",
                           *more) for out, precision, more in resumes], check=False)
    return runs, stopped_at, other_optimizer, results


@pytest.mark.parametrize("precision", PRECISIONS)
def test_kill_and_resume_ends_with_the_same_loss(resumed_runs, precision):
    """LoRA with dropout: the resumed run must restore weights, optimizer, schedule, data order and random state."""
    runs, stopped_at, _, results = resumed_runs
    whole, pieces = runs[precision, "whole"], runs[precision, "pieces"]
    assert stopped_at[precision] == "checkpoint-4"
    resume = results[PRECISIONS.index(precision)]
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    # checkpoints at steps 2, 4, 6, 8 (--save_steps 2) and 3, 6, 9 (epoch ends); the newest three are kept
    assert sorted(n for n in os.listdir(whole) if n.startswith("checkpoint-")) == \
        ["checkpoint-6", "checkpoint-8", "checkpoint-9"]
    first, second = ([r for r in metrics_of(out) if "loss" in r] for out in (whole, pieces))
    # each launch logs the wait for its first step once (the resumed run's first step is step 5)
    assert [r["step"] for r in metrics_of(pieces) if "seconds_to_first_step" in r] == [1, 5]
    assert [r["step"] for r in first] == [r["step"] for r in second] == list(range(1, 10))
    for a, b in zip(first, second):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])


def test_resuming_with_another_optimizer_is_a_clear_error(resumed_runs):
    _, _, out, results = resumed_runs
    result = results[-1]
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "was written with other settings: --zero_stage 1 (now 2); --optimizer MasterWeightAdamW" in output
    assert "trainable parameters" not in output  # refused before the model loaded
    assert os.path.isdir(os.path.join(out, "checkpoint-4"))  # nothing lost


# on a GPU also with the step as CUDA graphs and fused AdamW; there the two clip by a divisor vs a factor, and the
# difference in the last bit can round a bf16 weight the other way. On the CPU too, on some processors: Freeze's curve
# matched to 1e-6 on the CI machine and drifted by 4e-4 (relative, from step 3, on a loss falling 56 -> 31) on
# another two-core machine with the same packages; a wrong update moves the curve by far more than 1e-3
@pytest.mark.parametrize("script, accelerator, tolerance", [("finetuning_freeze.py", "cpu", 1e-3),
                                                           ("finetuning_lora.py", "cpu", 1e-6)]
                         + [("finetuning_freeze.py", "cuda", 1e-2)] * torch.cuda.is_available())
def test_bf16_in_one_process_follows_deepspeeds_own_mixed_precision_optimizer(tiny_model_dir, few_rows, tmp_path,
                                                                              script, accelerator, tolerance):
    """ZeRO-1 in one process runs optimizer.MasterWeightAdamW; ZeRO-2 keeps DeepSpeed's bf16 optimizer: same curve
    (LoRA too: its adapters, which PEFT makes in fp32, train in bf16 both ways)."""
    method = ["--num_trainable_layers", 1] if "freeze" in script else ["--lora_r", 4, "--lora_dropout", 0]
    outs = {stage: str(tmp_path / f"zero{stage}") for stage in (1, 2)}
    results = launch_all([(script, "--model_dir", tiny_model_dir, "--train_path", few_rows, "--output_dir", outs[stage],
                           "--prompt_text", "抽取：", "--max_len", 128, "--max_src_len", 100, "--bf16",
                           "--zero_stage", stage, *method, "--learning_rate", 1e-2, "--max_grad_norm", 0.5,
                           "--log_steps", 1, "--max_steps", 5, "--no-compile") for stage in outs],
                         accelerator=accelerator)
    curves = {}
    for stage, result in zip(outs, results):
        assert ("optimizer: MasterWeightAdamW" in result.stdout) == (stage == 1), result.stdout[-2000:]
        curves[stage] = [r["loss"] for r in metrics_of(outs[stage]) if "loss" in r]
    assert len(curves[1]) == 5 and curves[1][-1] < (0.7 if "freeze" in script else 0.95) * curves[1][0]
    assert curves[1] == pytest.approx(curves[2], rel=tolerance)


def test_bf16_with_checkpointing_grouping_and_eval(tiny_model_dir, tmp_path):
    out = str(tmp_path / "bf16")
    result = launch("finetuning_lora.py", "--model_dir", tiny_model_dir, "--output_dir", out, "--bf16",
                    "--gradient_checkpointing", "--group_by_length", "--max_steps", 6, "--log_steps", 2,
                    "--eval_path", "data/spo_test.jsonl", "--save_steps", 3, "--gradient_accumulation_steps", 2)
    assert "lora: trainable parameters" in result.stdout
    records = metrics_of(out)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "checkpoint-3", "checkpoint-6", "latest", "loss_curve.png", "metrics.jsonl", "tensorboard"]


def test_save_epochs_saves_every_nth_epoch_end_and_the_last_step(tiny_model_dir, few_rows, tmp_path):
    out = str(tmp_path / "run")
    launch("finetuning_lora.py", "--model_dir", tiny_model_dir, "--train_path", few_rows, "--output_dir", out,
           "--train_batch_size", 2, "--num_train_epochs", 5, "--save_epochs", 2, "--keep_checkpoints", 0,
           "--prompt_text", "抽取：", "--max_len", 64, "--max_src_len", 48, "--fp32", launcher=False)  # 3 steps an epoch
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == \
        ["checkpoint-12", "checkpoint-15", "checkpoint-6"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "answer": "b"}\n{"text": "c", "answer": \n', "bad.jsonl:2: not valid JSON"),
    ('{"text": "a", "answer": "b"}\n{"text": "c"}\n', "bad.jsonl:2: row without 'answer'"),
    ('{"text": "a", "answer": ""}\n', "bad.jsonl:1: empty answer"),
    ("", "bad.jsonl: empty file, no rows"),
])
def test_bad_input_stops_with_one_line(tiny_model_dir, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    result = launch("finetuning_lora.py", "--model_dir", tiny_model_dir, "--train_path", path,
                    "--output_dir", tmp_path / "out", launcher=False, check=False)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_missing_model_folder_is_named(tmp_path):
    result = launch("finetuning_lora.py", "--model_dir", tmp_path / "nowhere", launcher=False, check=False)
    assert result.returncode != 0 and f"error: --model_dir: {tmp_path}/nowhere: model folder not found" in result.stderr
