import json
import os
import signal
import sys

# One thread per process: the tests run two launches at once on CI's two cores, and tiny models gain nothing from a
# second thread while two processes of two threads each spin against each other (300 tiny steps took 13 s in
# each of two parallel launches, 2 s with one thread each). Set before torch is imported, here and in every launch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ctrl-C as a terminal sends it: a suite started in the background by a non-interactive shell (`.ci/run &`)
# inherits SIGINT ignored, and so would every script it starts (an ignored signal stays ignored across exec), so the
# tests that interrupt a run would see it train on (two failures in such a CI run; under coreutils' `timeout`, which
# installs its own handler, they passed).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny ChatGLM-6B folder in the official layout (tied head, sharded .bin), tokenizer trained on data/."""
    from tools.make_tiny_model import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), num_layers=2, hidden_size=64,
                            num_attention_heads=4, inner_hidden_size=128)


@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory):
    """Like tiny_model_dir with a separate lm_head, so that greedy decoding of random weights is informative."""
    from tools.make_tiny_model import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("untied")), num_layers=2, hidden_size=64,
                            num_attention_heads=4, inner_hidden_size=128, tie_word_embeddings=False,
                            weights_format="safetensors", shards=1, seed=1)


@pytest.fixture(scope="session")
def family_model_dirs(tiny_model_dir, tmp_path_factory):
    """A tiny folder of each family, by family name (ChatGLM2/3: tokenizer.model with their special tokens; GLM-4: a
    tiktoken BPE; glm4-hf, glm4-0414: transformers' GLM classes with a tokenizer.json)."""
    from tools.make_tiny_model import build_tiny_model
    folders = {"chatglm": tiny_model_dir}
    for family in ("chatglm2", "chatglm3", "glm4", "glm4-hf", "glm4-0414"):
        folders[family] = build_tiny_model(str(tmp_path_factory.mktemp(family)), num_layers=2, hidden_size=64,
                                           num_attention_heads=4, inner_hidden_size=128, family=family)
    return folders


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shared_memory_buffers(port):
    """Remove and list the 66 MB buffers that DeepSpeed's CPU communication put in /dev/shm for `port`: the training
    scripts remove their own as they end, but a killed run cannot, and with a new port per launch a test run would
    fill the machine's memory (/dev/shm is RAM)."""
    import glob
    from training_engine import CPU_COMM_BUFFER_PREFIX
    found = glob.glob(f"{CPU_COMM_BUFFER_PREFIX}*_{port}_*")
    for path in found:
        try:
            os.remove(path)
        except OSError:
            pass
    return found


def launch(script, *args, launcher=True, timeout=900, check=True, ranks=1, accelerator="cpu"):
    """Run one of the suite's scripts as a user would: through the deepspeed launcher (CPU accelerator unless
    told) or python."""
    import signal
    import subprocess
    env = dict(os.environ, DS_ACCELERATOR=accelerator, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    path = os.path.join(ROOT, script)
    # a free port of its own: two test runs (or a training run) on one machine would both take 29500
    port = free_port()
    launcher_args = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), path]
    command = (launcher_args if launcher else [sys.executable, path]) + [str(a) for a in args]
    # a session of its own, so that a timeout kills the ranks and any compile under the launcher too: they would
    # otherwise live on, holding memory, ports and DeepSpeed's JIT build lock
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} ran past {timeout} s (killed):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        leftover_buffers = remove_shared_memory_buffers(port)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    result.leftover_shm_buffers = leftover_buffers
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


PREDICT_METHODS = {"predict_freeze.py": "FreezePredict", "predict_pt.py": "PTuningPredict",
                   "predict_lora.py": "LoRAPredict", "predict_full.py": "FullPredict"}


def predict_in_process(script, *args):
    """A predict script's own main() in this process, where a test checks only the files it writes: a new process
    would spend ~7 s importing (the scripts' exit codes and messages are tested as processes elsewhere)."""
    import importlib

    from prediction import main
    method = getattr(importlib.import_module(script[:-3]), PREDICT_METHODS[script])
    main(method(), [str(a) for a in args])


def launch_all(runs, **how):
    """launch() each (script, *args) of `runs` with the same options, as many at once as there are CPU cores (a tiny
    model's run is mostly process start-up and small kernels, so two share two cores well); results in order."""
    return launch_each([(run, how) for run in runs])


def launch_each(runs):
    """launch_all for (run, options) pairs: each run with options of its own."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda pair: launch(*pair[0], **pair[1]), runs))


def metrics_of(output_dir):
    """The records a training run wrote to its metrics.jsonl, in order."""
    import json
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logged_losses(output_dir):
    return [r["loss"] for r in metrics_of(output_dir) if "loss" in r]


@pytest.fixture(scope="session")
def few_rows(tmp_path_factory):
    """The six shortest rows of our triple-extraction sample: small enough for a tiny model to learn by heart."""
    import json
    with open(os.path.join(ROOT, "data", "spo_train.jsonl"), encoding="utf-8") as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: len(r["text"]) + len(r["answer"]))[:6]
    path = tmp_path_factory.mktemp("rows") / "few.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# (script, method options) per training mode; the learning rates are what a 2-layer random model needs to learn
# six rows by heart in MEMORISE_EPOCHS steps
MODES = {
    "freeze": ("finetuning_freeze.py", ["--num_trainable_layers", 1, "--learning_rate", 3e-3]),
    "pt2": ("finetuning_pt.py", ["--pre_seq_len", 8, "--learning_rate", 1e-1]),
    "pt2_projection": ("finetuning_pt.py", ["--pre_seq_len", 8, "--prefix_projection", "--learning_rate", 1e-2]),
    "pt_embedding_only": ("finetuning_pt.py", ["--pre_seq_len", 8, "--prompt_embedding_only", "--learning_rate", 1e-1]),
    "lora": ("finetuning_lora.py", ["--lora_r", 16, "--lora_dropout", 0, "--learning_rate", 5e-3]),
    "full": ("finetuning_full.py", ["--learning_rate", 1e-3]),
}


# one-step epochs each mode needs to learn the six rows: P-Tuning v2's loss on the tiny ChatGLM-6B is still ~1 at
# step 120; the other modes are below 0.01 by then
MEMORISE_EPOCHS = {"pt2": 300, "pt2_projection": 300}


def memorise_args(model_dir, rows, output_dir, mode=None, epochs=None):
    return ["--model_dir", model_dir, "--train_path", rows, "--output_dir", output_dir, "--prompt_text", "抽取：",
            "--num_train_epochs", epochs or MEMORISE_EPOCHS.get(mode, 120), "--train_batch_size", 6, "--max_len", 128,
            "--max_src_len", 100, "--fp32",
            "--lr_scheduler", "constant", "--warmup_ratio", 0.02, "--weight_decay", 0, "--log_steps", 50,
            "--save_epochs", 0]  # one checkpoint at the end, not one per epoch


@pytest.fixture(scope="session")
def trained(tiny_model_dir, few_rows, tmp_path_factory):
    """Each mode trained through the deepspeed launcher until it knows the six rows; output folder per mode."""
    outputs = {mode: str(tmp_path_factory.mktemp(mode)) for mode in MODES}
    launch_all([(script, *memorise_args(tiny_model_dir, few_rows, outputs[mode], mode), *options,
                 "--dump_final_state", os.path.join(outputs[mode], "final_state.safetensors"))
                for mode, (script, options) in MODES.items()])
    return outputs


# Every method on the newer families (tests/test_families.py says which and why); also what tests/test_export.py
# exports. THUDM's layouts run with `python`, the transformers-layout folders through the launcher.
TRANSFORMERS_LAYOUT = ("glm4-hf", "glm4-0414")
FAMILY_RUNS = [("chatglm3", mode) for mode in ("freeze", "pt2", "lora")] + [("chatglm2", "lora")] + \
    [("glm4", mode) for mode in ("freeze", "pt2", "pt_embedding_only", "lora", "full")] + \
    [("glm4-hf", mode) for mode in ("freeze", "pt2", "lora", "lora_int4", "full")] + \
    [("glm4-0414", mode) for mode in ("freeze", "pt2", "pt_embedding_only", "lora", "lora_int4", "full")]
CONVERSATION_FAMILIES = ("chatglm3", "glm4", "glm4-0414")


def mode_options(mode):
    """The training script and its options of a mode (MODES, or LoRA over an INT4 base)."""
    if mode == "lora_int4":
        script, options = MODES["lora"]
        return script, [*options, "--quantization_bit", 4]
    return MODES[mode.replace("_conversations", "")]


@pytest.fixture(scope="session")
def conversation_rows(few_rows, tmp_path_factory):
    """The six rows as three two-turn ChatGLM3 conversations (system prompt, two questions, two answers)."""
    with open(few_rows, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    chats = []
    for a, b in zip(rows[0::2], rows[1::2]):
        chats.append({"conversations": [
            {"role": "system", "content": "抽取三元组"}, {"role": "user", "content": a["text"]},
            {"role": "assistant", "content": a["answer"]}, {"role": "user", "content": b["text"]},
            {"role": "assistant", "content": b["answer"]}]})
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def trained_families(family_model_dirs, few_rows, conversation_rows, tmp_path_factory):
    runs = [(family, mode, few_rows, []) for family, mode in FAMILY_RUNS]
    runs += [(family, "lora_conversations", conversation_rows, ["--train_batch_size", 3])
             for family in CONVERSATION_FAMILIES]
    folders, launches = [], []
    for family, mode, rows, extra in runs:
        script, options = mode_options(mode)
        folders.append(str(tmp_path_factory.mktemp(f"{family}-{mode}")))
        launches.append(((script, *memorise_args(family_model_dirs[family], rows, folders[-1], epochs=120),
                          *options, *extra),  # P-Tuning v2 too: on these folders it learns the rows by step 120
                         {"launcher": family in TRANSFORMERS_LAYOUT and mode != "lora_conversations"}))
    results = launch_each(launches)
    return {(family, mode): (out, result.stdout) for (family, mode, _, _), out, result in zip(runs, folders, results)}


