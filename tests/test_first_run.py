"""What a new user hit on a first run (issue 19): each defect, as the user met it, and the ecosystem gaps.

Checks that must come before the weights load are run on a copy of a tiny folder without its weights: had the
check come after loading, the error would be "no weights" instead.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from conftest import ROOT, free_port, launch, metrics_of, remove_shared_memory_buffers

QUIET = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}


@pytest.fixture(scope="module")
def weightless_model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weightless")
    for name in os.listdir(tiny_model_dir):
        if not name.startswith("pytorch_model"):
            shutil.copy(os.path.join(tiny_model_dir, name), folder / name)
    return str(folder)


def one_line_error(result, message):
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and message in errors[0], output[-2000:]
    assert "Traceback" not in output


def train_before_loading(model_dir, rows, out, *extra):
    return launch("finetuning_lora.py", "--model_dir", model_dir, "--train_path", rows, "--output_dir", out,
                  "--max_len", 128, "--max_src_len", 100, *extra, launcher=False, check=False)


# ---- 1. padded vocabulary --------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["static", "generate"])
def test_ids_past_the_tokenizer_are_never_generated_and_decode_safely(family_model_dirs, decoder):
    """ChatGLM3's output layer is padded (65,024 outputs for 64,798 tokens): a model that prefers a padded id must
    still generate real tokens, and decoding any id the model can produce must not crash."""
    from model_family import load_model, load_tokenizer
    from prediction import generate
    folder = family_model_dirs["chatglm3"]
    tokenizer, model = load_tokenizer(folder), load_model(folder).eval()
    vocab, outputs = tokenizer.vocab_size, model.config.padded_vocab_size
    assert outputs > vocab
    with torch.no_grad():  # every step's top logit is now a padded id
        model.transformer.output_layer.weight[vocab:] = model.transformer.output_layer.weight[:vocab].abs().max() * 50
    prompts = [tokenizer.encode("发动机 异响", add_special_tokens=True), tokenizer.encode("大灯", add_special_tokens=True)]
    new = generate(model, tokenizer, prompts, 6, 2, torch.device("cpu"), [tokenizer.eos_token_id], decoder=decoder)
    assert all(len(row) and max(row) < vocab for row in new), new
    assert isinstance(tokenizer.decode([outputs - 1, 5, vocab]), str)


def test_chatglm6b_tokenizer_decodes_ids_past_its_vocabulary(tiny_model_dir):
    from model_family import load_tokenizer
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer.encode("大灯", add_special_tokens=False)
    assert tokenizer.decode(ids + [tokenizer.vocab_size + 3]) == tokenizer.decode(ids)


# ---- 2. one line instead of a traceback ------------------------------------------------------------------------

def test_a_small_max_len_is_one_line_before_loading(weightless_model_dir, few_rows, tmp_path):
    result = launch("finetuning_lora.py", "--model_dir", weightless_model_dir, "--train_path", few_rows,
                    "--output_dir", tmp_path / "out", "--max_len", 20, launcher=False, check=False)
    one_line_error(result, "--max_src_len 450 leaves no room for the answer within --max_len 20")


def test_prediction_with_a_small_max_len_is_one_line(trained, few_rows, tmp_path):
    result = launch("predict_lora.py", "--model_dir", trained["lora"], "--test_path", few_rows, "--output_dir",
                    tmp_path, "--device", "cpu", "--max_len", 100, launcher=False, check=False)
    one_line_error(result, "--max_len 100 - --max_src_len 100 leaves no room for new tokens")


def test_invalid_utf8_names_the_line(tmp_path):
    from data_set import DataError, read_rows
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"text": "a", "answer": "b"}\n{"text": "c", "answer": "d"}\n'.encode() +
                     b'{"text": "\xe5\x8f", "answer": "x"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:3: not UTF-8 text"):
        read_rows(str(path))


class Run:
    """A script started in a session of its own, its output collected by a thread (to wait for a line)."""

    def __init__(self, command, cwd=ROOT):
        # faulthandler: a process that outlives its wait is sent SIGABRT and prints every thread's stack (stuck_at)
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self.process = subprocess.Popen([str(c) for c in command], cwd=cwd, env=env, start_new_session=True, **QUIET)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, condition, timeout=240):
        deadline = time.time() + timeout
        while not condition() and time.time() < deadline:
            assert self.process.poll() is None, f"ended early:\n{self.output[-3000:]}"
            time.sleep(0.2)
        assert condition(), f"not seen in {timeout} s:\n{self.output[-3000:]}"

    def stuck_at(self, processes):
        """Where `processes` are (their stacks, through faulthandler) and the output's tail: a failing wait's message."""
        for process in processes:
            try:
                os.kill(process.pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(3)
        return self.output[-6000:]

    def session_processes(self):
        return [p for p in psutil.process_iter(["pid"]) if _session_of(p) == self.process.pid]

    def kill_all(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_of(process):
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def test_a_signalled_launcher_stops_its_ranks_and_a_held_output_folder_is_refused(tiny_model_dir, few_rows,
                                                                                   tmp_path):
    """`kill -INT` to the deepspeed command: before, the launcher left with 130 and the rank trained on, orphaned,
    while a second run wrote into the same folder. Now the rank stops, says where, and the second run is refused."""
    out, port = str(tmp_path / "run"), free_port()
    run = Run(["deepspeed", "--num_gpus", "1", "--master_port", str(port), os.path.join(ROOT, "finetuning_lora.py"),
               "--model_dir", tiny_model_dir, "--train_path", few_rows, "--output_dir", out, "--max_len", 128,
               "--max_src_len", 100, "--fp32", "--num_train_epochs", 100000, "--save_steps", 5])
    try:
        run.wait_for(lambda: os.path.isfile(os.path.join(out, "latest")))
        second = train_before_loading(tiny_model_dir, few_rows, out, "--resume")
        one_line_error(second, f"{out} is in use by a training run that is still going")
        ranks = [p for p in run.session_processes() if p.pid != run.process.pid]
        assert ranks
        os.kill(run.process.pid, signal.SIGINT)  # the launcher alone, as `kill -INT`
        # a rank stops within seconds; 120 s leaves room for a loaded machine, and one that does not stop fails with
        # its threads' stacks (how an inherited, ignored SIGINT was found: conftest.py)
        gone, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, run.stuck_at(alive)
        run.process.wait(timeout=30)
        time.sleep(0.5)
        assert "interrupted: the latest complete checkpoint is" in run.output, run.output[-3000:]
        # DeepSpeed's runner prints its own KeyboardInterrupt traceback as it leaves; no frame is ours
        ours = [line for line in run.output.splitlines() if f'File "{ROOT}/' in line and "/.venv/" not in line]
        assert "--resume to continue" in run.output and not ours, ours
    finally:
        run.kill_all()
        remove_shared_memory_buffers(port)


def test_ctrl_c_during_prediction_says_how_to_resume(trained, tmp_path):
    out = tmp_path / "pred"
    # the training rows (hundreds, one at a time): the run must still be going when Ctrl-C comes
    run = Run([sys.executable, os.path.join(ROOT, "predict_lora.py"), "--model_dir", trained["lora"], "--test_path",
               "data/spo_train.jsonl", "--output_dir", str(out), "--device", "cpu", "--batch_size", 1,
               "--max_new_tokens", 300])
    try:
        partial = out / "predictions.partial.jsonl"
        run.wait_for(lambda: partial.exists() and partial.read_text().count("\n") >= 1)
        os.kill(run.process.pid, signal.SIGINT)
        try:
            code = run.process.wait(timeout=120)  # see the signalled launcher's test
        except subprocess.TimeoutExpired:
            raise AssertionError(run.stuck_at([run.process]))
        assert code == 130, run.output[-3000:]
        time.sleep(0.5)
        assert "interrupted: the rows generated so far are in" in run.output and "--resume" in run.output
        assert "Traceback" not in run.output and partial.exists()
    finally:
        run.kill_all()


# ---- 3. checks before loading ----------------------------------------------------------------------------------

def test_resume_without_a_checkpoint_is_refused_before_loading(weightless_model_dir, few_rows, tmp_path):
    result = train_before_loading(weightless_model_dir, few_rows, tmp_path / "empty", "--resume")
    one_line_error(result, "--resume: no complete checkpoint in")


def fake_run_folder(out, **settings):
    """An output folder whose latest checkpoint says how it was written."""
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_args.json").write_text(json.dumps({"method": "lora", **settings}))
    (out / "latest").write_text("checkpoint-4")
    return checkpoint


def test_resume_with_another_optimizer_layout_is_refused_before_loading(weightless_model_dir, few_rows, tmp_path):
    fake_run_folder(tmp_path / "run", optimizer="MasterWeightAdamW", precision="bf16", zero_stage=1, offload=False,
                    world_size=1)
    result = train_before_loading(weightless_model_dir, few_rows, tmp_path / "run", "--resume", "--fp32")
    one_line_error(result, "was written with other settings: --precision bf16 (now fp32); --optimizer MasterWeightAdamW")


def test_freeze_layer_count_is_checked_before_loading(weightless_model_dir, few_rows, tmp_path):
    result = launch("finetuning_freeze.py", "--model_dir", weightless_model_dir, "--train_path", few_rows,
                    "--output_dir", tmp_path / "out", "--num_trainable_layers", 5, launcher=False, check=False)
    one_line_error(result, "--num_trainable_layers 5: the model has 2 layers")


# ---- 4. no silent wrong answers --------------------------------------------------------------------------------

def test_a_new_run_into_another_runs_folder_is_refused_unless_overwritten(weightless_model_dir, few_rows, tmp_path):
    out = tmp_path / "run"
    old = fake_run_folder(out, optimizer="MasterWeightAdamW")
    (out / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    result = train_before_loading(weightless_model_dir, few_rows, out)
    one_line_error(result, "holds a finetuning_lora.py run (checkpoint-4): --resume continues it, "
                           "--overwrite_output_dir")
    assert old.is_dir() and (out / "metrics.jsonl").exists()  # nothing lost
    result = train_before_loading(weightless_model_dir, few_rows, out, "--overwrite_output_dir")
    one_line_error(result, "no weights")  # it went on to load the (missing) weights
    assert not old.exists() and not (out / "metrics.jsonl").exists() and not (out / "latest").exists()


def test_predict_takes_the_task_from_training_and_warns_when_triples_are_absent(capsys, tiny_model_dir):
    import argparse

    from data_set import Row
    from prediction import fill_defaults, warn_if_task_looks_wrong
    args = argparse.Namespace(max_len=None, max_src_len=None, prompt_text=None, mode=None, task=None,
                              ori_model_dir=None, max_new_tokens=None, quantization_bit=None,
                              quantization=None)
    fill_defaults(args, {"task": "classification", "model_dir": tiny_model_dir}, "checkpoint")
    assert args.task == "classification"
    rows = [Row("p", "t", ["1"], 1), Row("p", "t", ["0"], 2)]
    warn_if_task_looks_wrong("triple", rows)
    assert "none of the 2 references holds a triple" in capsys.readouterr().out
    warn_if_task_looks_wrong("triple", rows + [Row("p", "t", ["a_b_c"], 3)])
    warn_if_task_looks_wrong("classification", rows)
    assert capsys.readouterr().out == ""


# ---- 5. messages that say what is true -------------------------------------------------------------------------

def test_a_base_model_folder_given_as_checkpoint_is_named_as_such(tiny_model_dir, tmp_path):
    result = launch("predict_lora.py", "--model_dir", tiny_model_dir, "--output_dir", tmp_path, "--device", "cpu",
                    launcher=False, check=False)
    one_line_error(result, "is a base model folder, not a checkpoint")


def test_another_methods_checkpoint_names_the_right_script(trained, tmp_path):
    result = launch("predict_pt.py", "--model_dir", trained["lora"], "--output_dir", tmp_path, "--device", "cpu",
                    launcher=False, check=False)
    one_line_error(result, "is a checkpoint of finetuning_lora.py; predict with it through predict_lora.py")


def test_skipped_rows_are_reported_with_their_reason(tiny_model_dir, tmp_path):
    from data_set import Seq2SeqDataset
    from model_family import family_for, load_tokenizer
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "answer": "b"}\n{"text": "c", "answer": ""}\nnot json\n', encoding="utf-8")
    messages = []
    Seq2SeqDataset(str(path), load_tokenizer(tiny_model_dir), family_for(tiny_model_dir), 64, 32, "抽取：",
                   skip_bad=True, log=messages.append)
    assert "skipped 2 bad row(s): 1 x empty answer (line 2); 1 x not valid JSON" in messages[0]


def test_the_start_line_says_which_optimizer_steps():
    import argparse

    from optimizer import MasterWeightAdamW
    from training_engine import describe_optimizer

    class Engine:
        optimizer = MasterWeightAdamW([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}], max_grad_norm=1.0)

        def zero_optimization_stage(self):
            return 0
    line = describe_optimizer(Engine(), argparse.Namespace(zero_stage=1))
    assert "MasterWeightAdamW (one process: ZeRO-1 would partition nothing" in line and "stage 0" not in line


# ---- 6. loading noise ------------------------------------------------------------------------------------------

def test_ptuning_prediction_prints_no_load_report(trained, few_rows, tmp_path):
    result = launch("predict_pt.py", "--model_dir", trained["pt2"], "--test_path", few_rows, "--output_dir", tmp_path,
                    "--device", "cpu", launcher=False)
    output = result.stdout + result.stderr
    assert "LOAD REPORT" not in output and "newly initialized" not in output and '"f1"' in output


# ---- ecosystem -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pt2", "freeze", "lora"])
def test_export_writes_what_thudms_code_loads(trained, tmp_path, mode):
    from safetensors.torch import load_file

    from checkpoints import latest_checkpoint
    out = tmp_path / "thudm"
    launch("tools/export_checkpoint.py", "--model_dir", trained[mode], "--output_dir", out, launcher=False)
    source = latest_checkpoint(trained[mode])
    ours, theirs = ("adapter_model.safetensors", "adapter_model.bin") if mode == "lora" else \
        ("model.safetensors", "pytorch_model.bin")
    saved, exported = load_file(os.path.join(source, ours)), torch.load(out / theirs, weights_only=True)
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    assert not (out / "ds_state").exists() and not os.path.exists(os.path.join(source, theirs))
    if mode == "pt2":  # as THUDM's ptuning/main.py reads it: the prefix encoder's own names, and pre_seq_len
        prefix = {k[len("transformer.prefix_encoder."):]: v for k, v in exported.items()}
        assert set(prefix) == {"embedding.weight"}
        assert json.load(open(out / "config.json"))["pre_seq_len"] == 8


def test_tiny_folders_name_their_tokenizer_class_for_auto_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    with open(os.path.join(tiny_model_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["auto_map"] == {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    folder = tmp_path / "with_code"
    shutil.copytree(tiny_model_dir, folder)
    shutil.copy(os.path.join(ROOT, "tokenization_chatglm.py"), folder)  # the official folders ship their own file
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert type(tokenizer).__name__ == "ChatGLMTokenizer" and tokenizer.encode("大灯")


def test_tensorboard_events_hold_the_logged_losses(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(trained["lora"], "tensorboard"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in metrics_of(trained["lora"]) if "loss" in r]
    read = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in read] == [s for s, _ in logged]
    assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert {"lr", "tokens_per_s"} <= set(events.Tags()["scalars"])


def test_prediction_batch_fits_the_free_gpu_memory(tiny_model_dir, monkeypatch):
    from model_family import load_model
    from prediction import auto_batch_size
    model = load_model(tiny_model_dir)
    prompts = [[5] * 100] * 50
    assert auto_batch_size(model, prompts, 300, torch.device("cpu")) == 16
    config = model.config
    per_row = (2 * config.num_layers * config.hidden_size * 464 + 4 * 464 * config.inner_hidden_size) * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(per_row * 10 / 0.75), 0))
    assert auto_batch_size(model, prompts, 300, torch.device("cuda")) == 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 ** 12, 0))
    assert auto_batch_size(model, prompts, 300, torch.device("cuda")) == 50


# ---- the first hour, second look (issue 31) --------------------------------------------------------------------

def test_a_wrong_model_folder_is_said_before_deepspeed_is_imported(few_rows, tmp_path):
    """The check needs no DeepSpeed: with a DeepSpeed that cannot be imported the error is still the folder's (before,
    the CPU communication op was built first: `model folder not found` came after 169 s)."""
    fake = tmp_path / "fake" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('imported too early')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "finetuning_lora.py"), "--model_dir",
                             str(tmp_path / "nowhere"), "--train_path", few_rows], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    one_line_error(result, "nowhere: model folder not found")
    assert "imported too early" not in result.stderr


def test_deepspeeds_ops_are_built_per_python_environment(monkeypatch):
    import folders
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    first = folders.use_own_extension_builds()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    assert folders.use_own_extension_builds() != first
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    assert folders.use_own_extension_builds() == "/chosen"  # the user's choice wins


def test_a_second_training_on_the_launchers_default_port_is_one_line(tiny_model_dir, few_rows, tmp_path):
    """Another run holds --master_port: said in one line with the fix, not an EADDRINUSE traceback minutes later."""
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        result = subprocess.run(["deepspeed", "--num_gpus", "1", "--master_port", str(port),
                                 os.path.join(ROOT, "finetuning_lora.py"), "--model_dir", tiny_model_dir,
                                 "--train_path", few_rows, "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                                env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                                timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert f"port {port}" in errors[0] and f"--master_port {port + 1}" in errors[0]


def test_chatglm6b_image_tokens_are_never_generated(untied_model_dir):
    """Ids below num_image_tokens decode to nothing; a random (or undertrained) model writes little else."""
    from decoding import greedy_decode
    from model_family import load_model, load_tokenizer
    from prediction import ids_without_token, text_ids
    model, tokenizer = load_model(untied_model_dir).eval(), load_tokenizer(untied_model_dir)
    ids = torch.tensor([tokenizer.encode("发动机异响")])
    with torch.no_grad():
        free = greedy_decode(model, ids, torch.ones_like(ids), 30, [])
        text_only = greedy_decode(model, ids, torch.ones_like(ids), 30, [], text_ids=text_ids(tokenizer))
    assert (free < tokenizer.num_image_tokens).any()  # without the range, image tokens come out
    assert (text_only >= tokenizer.num_image_tokens).all()
    assert set(range(tokenizer.num_image_tokens)) <= set(ids_without_token(model, tokenizer))


def test_mostly_empty_predictions_are_said(capsys):
    from prediction import warn_if_mostly_empty
    warn_if_mostly_empty(["", "", "a"], [[5, 6], [7], [8]])
    assert "2 of 3 predictions are empty (3 tokens generated for them decode to no text)" in capsys.readouterr().out
    warn_if_mostly_empty(["a", "", "b"], [[1], [2], [3]])
    assert capsys.readouterr().out == ""


def test_help_gives_each_default_once_and_explains_the_main_options():
    import finetuning_lora
    from training_options import build_parser
    import re
    text = build_parser(finetuning_lora.LoRA()).format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and not re.search(r"default[^()]*\) \(default:", flat)
    for words in ("--output_dir OUTPUT_DIR where the checkpoints", "(default: output_dir_lora)",
                  "--num_train_epochs NUM_TRAIN_EPOCHS passes over the training rows (default: 5)",
                  "the peak learning rate", "(default: 0.0001 for LoRA", "overrides --num_train_epochs",
                  "a {text} in it marks where the text goes"):
        assert words in flat, words


def test_max_steps_sets_the_runs_length_as_in_transformers_trainer():
    import argparse

    from training import epochs_to_run, schedule_length

    class Sampler:
        def __len__(self):
            return 12
    args = argparse.Namespace(train_batch_size=2, gradient_accumulation_steps=1, num_train_epochs=1, max_steps=20,
                              train_path="rows")
    assert schedule_length(args, Sampler()) == (6, 20)  # beyond one epoch of 6 steps
    assert epochs_to_run(args, 6) == 4


def test_no_bitsandbytes_kernel_warning_on_a_cpu_run(weightless_model_dir, few_rows, tmp_path):
    result = train_before_loading(weightless_model_dir, few_rows, tmp_path / "out", "--lora_r", 0)
    assert "gemm_4bit_forward" not in result.stdout + result.stderr


def test_a_byte_order_mark_is_not_a_bad_row(tmp_path):
    from data_set import read_rows
    path = tmp_path / "notepad.jsonl"
    path.write_bytes('\ufeff{"text": "发动机异响", "answer": "发动机_部件故障_异响"}\n'.encode("utf-8"))
    assert read_rows(str(path))[0].text == "发动机异响"


def test_a_text_placeholder_puts_the_text_inside_the_prompt(tiny_model_dir):
    from data_set import encode_source, text_row
    from model_family import load_tokenizer
    tokenizer = load_tokenizer(tiny_model_dir)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ids, cut = encode_source(tokenizer, text_row("文本：{text}。请抽取三元组", "发动机异响" * 20, [""], 1), 15)
    assert ids[:len(encode("文本："))] == encode("文本：") and ids[-len(encode("。请抽取三元组")):] == encode("。请抽取三元组")
    assert cut and len(ids) == 15  # the text was cut, the prompt's end kept
    plain, _ = encode_source(tokenizer, text_row("抽取：", "异响", [""], 1), 30)
    assert plain == encode("抽取：") + encode("异响")
