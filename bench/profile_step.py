"""Where a training step and a decode step spend their time on the GPU (torch.profiler tables).

    python bench/profile_step.py [--method lora] [--decode] [--static_decode chatglm|chatglm2]

Times the same LoRA step three ways — plain PyTorch (fused AdamW), through the DeepSpeed engine, and the
forward alone — then prints the profiler's top operators by host and by GPU time for the DeepSpeed step.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import METHODS, build_model, load_profile, make_batches, official_config  # noqa: E402


def timed(fn, batches, label):
    for b in batches[:3]:
        fn(b)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches[3:]:
        fn(b)
    torch.cuda.synchronize()
    print(f"{label}: {(time.perf_counter() - start) / (len(batches) - 3) * 1000:.1f} ms/step", flush=True)


def profile(fn, batches, label):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            fn(b)
        torch.cuda.synchronize()
    print(f"== {label}: by host time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(f"== {label}: by GPU time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def training(method, compiled):
    from types import SimpleNamespace

    from model_family import CHATGLM6B
    from training import build_engine, setup_distributed
    _, _, device = setup_distributed()
    spec = METHODS[method]
    config = official_config()
    model = build_model(config, torch.bfloat16).train()
    args = SimpleNamespace(learning_rate=1e-4, weight_decay=0.1, lr_scheduler="linear", warmup_ratio=0.0,
                           train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0, zero_stage=1,
                           offload=False, ds_config=None, precision="bf16", model_dir="random", **spec["extra"])
    model = getattr(__import__(spec["module"]), spec["cls"])().prepare(model, args, CHATGLM6B)
    if compiled:
        from training import compile_blocks
        compile_blocks(model)
    batches = [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "labels")}
               for b in make_batches(load_profile(), config, 16)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def forward_only(b):
        with torch.no_grad():
            model(**b, loss_only=True)

    def plain(b):
        model(**b, loss_only=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timed(forward_only, batches, "forward only")
    timed(plain, batches, "plain PyTorch step")
    timed(plain, batches, "plain PyTorch step (again, shapes seen)")
    engine = build_engine(model, args, 1, device, 10_000)

    def ds(b):
        loss = engine(**b, loss_only=True).loss
        engine.backward(loss)
        engine.step()
    timed(ds, batches, "DeepSpeed step")
    profile(ds, batches[:4], "DeepSpeed step")


def decode():
    from prediction import left_pad
    config = official_config()
    model = build_model(config, torch.bfloat16).eval()
    prompt = [[20100] * 200 + [config.gmask_token_id, config.bos_token_id]]
    input_ids, mask = left_pad(prompt, config.pad_token_id)

    def run(new):
        model.generate(input_ids=input_ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=config.pad_token_id)
    for attention in ("sdpa", "eager"):
        model.config._attn_implementation = attention
        run(4)
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(64)
        torch.cuda.synchronize()
        print(f"decode one row, {attention}: {(time.perf_counter() - start) / 64 * 1000:.1f} ms/token", flush=True)
    model.config._attn_implementation = "sdpa"
    profile(lambda _: run(16), [None], "decode 16 tokens, sdpa")


def static_decode(family, batch=50):
    """GPU time per kernel of the static decoder's step at batch 50 (run eagerly: a CUDA graph replays the same
    kernels), for the ChatGLM-6B or ChatGLM2/3-6B size; the prompts have the spo test lengths."""
    import bench_gpu
    from decoding import StaticDecoder
    from prediction import left_pad
    bench_gpu.FAMILY = family
    config = bench_gpu.official_config()
    model = build_model(config, torch.bfloat16).eval()
    input_ids, mask = left_pad(bench_gpu.make_prompts(load_profile(), config, batch), config.pad_token_id)
    decoder = StaticDecoder(model, input_ids.cuda(), mask.cuda(), 64)
    with torch.no_grad():
        decoder.prefill()
        decoder.cache.visible = decoder.cache.capacity
        for _ in range(3):
            decoder.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            decoder.step()
        torch.cuda.synchronize()
        print(f"{family} static decode step, batch {batch}, eager: {(time.perf_counter() - start) / 20 * 1000:.1f} ms",
              flush=True)
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                decoder.step()
            torch.cuda.synchronize()
    print(f"== {family} decode step x5: by GPU time")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="lora", choices=list(METHODS))
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--static_decode", choices=["chatglm", "chatglm2"], default=None,
                        help="kernel times of the static decoder's step at batch 50 for that model size")
    parser.add_argument("--compile", action="store_true", help="compile the blocks first, as training does on a GPU")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    if args.static_decode:
        static_decode(args.static_decode)
    else:
        decode() if args.decode else training(args.method, args.compile)
