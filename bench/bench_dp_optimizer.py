"""The optimizer step of data-parallel training, piece by piece, for Freeze's and LoRA's trained parameters.

    torchrun --nproc_per_node 2 bench/bench_dp_optimizer.py

On each rank: the trained parameters of ChatGLM-6B's Freeze (last 5 layers, 1.0 billion) or LoRA (r 8 on
query_key_value, 28 layers) in bf16 with random gradients; times (CUDA events, mean of 20 after 5) of
MasterWeightAdamW's step on one GPU and of DataParallelAdamW's step and its parts on all ranks.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from optimizer import DataParallelAdamW, MasterWeightAdamW  # noqa: E402

HIDDEN, INNER = 4096, 16384


def trained_shapes(method):
    if method == "lora":
        return [(8, HIDDEN), (3 * HIDDEN, 8)] * 28
    layer = [(3 * HIDDEN, HIDDEN), (3 * HIDDEN,), (HIDDEN, HIDDEN), (HIDDEN,), (INNER, HIDDEN), (INNER,),
             (HIDDEN, INNER), (HIDDEN,), (HIDDEN,), (HIDDEN,), (HIDDEN,), (HIDDEN,)]
    return layer * 5


def make(method, optimizer_class):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02)
              for s in trained_shapes(method)]
    groups = [{"params": [p for p in params if p.ndim == 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = optimizer_class(groups, max_grad_norm=1.0, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    return params, optimizer


def timed(fn, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 2)


def main():
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    rows = []
    for method in ("lora", "freeze"):
        if rank == 0:
            params, single = make(method, MasterWeightAdamW)
            rows.append((method, "MasterWeightAdamW step, one GPU", timed(single.step)))
            del params, single
            torch.cuda.empty_cache()
        dist.barrier()
        params, optimizer = make(method, DataParallelAdamW)
        flats = optimizer.flat_groups
        grads = [f.grad_slice for f in flats]
        pairs = [(f.param_slice, m) for f, m in zip(flats, optimizer.masters)]
        parts = {
            f"DataParallelAdamW step, {dist.get_world_size()} GPUs": optimizer.step,
            "  gradients into the flat buffers": lambda: [torch._foreach_copy_(
                [f.grad_flat[o:o + n] for o, n in f.views], [p.grad.reshape(-1) for p in f.params]) for f in flats],
            "  reduce-scatter": lambda: [f.reduce_scatter_gradients() for f in flats],
            "  clipping norm (+ all-reduce)": lambda: optimizer.clipping_divisor(grads),
            "  AdamW on the slice (one pass)": lambda: one_pass(optimizer, pairs, grads),
            "  all-gather": lambda: [f.all_gather_parameters() for f in flats],
        }
        for name, fn in parts.items():
            rows.append((method, name, timed(fn)))
        params = optimizer = parts = None  # frees the GPU memory before the next method
        torch.cuda.empty_cache()
    if rank == 0:
        print("| trained | what | ms |\n| --- | --- | --- |")
        for method, name, ms in rows:
            print(f"| {method} | {name} | {ms} |")
    dist.destroy_process_group()


def one_pass(optimizer, pairs, grads):
    for (param, _), grad in zip(pairs, grads):
        param.grad = grad
    optimizer.step_in_one_pass(pairs, None)


if __name__ == "__main__":
    main()
