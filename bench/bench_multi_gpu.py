"""One GPU against two, through the command a user runs: `deepspeed --include localhost:0[,1] finetuning_*.py`.

Builds a ChatGLM-6B-sized folder with random bf16 weights (28 layers, hidden 4096, vocabulary 130,528; the
tokenizer is a small one trained here, so ids sit at the top of the vocabulary), then runs the training scripts
with their defaults on the given rows. A run is stopped (SIGINT, nothing saved) once `--steps` optimizer steps are
logged, unless it is a `*_whole` variant, which runs to its last checkpoint. From each run's metrics.jsonl:

- first step: seconds from the command to the first optimizer step (the launcher, imports, loading, compiling,
  capturing; runs before this change logged only their own process's part);
- tokens/s: real (unpadded) tokens of all ranks per second over the second half of the steps (steady state);
- peak GiB: torch.cuda.max_memory_allocated on rank 0; wall: the command's whole time.

Groups run one after another; the runs of a group at the same time (on different GPUs):

    python bench/bench_multi_gpu.py --train_path bench/.data/spo_train.jsonl --out $OUT \\
        --groups "lora@0,pt2@1;lora@0+1;pt2@0+1"

Compare rows only within one call: machines differ by about 10%.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {  # name -> (script, options)
    "lora": ("finetuning_lora.py", ["--lora_r", "8"]),
    "lora_whole": ("finetuning_lora.py", ["--lora_r", "8"]),
    "lora_zero3": ("finetuning_lora.py", ["--lora_r", "8", "--zero_stage", "3"]),
    "pt2": ("finetuning_pt.py", ["--pre_seq_len", "16"]),
    "freeze": ("finetuning_freeze.py", []),
    "freeze_zero2": ("finetuning_freeze.py", ["--zero_stage", "2"]),
    "full": ("finetuning_full.py", []),
    "full_zero3": ("finetuning_full.py", ["--zero_stage", "3"]),
    # quantized bases (issue 20): bitsandbytes NF4 (QLoRA) and THUDM's INT4, through the scripts' own options
    "lora_nf4": ("finetuning_lora.py", ["--lora_r", "8", "--quantization", "nf4"]),
    "lora_nf4_gc": ("finetuning_lora.py", ["--lora_r", "8", "--quantization", "nf4", "--gradient_checkpointing"]),
    "pt2_nf4": ("finetuning_pt.py", ["--pre_seq_len", "16", "--quantization", "nf4"]),
    "lora_int4": ("finetuning_lora.py", ["--lora_r", "8", "--quantization_bit", "4"]),
}


def build_random_model(folder, tiny=False):
    """A ChatGLM-6B-shaped folder with random bf16 weights (bench/random_model.py)."""
    from random_model import build_random_folder
    return build_random_folder(folder, "chatglm", tiny)


def start_run(name, gpus, model_dir, train_path, work, port, steps):
    script, options = VARIANTS[name]
    out = os.path.join(work, f"{name}@{gpus}")
    repeat = 1
    while os.path.exists(out + ".log"):  # the same variant again (a warm compile cache): a folder of its own
        repeat += 1
        out = os.path.join(work, f"{name}@{gpus}#{repeat}")
    command = ["deepspeed", "--include", f"localhost:{gpus.replace('+', ',')}", "--master_port", str(port),
               os.path.join(ROOT, script), "--model_dir", model_dir, "--train_path", train_path, "--output_dir", out,
               "--overwrite_output_dir", "--skip_bad_rows", "--log_steps", "10", *options]
    log = open(out + ".log", "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"name": name, "gpus": gpus, "out": out, "process": process, "log": log, "start": time.time(),
            "whole": name.endswith("_whole"), "steps": steps}


def logged_steps(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    except (OSError, ValueError):
        return []


def wait_for(runs, timeout):
    """Stop each run once `steps` steps are logged (whole runs: let them end); kill what outlives `timeout`."""
    deadline = time.time() + timeout
    while any(r["process"].poll() is None for r in runs):
        for r in runs:
            if r["process"].poll() is not None or r["whole"] or "stopped" in r:
                continue
            records = [x for x in logged_steps(r["out"]) if "loss" in x]
            if records and records[-1]["step"] >= r["steps"]:
                r["stopped"] = time.time()
                os.killpg(r["process"].pid, signal.SIGINT)
        if time.time() > deadline:
            for r in runs:
                if r["process"].poll() is None:
                    os.killpg(r["process"].pid, signal.SIGKILL)
            break
        time.sleep(1)
    for r in runs:
        try:
            r["process"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(r["process"].pid, signal.SIGKILL)
        r["end"] = time.time()
        r["log"].close()


def summarize(run):
    records = logged_steps(run["out"])
    losses = [r for r in records if "loss" in r]
    first_record = next((r for r in records if "seconds_to_first_step" in r), {})
    first = first_record.get("seconds_to_first_step")
    with open(run["out"] + ".log", errors="replace") as f:
        text = f.read()
    optimizer = next((line.split("optimizer: ", 1)[1][:60] for line in text.splitlines() if "optimizer: " in line), "")
    row = {"run": run["name"], "gpus": run["gpus"].count("+") + 1, "devices": run["gpus"], "optimizer": optimizer,
           "first_step_s": first, "steps": losses[-1]["step"] if losses else 0,
           "wall_s": round(run["end"] - run["start"], 1), "returncode": run["process"].returncode,
           "startup_s": first_record.get("startup_s"),
           "first_step_from_command_s": round(first_record["unix_time"] - run["start"], 1)
           if "unix_time" in first_record else None}
    half = [r for r in losses if r["step"] > losses[-1]["step"] / 2] if losses else []
    if len(half) >= 2:
        # tokens of a window = its tokens/s x its duration; the windows of the second half, after the first of them
        windows = list(zip(half, half[1:]))
        seconds = half[-1]["elapsed_s"] - half[0]["elapsed_s"]
        tokens = sum(b["tokens_per_s"] * (b["elapsed_s"] - a["elapsed_s"]) for a, b in windows)
        # the median window leaves out the windows in which a rank captured a new batch shape (about a second each,
        # and on several GPUs the other ranks wait for it): the rate once every shape has been seen
        rates = sorted(r["tokens_per_s"] for r in half[1:])
        row.update(median_window_tokens_per_s=round(rates[len(rates) // 2]))
        steps = half[-1]["step"] - half[0]["step"]
        row.update(tokens_per_s=round(tokens / seconds), ms_per_step=round(1000 * seconds / steps, 1),
                   peak_gib=max(r.get("peak_gib", 0) for r in losses), last_loss=losses[-1]["loss"],
                   captured_shapes=losses[-1].get("captured_shapes"), capture_s=losses[-1].get("capture_s"))
        if half[-1].get("capture_s") is not None:  # the steps alone: the captures of new shapes taken out
            captured = half[-1]["capture_s"] - half[0]["capture_s"]
            row.update(ms_per_step_replayed=round(1000 * (seconds - captured) / steps, 1),
                       replayed_tokens_per_s=round(tokens / (seconds - captured)))
    if row["returncode"] not in (0, 130, -2) or not losses:  # -2: the launcher stopped by our SIGINT
        row["log_tail"] = text[-1500:]
    return row


def table(rows):
    one = {r["run"]: r.get("tokens_per_s") for r in rows if r["gpus"] == 1 and r.get("tokens_per_s")}
    median = {r["run"]: r.get("median_window_tokens_per_s") for r in rows if r["gpus"] == 1}
    lines = ["| run | GPUs | optimizer | first step s from the command | ms/step | tokens/s | x one GPU | median window tokens/s | x one GPU "
             "| peak GiB/GPU | wall s |", "| --- " * 11 + "|"]

    def ratio(value, base, gpus):
        return f"{value / base:.2f}" if value and base and gpus > 1 else ""
    for r in rows:
        name = r["run"].split("_zero")[0]
        lines.append(f"| {r['run']} | {r['gpus']} | {r['optimizer'][:28]} | {r.get('first_step_from_command_s') or r['first_step_s']} | "
                     f"{r.get('ms_per_step', '')} | {r.get('tokens_per_s', 'failed')} | "
                     f"{ratio(r.get('tokens_per_s'), one.get(name), r['gpus'])} | "
                     f"{r.get('median_window_tokens_per_s', '')} | "
                     f"{ratio(r.get('median_window_tokens_per_s'), median.get(name), r['gpus'])} | "
                     f"{r.get('peak_gib', '')} | {r['wall_s']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", required=True, help="groups separated by ';', runs of a group by ','; a run is "
                        f"VARIANT@GPUS[:STEPS] with GPUS like 0 or 0+1; variants: {', '.join(VARIANTS)}")
    parser.add_argument("--train_path", default=os.path.join(ROOT, "data", "spo_train.jsonl"))
    parser.add_argument("--model_dir", default="/tmp/chatglm6b-random")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU, to check this script")
    parser.add_argument("--work", default="/tmp/bench_multi_gpu", help="the runs' output folders and logs")
    parser.add_argument("--steps", type=int, default=300, help="stop each run after this many steps")
    parser.add_argument("--timeout", type=int, default=400, help="seconds a group may take")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "multi_gpu"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)  # an earlier call's folders would be read as this call's
    os.makedirs(args.work, exist_ok=True)
    start = time.time()
    build_random_model(args.model_dir, args.tiny)
    print(f"model folder ready after {time.time() - start:.0f} s", flush=True)
    rows, port = [], 29600
    for group in args.groups.split(";"):
        runs = []
        for spec in group.split(","):
            name, gpus = spec.split("@")
            gpus, _, steps = gpus.partition(":")
            runs.append(start_run(name, gpus, args.model_dir, args.train_path, args.work, port,
                                  int(steps or args.steps)))
            port += 1
        wait_for(runs, args.timeout)
        for run in runs:
            row = summarize(run)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "runs.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(rows) + "\n")
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
