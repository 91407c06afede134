"""What a new batch shape costs a run with CUDA-graph steps (training_graphs.py), on one GPU.

Every batch shape a run meets is captured once: eager warm-up steps, then the forward and backward recorded. On the
spo rows a 5-epoch run meets about 93 shapes (bench/count_batch_shapes.py), so capture time adds to the run's time.
This script builds the LoRA model of bench_gpu.py (ChatGLM-6B size, random bf16 weights made on the GPU, compiled
blocks, DeepSpeed engine), then:

1. the first capture (compiles the blocks) and how many graphs torch.compile made;
2. for each number of warm-up steps before a later capture (2, 1, 0): the mean seconds per capture over `--shapes`
   new shapes, and whether the replayed loss and gradients equal, bit for bit, those of the graphs captured after
   two warm-up steps;
3. the replayed forward+backward time when the label positions are padded to a multiple of 64, 128 or 256 (fewer
   shapes, more head rows computed), over the same batches.

    python bench/bench_capture.py --out bench/results/first_step       # prints a table, writes capture.json

GPU only (CUDA graphs). Compare rows only within one call.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_gpu  # noqa: E402


def lora_engine():
    from model_family import FAMILIES
    from training_engine import build_engine, compile_blocks, setup_distributed
    import finetuning_lora
    _, _, device = setup_distributed()
    torch.manual_seed(0)
    config = bench_gpu.official_config()
    model = bench_gpu.build_model(config, torch.bfloat16)
    model.train()
    args = bench_gpu.method_args(bench_gpu.METHODS["lora"], "bf16")
    model = finetuning_lora.LoRA().prepare(model, args, FAMILIES[bench_gpu.FAMILY])
    compile_blocks(model)
    return build_engine(model, args, 1, device, total_steps=10_000), config, device


def distinct_batches(config, count, label_multiple, seed):
    """`count` packed batches of distinct shapes (length, label positions), spo lengths, padded to 64."""
    from data_set import labelled_positions
    found = {}
    for b in bench_gpu.make_batches(bench_gpu.load_profile(), config, 2000, bucket=64, pack=True, seed=seed):
        b["label_positions"] = labelled_positions(b["labels"], label_multiple)
        found.setdefault((b["input_ids"].shape[-1], b["label_positions"].shape[0]), b)
        if len(found) == count:
            break
    return list(found.values())


def model_inputs(batch):
    return {k: batch[k] for k in bench_gpu.MODEL_INPUTS if k in batch}


def replay(graphs, batch):
    """The loss and the trainable parameters' gradients from one forward+backward replay of `batch`'s graphs."""
    key = tuple((name, tuple(t.shape)) for name, t in sorted(model_inputs(batch).items()))
    shape = graphs.shapes[key]
    torch.cuda.manual_seed(1234)  # the same dropout masks in every replay (the graphs read the generator's state)
    for name, t in model_inputs(batch).items():
        shape.inputs[name].copy_(t)
    shape.forward_graph.replay()
    shape.grad_of_loss.fill_(1.0)
    shape.backward_graph.replay()
    return shape.loss.clone(), [g.clone() for g in graphs.grads]


def graph_count():
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=10, help="new shapes captured per warm-up setting")
    parser.add_argument("--replays", type=int, default=20, help="timed replays per batch in part 3")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "first_step"))
    args = parser.parse_args()
    from training_graphs import TrainingGraphs
    start = time.perf_counter()
    engine, config, device = lora_engine()
    report = {"gpu": bench_gpu.device_name(), "model_s": round(time.perf_counter() - start, 1)}
    first = distinct_batches(config, 1, 64, seed=99)[0]
    graphs = TrainingGraphs(engine.module, device)
    start = time.perf_counter()
    graphs(model_inputs(first))
    report.update(first_capture_s=round(time.perf_counter() - start, 1), compiled_graphs=graph_count())
    print(json.dumps(report), flush=True)

    batches = distinct_batches(config, args.shapes, 64, seed=1)
    reference, rows = None, []
    for warmup in (2, 1, 0):
        graphs = TrainingGraphs(engine.module, device, warmup=warmup, later_warmup=warmup)
        seconds, results = [], []
        for b in batches:
            start = time.perf_counter()
            graphs(model_inputs(b))  # captures (then replays the forward once)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            results.append(replay(graphs, b))
        reference = reference or results
        equal = all(torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
                    for (l1, g1), (l2, g2) in zip(results, reference))
        worst = max(max((a.float() - b.float()).abs().max().item() for a, b in zip(g1, g2))
                    for (_, g1), (_, g2) in zip(results, reference))
        rows.append({"part": "capture", "warmup": warmup, "shapes": len(batches),
                     "mean_capture_s": round(sum(seconds) / len(seconds), 3), "max_capture_s": round(max(seconds), 3),
                     "bitwise_equal_to_warmup_2": equal, "max_grad_difference": worst,
                     "compiled_graphs": graph_count()})
        print(json.dumps(rows[-1]), flush=True)
        del graphs
        torch.cuda.empty_cache()

    from data_set import labelled_positions
    plain = distinct_batches(config, args.shapes, 64, seed=2)
    for multiple in (64, 128, 256):
        graphs = TrainingGraphs(engine.module, device, warmup=2, later_warmup=1)
        same = [{**b, "label_positions": labelled_positions(b["labels"], multiple)} for b in plain]
        for b in same:
            graphs(model_inputs(b))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.replays):
            for b in same:
                replay(graphs, b)
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / (args.replays * len(same))
        rows.append({"part": "label padding", "label_multiple": multiple,
                     "mean_label_positions": sum(b["label_positions"].shape[0] for b in same) / len(same),
                     "forward_backward_ms": round(ms, 2)})
        print(json.dumps(rows[-1]), flush=True)
        del graphs
        torch.cuda.empty_cache()
    report["rows"] = rows
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "capture.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("| part | setting | figure |\n| --- | --- | --- |")
    print(f"| first capture (compiles) | | {report['first_capture_s']} s, {report['compiled_graphs']} graphs |")
    for r in rows:
        if r["part"] == "capture":
            print(f"| capture | warm-up {r['warmup']} | {r['mean_capture_s']} s mean, {r['max_capture_s']} s max; "
                  f"equal to warm-up 2: {r['bitwise_equal_to_warmup_2']} ({r['max_grad_difference']:.2g}) |")
        else:
            print(f"| replay | labels padded to {r['label_multiple']} | {r['forward_backward_ms']} ms "
                  f"({r['mean_label_positions']:.0f} label positions) |")


if __name__ == "__main__":
    main()
