"""GLM-4-9B in each of its folder layouts, and the peer beside them, through the commands a user types (issue 28).

For each layout (glm4: THUDM's glm-4-9b folders; glm4-hf: glm-4-9b-chat-hf; glm4-0414: GLM-4-9B-0414) a folder of the
published shape with random bf16 weights is written (bench/random_model.py; removed after its runs, since three
would not fit the disk), then:
- `deepspeed --num_gpus 1 finetuning_<method>.py --model_dir FOLDER --train_path TRAIN --skip_bad_rows
  --max_steps STEPS` with the scripts' defaults otherwise (batch 2, max_len 768), for each method: ms/step and
  tokens/s over the second half of the run's logged steps (bench_multi_gpu.summarize), the peak, the seconds from
  the command to the first step;
- `python predict_lora.py --model_dir <the LoRA run> --test_path TEST --device 0 --ignore_eos`: every row generates
  its 315 new tokens, whatever the random weights say; the generation's seconds (metrics.json) and the command's;
- on the transformers-layout folders with `--peer`: bench/peer_trainer_peft.py (transformers Trainer + PEFT at
  LLaMA-Factory's defaults) on the same rows;
- with `--export_on LAYOUT`: tools/export_model.py on the LoRA checkpoint (time, peak host memory), then
  predict_full.py on the export, whose generations must equal predict_lora.py's;
- with `--serve_on LAYOUT`: bench/serve_load_faults.py against serve.py on the LoRA checkpoint.

    python bench/bench_layouts.py --train_path bench/.data/spo/train.jsonl --test_path bench/.data/spo/test.jsonl \\
        --out $OUT --layouts glm4,glm4-hf,glm4-0414 --methods lora --peer glm4-hf --steps 100

`--tiny` runs everything on 2-layer folders on the CPU (to check this script).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from bench_multi_gpu import summarize  # noqa: E402
from random_model import build_random_folder  # noqa: E402

METHODS = {"lora": ("finetuning_lora.py", ["--lora_r", "8"]), "pt2": ("finetuning_pt.py", ["--pre_seq_len", "16"])}


def command_run(name, command, out, timeout):
    """Run `command` to its end, its output in out.log; the record bench_multi_gpu.summarize reads."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log = open(out + ".log", "w")
    start = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    log.close()
    return {"name": name, "gpus": "0", "out": out, "process": process, "log": log, "start": start,
            "end": time.time()}


def train(layout, method, folder, args, work, port):
    script, options = METHODS[method]
    out = os.path.join(work, f"{layout}-{method}")
    command = ["deepspeed", "--num_gpus", "1", "--master_port", str(port), os.path.join(ROOT, script),
               "--model_dir", folder, "--train_path", args.train_path, "--skip_bad_rows", "--output_dir", out,
               "--max_steps", str(args.steps), "--log_steps", "10", "--save_epochs", "0", *options]
    row = summarize(command_run(f"{layout} {method}", command, out, args.timeout))
    row.update(layout=layout, method=method)
    return row, out


def predict(layout, checkpoint, args, work):
    out = os.path.join(work, f"{layout}-predict")
    command = [sys.executable, os.path.join(ROOT, "predict_lora.py"), "--model_dir", checkpoint, "--test_path",
               args.test_path, "--output_dir", out, "--ignore_eos", "--device", "cpu" if args.tiny else "0"]
    run = command_run(f"{layout} predict", command, out, args.timeout)
    row = {"layout": layout, "method": "predict_lora.py", "wall_s": round(run["end"] - run["start"], 1),
           "returncode": run["process"].returncode}
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        row.update(generation_s=metrics["seconds"], rows=metrics["rows"], batch_size=metrics["batch_size"],
                   generated_tokens_per_s=metrics["generated_tokens_per_s"])
    except (OSError, KeyError, ValueError):
        with open(out + ".log", errors="replace") as f:
            row["log_tail"] = f.read()[-1500:]
    return row


def peer(layout, folder, args, work):
    out = os.path.join(work, f"{layout}-peer")
    command = [sys.executable, os.path.join(ROOT, "bench", "peer_trainer_peft.py"), "--model_dir", folder,
               "--train_path", args.train_path, "--steps", str(args.steps), "--output_dir", out,
               "--warmup", str(min(10, args.steps // 2))]
    run = command_run(f"{layout} peer", command, out, args.timeout)
    with open(out + ".log", errors="replace") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1]) if lines else {"log_tail": text[-1500:]}
    row.update(layout=layout, method="peer: Trainer + PEFT LoRA", wall_s=round(run["end"] - run["start"], 1))
    return row


def record(rows, row, out):
    """Keep a row, say it, and append it to runs.jsonl at once (a call cut short keeps what it measured)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "runs.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def peak_rss_run(command, log_path, timeout):
    """(return code, seconds, peak resident memory of the process and its children in GiB), sampled every 0.2 s."""
    import psutil
    start, peak = time.time(), 0
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(process.pid)
        while process.poll() is None and time.time() - start < timeout:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
        process.wait()
    return process.returncode, round(time.time() - start, 1), round(peak / 2 ** 30, 2)


def generations(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return [json.loads(line)["generated"] for line in f]


def export_and_compare(layout, lora_out, args, work):
    """tools/export_model.py on the LoRA checkpoint (time, peak host memory), then predict_full.py on the export:
    the same generations as predict_lora.py gave on the checkpoint."""
    out = os.path.join(work, f"{layout}-export")
    dtype = ["--dtype", "fp32"] if args.tiny else []  # prediction on the CPU is fp32 (on a GPU bf16, as the base)
    code, seconds, peak = peak_rss_run([sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--checkpoint",
                                        lora_out, "--output_dir", out, *dtype], out + ".log", args.timeout)
    row = {"layout": layout, "method": "tools/export_model.py (LoRA merged)", "returncode": code, "export_s": seconds,
           "export_peak_host_gib": peak}
    if code != 0:
        with open(out + ".log", errors="replace") as f:
            return {**row, "log_tail": f.read()[-1500:]}
    row["export_gib"] = round(sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 2 ** 30, 2)
    predicted = os.path.join(work, f"{layout}-predict-export")
    command = [sys.executable, os.path.join(ROOT, "predict_full.py"), "--model_dir", out, "--test_path",
               args.test_path, "--output_dir", predicted, "--ignore_eos", "--device", "cpu" if args.tiny else "0"]
    command_run(f"{layout} predict export", command, predicted, args.timeout)
    try:
        ours, theirs = generations(os.path.join(work, f"{layout}-predict")), generations(predicted)
        row.update(same_generations=sum(a == b for a, b in zip(ours, theirs)), rows=len(ours))
        with open(os.path.join(predicted, "metrics.json")) as f:
            row["export_generation_s"] = json.load(f)["seconds"]
    except (OSError, ValueError, KeyError) as err:
        row["compare_error"] = str(err)
    shutil.rmtree(out, ignore_errors=True)
    return row


def serve_load(layout, lora_out, args, work):
    """bench/serve_load_faults.py against serve.py on the LoRA checkpoint: its table."""
    table_path = os.path.join(work, f"{layout}-serve-load.md")
    command = [sys.executable, os.path.join(ROOT, "bench", "serve_load_faults.py"), "--model_dir", lora_out,
               "--clients", str(args.serve_clients), "--seconds", str(args.serve_seconds), "--max_tokens", "64",
               "--out", table_path, "--serve_args", "--device", "cpu" if args.tiny else "0"]
    run = command_run(f"{layout} serve load", command, os.path.join(work, f"{layout}-serve"), args.timeout)
    row = {"layout": layout, "method": "bench/serve_load_faults.py", "returncode": run["process"].returncode,
           "wall_s": round(run["end"] - run["start"], 1)}
    try:
        with open(table_path) as f:
            row["table"] = f.read()
    except OSError:
        with open(os.path.join(work, f"{layout}-serve.log"), errors="replace") as f:
            row["log_tail"] = f.read()[-1500:]
    return row


def table(rows):
    """ms/step: the steps alone (second half of the run, captures of new shapes taken out; the peer: its median
    step); with captures: the second half's wall time per step."""
    lines = ["| layout | run | ms/step | with captures | tokens/s | peak GiB | first step s (from the command) | "
             "50 rows predicted: generation s / command s |", "| --- " * 8 + "|"]
    for r in rows:
        predicted = f"{r['generation_s']} / {r['wall_s']}" if "generation_s" in r else ""
        steady = r.get("ms_per_step_replayed", r.get("ms_per_step", "")) if "generation_s" not in r else ""
        lines.append(f"| {r['layout']} | {r['method']} | {steady} | "
                     f"{r.get('ms_per_step', '') if 'ms_per_step_replayed' in r else ''} | "
                     f"{r.get('replayed_tokens_per_s', r.get('real_tokens_per_s', ''))} | {r.get('peak_gib', '')} | "
                     f"{r.get('first_step_from_command_s', '')} | {predicted} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--test_path", required=True)
    parser.add_argument("--layouts", default="glm4,glm4-hf,glm4-0414")
    parser.add_argument("--methods", default="lora", help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--peer", default="glm4-hf", help="layouts to run the peer on (comma-separated; '' none)")
    parser.add_argument("--no_predict", action="store_true")
    parser.add_argument("--export_on", default="", help="layouts whose LoRA checkpoint is exported and predicted "
                        "from (comma-separated)")
    parser.add_argument("--serve_on", default="", help="layouts whose LoRA checkpoint is served under "
                        "bench/serve_load_faults.py")
    parser.add_argument("--serve_clients", type=int, default=16)
    parser.add_argument("--serve_seconds", type=float, default=40)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--timeout", type=int, default=400, help="seconds one command may take")
    parser.add_argument("--work", default="/tmp/bench_layouts")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "layouts"))
    parser.add_argument("--tiny", action="store_true", help="2-layer folders on the CPU, to check this script")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    rows, port = [], 29700
    for layout in args.layouts.split(","):
        start = time.time()
        folder = build_random_folder(os.path.join(args.work, f"{layout}-model"), layout, args.tiny)
        print(f"{layout}: folder written in {time.time() - start:.0f} s", flush=True)
        lora_out = None
        for method in args.methods.split(","):
            row, out = train(layout, method, folder, args, args.work, port)
            port += 1
            lora_out = out if method == "lora" else lora_out
            record(rows, row, args.out)
        if lora_out and not args.no_predict:
            record(rows, predict(layout, lora_out, args, args.work), args.out)
        if layout in args.peer.split(","):
            record(rows, peer(layout, folder, args, args.work), args.out)
        if lora_out and layout in args.export_on.split(","):
            record(rows, export_and_compare(layout, lora_out, args, args.work), args.out)
        if lora_out and layout in args.serve_on.split(","):
            record(rows, serve_load(layout, lora_out, args, args.work), args.out)
        shutil.rmtree(folder)  # three 9B folders would not fit the disk
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(rows) + "\n")
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
