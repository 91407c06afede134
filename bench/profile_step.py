"""Where a training step and a decode step spend their time on the GPU (torch.profiler tables).

    python bench/profile_step.py [--method lora] [--decode] [--static_decode chatglm|chatglm2]
    python bench/profile_step.py --optimizer_step freeze [--zero_stage 0|1|2] [--ds_zero '{"contiguous_gradients": false}']
    python bench/profile_step.py --decode_attention

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
    from training_engine import build_engine, setup_distributed
    _, _, device = setup_distributed()
    spec = METHODS[method]
    config = official_config()
    model = build_model(config, torch.bfloat16).train()
    args = SimpleNamespace(learning_rate=1e-4, weight_decay=0.1, lr_scheduler="linear", warmup_ratio=0.0,
                           train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0, zero_stage=1,
                           offload=False, ds_config=None, precision="bf16", model_dir="random", **spec["extra"])
    model = getattr(__import__(spec["module"]), spec["cls"])().prepare(model, args, CHATGLM6B)
    if compiled:
        from training_engine import compile_blocks
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
    from decoding import left_pad
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
    from decoding import left_pad
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


def optimizer_step(method, zero_stage, zero_extra):
    """Synchronised milliseconds of DeepSpeed's backward and optimizer step (eager forward, 64-token rows: the
    optimizer's cost does not depend on the batch), then the profiler's table of the optimizer step alone."""
    import json as json_module
    from types import SimpleNamespace

    from model_family import CHATGLM6B
    from training_engine import build_engine, setup_distributed
    _, _, device = setup_distributed()
    spec = METHODS[method]
    model = build_model(official_config(), torch.bfloat16).train()
    args = SimpleNamespace(learning_rate=1e-4, weight_decay=0.1, lr_scheduler="linear", warmup_ratio=0.0,
                           train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0, zero_stage=zero_stage,
                           offload=False, ds_config=None, precision="bf16", model_dir="random", **spec["extra"])
    model = getattr(__import__(spec["module"]), spec["cls"])().prepare(model, args, CHATGLM6B)
    if zero_extra:
        import training_engine as training
        plain = training.deepspeed_config

        def with_extra(a, world_size):
            config = plain(a, world_size)
            config["zero_optimization"].update(json_module.loads(zero_extra))
            return config
        training.deepspeed_config = with_extra
    engine = build_engine(model, args, 1, device, 10_000)
    ids = torch.randint(20005, 130000, (2, 64), device=device)
    backward_ms, step_ms = [], []
    for i in range(13):
        loss = engine(input_ids=ids, labels=ids, loss_only=True).loss
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.backward(loss)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        if i == 12:
            from torch.profiler import ProfilerActivity, profile as torch_profile
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
        else:
            engine.step()
            torch.cuda.synchronize()
        if i >= 2 and i < 12:
            backward_ms.append((t1 - t0) * 1000)
            step_ms.append((time.perf_counter() - t1) * 1000)
    print(f"{method} zero {zero_stage} {zero_extra or ''}: backward {sum(backward_ms) / 10:.1f} ms, optimizer step "
          f"{sum(step_ms) / 10:.1f} ms, peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB, "
          f"optimizer {type(engine.optimizer).__name__}", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))


def decode_attention(batch=50, heads=32, kv_heads=32, head_dim=128, new_tokens=315, at_step=157):
    """One decode step's attention over the spo test prompts' cache, 28 layers' worth: the masked kernel over the
    left-padded cache (as StaticKVCache) vs flash attention reading each row's own keys only (seqused_k)."""
    lengths = load_profile()["test_prompt_lengths"][:batch]
    longest = max(lengths)
    capacity = longest + new_tokens
    used = torch.tensor([n + at_step + 1 for n in lengths], device="cuda", dtype=torch.int32)
    query = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, capacity, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    visible = min(-(-(longest + at_step + 1) // 64) * 64, capacity)
    slot = torch.arange(visible, device="cuda")
    start = torch.tensor([longest - n for n in lengths], device="cuda")
    mask = ((slot >= start[:, None]) & (slot < longest + at_step + 1))[:, None, None, :]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = heads // kv_heads

    def masked():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(
                query.view(batch, kv_heads, group, head_dim), keys[:, :visible].transpose(1, 2),
                values[:, :visible].transpose(1, 2), attn_mask=mask)
    cu_q = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    cu_k = cu_q * capacity

    def flash():
        return torch.ops.aten._flash_attention_forward(
            query[:, :, 0], keys.view(-1, kv_heads, head_dim), values.view(-1, kv_heads, head_dim), cu_q, cu_k, 1,
            capacity, 0.0, False, False, seqused_k=used)[0]
    # same numbers: the masked kernel's keys for row i sit at slots start_i.., flash's at 0..
    reference = torch.stack([torch.nn.functional.scaled_dot_product_attention(
        query[i:i + 1], keys[i:i + 1, :int(used[i])].transpose(1, 2), values[i:i + 1, :int(used[i])].transpose(1, 2),
        enable_gqa=True) for i in range(batch)])
    print("flash seqused_k matches per-row attention:",
          torch.allclose(flash().float(), reference[:, 0, :, 0].float(), atol=2e-2), flush=True)
    for label, fn in (("masked, left-padded cache", masked), ("flash varlen, seqused_k", flash)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(28 * 20):
            fn()
        torch.cuda.synchronize()
        print(f"{kv_heads} kv heads, {label}: {(time.perf_counter() - t0) / 20 * 1000:.2f} ms per step (28 layers)",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="lora", choices=list(METHODS))
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--static_decode", choices=["chatglm", "chatglm2"], default=None,
                        help="kernel times of the static decoder's step at batch 50 for that model size")
    parser.add_argument("--compile", action="store_true", help="compile the blocks first, as training does on a GPU")
    parser.add_argument("--optimizer_step", choices=list(METHODS), default=None,
                        help="time and profile DeepSpeed's optimizer step for this method")
    parser.add_argument("--zero_stage", type=int, default=1)
    parser.add_argument("--ds_zero", default=None, help="JSON merged into the zero_optimization section")
    parser.add_argument("--decode_attention", action="store_true", help="masked vs flash (seqused_k) decode attention")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    if args.optimizer_step:
        optimizer_step(args.optimizer_step, args.zero_stage, args.ds_zero)
    elif args.decode_attention:
        decode_attention()
        decode_attention(kv_heads=2)
    elif args.static_decode:
        static_decode(args.static_decode)
    else:
        decode() if args.decode else training(args.method, args.compile)
