"""INT8 / INT4 bases beside bf16 on one GPU: training ms/step and peak memory, and predicting the 50 test rows.

Each variant is one `bench/bench_gpu.py` process (a 6B-sized random model built on the GPU, spo lengths, batch 2,
the training scripts' GPU defaults: rows packed, the step replayed as CUDA graphs, compiled blocks, ZeRO-1 bf16);
`--quantization_bit` quantizes its block linears in THUDM's format (quantization.py) before the steps. Compare
rows only within one run: machines differ by about 10%.

    python bench/bench_quantized.py --out bench/results/quantized                     # everything (two GPU calls)
    python bench/bench_quantized.py --only lora,pt2 --bits 0,8,4 --family chatglm --skip_predict
    python bench/bench_quantized.py --bits 0,4,nf4 --skip_predict      # THUDM's INT4 beside bitsandbytes' NF4
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_gpu.py")
NAMES = {"0": "bf16", "8": "INT8", "4": "INT4", "nf4": "NF4 (bitsandbytes)", "int8": "LLM.int8() (bitsandbytes)"}


def base_options(base):
    """bench_gpu.py's options for a base: "0" (bf16), "8" / "4" (THUDM's format), "nf4" / "int8" (bitsandbytes)."""
    return ["--quantization", base] if base in ("nf4", "int8") else ["--quantization_bit", base]


def base_of(row):
    return row.get("quantization") or str(row["quantization_bit"])


def run(arguments):
    done = subprocess.run([sys.executable, BENCH, *arguments], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("{", "["))]
    if done.returncode != 0 or not lines:
        print(f"FAILED {arguments}: {done.stderr[-1500:]}", flush=True)
        return None
    return json.loads(lines[-1])


def checkpointing_options(kind):
    """bench_gpu.py's options for a checkpointing kind: none, mlp, mlp+attention, blocks (see bench_gpu.py --gc)."""
    return [] if kind == "none" else ["--gc", kind]


def training_rows(methods, bits_list, family, steps, warmup, checkpointing=("none",)):
    """The training scripts' GPU path (CUDA-graph steps, packed rows), for each checkpointing kind asked."""
    rows = []
    for method in methods:
        for bits in bits_list:
            for kind in checkpointing:
                row = run(["--variant", method, "--step_graphs", "--pack_rows", "--family", family, "--steps",
                           str(steps), "--warmup", str(warmup), *base_options(bits), *checkpointing_options(kind)])
                if row:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def prediction_rows(bits_list, family, new_tokens):
    rows = []
    for bits in bits_list:
        result = run(["--predict", "--variants_matching", "batched, static", "--family", family,
                      "--new_tokens", str(new_tokens), *base_options(bits)])
        for row in result or []:
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def checkpointing_of(row):
    kind = row.get("gradient_checkpointing")
    return "blocks" if kind is True else (kind or "none")


def table(training, prediction):
    """x bf16: against the same family and method on the bf16 base without checkpointing (the default step)."""
    lines = ["| model | method | base | checkpointing | ms/step | x bf16 | real tokens/s | peak GiB | reserved GiB | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bf16 = {(r["family"], r["method"]): r["ms_per_step"] for r in training
            if base_of(r) == "0" and checkpointing_of(r) == "none"}
    for r in training:
        base = bf16.get((r["family"], r["method"]))
        ratio = f"{r['ms_per_step'] / base:.2f}" if base else ""
        lines.append(f"| {r['family']} | {r['method']} | {NAMES[base_of(r)]} | {checkpointing_of(r)} | "
                     f"{r['ms_per_step']} | {ratio} | {r['real_tokens_per_s']} | {r['peak_gib']} | "
                     f"{r.get('peak_reserved_gib', '')} | {100 * r['mfu']:.1f}% |")
    if prediction:
        lines += ["", "| model | base | 50 rows x new tokens | seconds | ms per decode step | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in prediction:
            lines.append(f"| {r['family']} | {NAMES[base_of(r)]} | 50 x {r['new_tokens']} | "
                         f"{r['seconds_for_50']} | {r['ms_per_token_step']} | {r['peak_gib']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="lora,pt2", help="training methods (comma-separated)")
    parser.add_argument("--bits", default="0,8,4", help="bases: 0 (bf16), 8, 4 (THUDM's format), nf4, int8 "
                        "(bitsandbytes)")
    parser.add_argument("--family", choices=["chatglm", "chatglm2"], default="chatglm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=315)
    parser.add_argument("--gc", default="none", help="checkpointing kinds, comma-separated: none, mlp (each MLP's "
                        "inner part), mlp+attention (and the packed rows' attention kernels), blocks (whole blocks); "
                        "the recomputation is captured in the CUDA-graph step, as the training scripts run it")
    parser.add_argument("--skip_predict", action="store_true")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--out", default=None, help="folder for bench_quantized.json / .md")
    args = parser.parse_args()
    bits_list = args.bits.split(",")
    training = [] if args.skip_training else training_rows(args.only.split(","), bits_list, args.family, args.steps,
                                                            args.warmup, args.gc.split(","))
    prediction = [] if args.skip_predict else prediction_rows(bits_list, args.family, args.new_tokens)
    text = table(training, prediction)
    gpu = (training or prediction or [{"gpu": "?"}])[0]["gpu"]
    text = f"Measured {time.strftime('%Y-%m-%d')} on {gpu} with `bench/bench_quantized.py`.\n\n{text}\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"bench_quantized_{args.family}{'' if args.gc == 'none' else '_gc_' + args.gc.replace(',', '_')}"
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump({"training": training, "prediction": prediction}, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
