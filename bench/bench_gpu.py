"""The reference experiment on one GPU: training step time, memory and MFU per method, and prediction time.

A ChatGLM-6B-sized model (the official config: 28 layers, hidden 4096, 32 heads, vocab 130,528) — or with
`--family chatglm2` a ChatGLM2/3-6B-sized one (28 layers, hidden 4096, ffn 13,696, 2 KV groups, vocab 65,024), or
with `--family glm4` a GLM-4-9B-sized one (40 layers, vocab 151,552, otherwise ChatGLM2's shapes) — is
built with random weights directly on the GPU (speed and memory do not depend on the weights). Batches follow the token
lengths of the spo training set (bench/spo_lengths.json, made by bench/make_length_profile.py with a tokenizer
trained on that data), two rows per step as in the reference, through the suite's own method code
(finetuning_*.py) and DeepSpeed engine (training.build_engine: ZeRO-1, bf16).

Each training variant runs in its own process, so its peak memory is its own. "reference config" is our code
set up as the reference project ran: every row padded to 768, fp16 with loss scaling, eager attention, full
logits; prediction one row at a time. `--all` starts with the training scripts' own GPU defaults (`--step_graphs
--pack_rows`: the figures a user's run gets), then the older variants for comparison.

    python bench/bench_gpu.py --all --out bench/results        # everything, prints the table (10+ minutes; --only narrows it)
    python bench/bench_gpu.py --variant lora [--gc] [--reference]   # one training variant, one JSON line
    python bench/bench_gpu.py --predict | --attention             # prediction / attention comparison
    python bench/bench_gpu.py --all --family chatglm2              # the ChatGLM2/3-6B size (LoRA, P-Tuning v2)
    python bench/bench_gpu.py --all --family glm4                  # the GLM-4-9B size (LoRA, P-Tuning v2)
    python bench/bench_gpu.py --variant lora --step_graphs          # forward+backward replayed as CUDA graphs
    python bench/bench_gpu.py --all --block_graph_variants --skip_predict  # earlier experiment: CUDA-graphed blocks

FLOPs are counted per batch from the matrix shapes (see `train_flops`); MFU = FLOPs / time / 989 TFLOP/s
(H100 SXM dense bf16; an H200 has the same peak).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PEAK_FLOPS = 989e12
REFERENCE_EPOCH_ROWS = 1441  # the reference trained on all 1,441 rows: 720 steps per epoch at batch 2
METHODS = {
    "lora": dict(module="finetuning_lora", cls="LoRA", lr=1e-4, extra=dict(lora_r=8, lora_alpha=32, lora_dropout=0.1,
                                                                           lora_target=None)),
    "freeze": dict(module="finetuning_freeze", cls="Freeze", lr=1e-4,
                   extra=dict(num_trainable_layers=5, freeze_module_name=None)),
    "pt2": dict(module="finetuning_pt", cls="PTuning", lr=2e-2,
                extra=dict(pre_seq_len=16, prefix_projection=False, prompt_embedding_only=False)),
    "pt_embedding_only": dict(module="finetuning_pt", cls="PTuning", lr=2e-2,
                              extra=dict(pre_seq_len=16, prefix_projection=False, prompt_embedding_only=True)),
}


TINY = False  # --tiny: a 2-layer model on whatever device there is, to check this script (tests/test_bench.py)
QUANTIZATION_BIT = 0  # --quantization_bit: the blocks' linears in THUDM's INT8/INT4 format (quantization.py)
BNB_QUANTIZATION = None  # --quantization nf4|int8: the blocks' linears as bitsandbytes layers (QLoRA)
MEMORY_LIMIT_GIB = None  # --memory_limit_gib: a cap on what the steps may allocate
NUM_LAYERS = None  # --num_layers: fewer blocks than the 6B size


def quantize_if_asked(model, keep=()):
    """--quantization_bit / --quantization: quantize the random model's block linears on the GPU, as load_model
    does for a user."""
    if BNB_QUANTIZATION:
        from quantization import bnb_quantize_model
        bnb_quantize_model(model, BNB_QUANTIZATION, torch.bfloat16, keep=keep)
        if on_gpu():
            torch.cuda.empty_cache()
    if QUANTIZATION_BIT:
        from quantization import quantize_model
        quantize_model(model, QUANTIZATION_BIT, keep=keep)
        if on_gpu():
            torch.cuda.empty_cache()
    return model


def on_gpu():
    return torch.cuda.is_available()


def sync():
    if on_gpu():
        torch.cuda.synchronize()


def reset_peak():
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if on_gpu() else 0.0


def peak_reserved_gib():
    """What the allocator held at most (allocated plus its cached free blocks): nearer what a card must have."""
    return round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if on_gpu() else 0.0


def device_name():
    return torch.cuda.get_device_name(0) if on_gpu() else "cpu"


def load_profile():
    with open(os.path.join(ROOT, "bench", "spo_lengths.json")) as f:
        return json.load(f)


FAMILY = "chatglm"  # --family chatglm2: the ChatGLM2/3-6B size (ChatGLM3-6B has the same shapes)
# ChatGLM2/3's special token ids in the official tokenizer
GLM2_IDS = {"gmask": 64790, "sop": 64792, "eos": 2, "pad": 0}
# GLM-4-9B's (tokenizer.model's BPE ranks, then the special tokens from 151329)
GLM4_IDS = {"gmask": 151331, "sop": 151333, "user": 151336, "assistant": 151337, "pad": 151329}


def glm2_shaped():
    """ChatGLM2/3 and GLM-4 share the model file (modeling_chatglm2.py)."""
    return FAMILY in ("chatglm2", "glm4")


def official_config(**overrides):
    """The official 6B configuration of the family being measured (the config classes' defaults); --num_layers
    blocks if given."""
    if NUM_LAYERS:
        overrides = {"num_layers": NUM_LAYERS, **overrides}
    if glm2_shaped():
        from configuration_chatglm2 import ChatGLMConfig
        if FAMILY == "glm4":  # GLM-4-9B: 40 layers, vocab 151,552, rotary base 10000 x 500; the rest as ChatGLM2
            overrides = {"num_layers": 40, "padded_vocab_size": 151552, "rope_ratio": 500, "seq_length": 131072,
                         "layernorm_epsilon": 1.5625e-07, "pad_token_id": GLM4_IDS["pad"], **overrides}
        if TINY:
            overrides.update(hidden_size=64, num_layers=6, num_attention_heads=4, kv_channels=16, ffn_hidden_size=128)
            if FAMILY == "glm4":
                overrides.update(padded_vocab_size=65024, pad_token_id=0)
        return ChatGLMConfig(**overrides)  # 28 layers, hidden 4096, ffn 13,696, 2 KV groups, vocab 65,024
    from configuration_chatglm import ChatGLMConfig
    if TINY:
        overrides.update(hidden_size=64, num_layers=6, num_attention_heads=4, inner_hidden_size=128)
    return ChatGLMConfig(**overrides)  # 28 layers, hidden 4096, 32 heads, vocab 130,528


def build_model(config, dtype):
    """A 6B-sized model with random weights, made on the GPU."""
    if glm2_shaped():
        from modeling_chatglm2 import ChatGLMForConditionalGeneration
    else:
        from modeling_chatglm import ChatGLMForConditionalGeneration
    torch.set_default_dtype(dtype)
    with torch.device("cuda" if on_gpu() else "cpu"):
        model = ChatGLMForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    return model


def head_of(model):
    return model.get_output_embeddings()


def random_row(config, length, answer):
    """(ids, first labelled position) of one row in the family's layout, random text."""
    context = length - answer
    if FAMILY == "glm4":  # [gMASK] <sop> <|user|> \n source <|assistant|> \n answer <|user|>
        vocab = config.padded_vocab_size
        ids = torch.randint(100, min(151000, vocab - 1), (length,))
        ids[0], ids[1], ids[2] = GLM4_IDS["gmask"] % vocab, GLM4_IDS["sop"] % vocab, GLM4_IDS["user"] % vocab
        ids[context - 2], ids[length - 1] = GLM4_IDS["assistant"] % vocab, GLM4_IDS["user"] % vocab
        return ids, context - 1  # the newline after <|assistant|> is learned
    if FAMILY == "chatglm2":  # [gMASK] sop source answer eos
        ids = torch.randint(100, min(64000, config.padded_vocab_size - 1), (length,))
        ids[0], ids[1], ids[length - 1] = GLM2_IDS["gmask"] % config.padded_vocab_size, \
            GLM2_IDS["sop"] % config.padded_vocab_size, GLM2_IDS["eos"]
        return ids, context
    ids = torch.randint(20005, min(130000, config.vocab_size - 1), (length,))  # source [gMASK] <sop> answer <eop>
    ids[context - 1], ids[context], ids[length - 1] = config.gmask_token_id, config.bos_token_id, config.eos_token_id
    return ids, context


def make_batches(profile, config, n, pad_to=None, seed=0, bucket=None, group_by_length=False, pack=False):
    """Batches of two training rows with the spo lengths, padded to their longest row (or `pad_to`, or up to a
    multiple of `bucket`): random pairs, or with `group_by_length` the pairs the training sampler makes with
    --group_by_length. With `pack`, each pair is one sequence instead (data_set.PackRows, as --pack_rows)."""
    from data_set import EpochSampler, PackRows, round_up
    from model_family import FAMILIES
    packer = PackRows(config.pad_token_id, FAMILIES[FAMILY].packed_row_inputs, config, bucket or 0) if pack else None
    rng = random.Random(seed)
    rows = list(zip(profile["train_lengths"], profile["train_label_tokens"]))
    grouped = list(EpochSampler(profile["train_lengths"], 2, seed, group_by_length=True)) if group_by_length else []
    batches = []
    for i in range(n):
        pair = [rows[j] for j in grouped[2 * i:2 * i + 2]] if group_by_length else rng.sample(rows, 2)
        if packer:
            made = [random_row(config, length, answer) for length, answer in pair]
            batch = packer([{"input_ids": ids.tolist(), "labels": [-100] * context + ids[context:].tolist()}
                            for ids, context in made])
            batches.append({**batch, "real_tokens": sum(length for length, _ in pair),
                            "row_lengths": [length for length, _ in pair]})
            continue
        width = pad_to or round_up(max(length for length, _ in pair), bucket)
        input_ids = torch.full((2, width), config.pad_token_id, dtype=torch.long)
        labels = torch.full((2, width), -100, dtype=torch.long)
        for i, (length, answer) in enumerate(pair):
            ids, context = random_row(config, length, answer)
            input_ids[i, :length] = ids
            labels[i, context:length] = ids[context:]
        batches.append({"input_ids": input_ids, "labels": labels,
                        "real_tokens": sum(length for length, _ in pair)})
    return batches


def layer_weights(config):
    """Weights of one layer's matmuls. ChatGLM-6B: qkv 3h^2, dense h^2, MLP 2 x h x 4h (12 h^2 in all).
    ChatGLM2/3: q h^2 plus keys/values for 2 groups of 128 (h x 512), dense h^2, SwiGLU 3 x h x ffn."""
    h = config.hidden_size
    if hasattr(config, "padded_vocab_size"):
        q = config.num_attention_heads * config.kv_channels
        kv = 2 * config.multi_query_group_num * config.kv_channels
        return h * (q + kv) + q * h + 3 * h * config.ffn_hidden_size
    return 4 * h * h + 2 * h * config.inner_hidden_size


def train_flops(batch, config, method, trainable_layers):
    """Model FLOPs of one training step (no recomputation counted).

    Per layer the matmuls hold W weights (`layer_weights`): forward 2 W per token; attention 4 s^2 h per
    sequence (QK^T and PV over the full square, as computed; a packed sequence counts each row's own square,
    the useful work, though the kernel computes the packed square with a mask). The head is applied only
    where a label is (loss_only) or, in the reference config, everywhere. Backward: activation gradients (the
    forward's cost again, attention twice) through every layer the gradient must cross, plus weight gradients
    (the forward's cost again) for trained weights. LoRA, P-Tuning v2 and the embedding-only prompt need
    activation gradients down to the first layer; Freeze only through its last layers.
    """
    h, layers, vocab, weights = config.hidden_size, config.num_layers, config.vocab_size, layer_weights(config)
    labels = batch["labels"]
    tokens = labels.numel() if batch.get("padded") else batch["real_tokens"]
    seq_lens = [labels.shape[1]] * 2 if batch.get("padded") else batch.get("row_lengths") or \
        [int((row != config.pad_token_id).sum()) for row in batch["input_ids"]]
    head_tokens = tokens if batch.get("full_logits") else int((labels[:, 1:] != -100).sum())
    layer_fwd = 2 * weights * tokens + sum(4 * s * s * h for s in seq_lens)
    head_fwd = 2 * head_tokens * h * vocab
    forward = layers * layer_fwd + head_fwd
    crossed = trainable_layers if method == "freeze" else layers
    attention = sum(4 * s * s * h for s in seq_lens)
    backward = head_fwd + crossed * (layer_fwd + attention)  # activation gradients
    if method == "freeze":
        backward += trainable_layers * 2 * weights * tokens  # weight gradients of the trained layers
    return forward + backward


def method_args(spec, precision):
    """The arguments a training script would give its Method and build_engine (ZeRO-1, batch 2, no warm-up)."""
    return SimpleNamespace(learning_rate=spec["lr"], weight_decay=0.1, lr_scheduler="linear", warmup_ratio=0.0,
                           train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0, zero_stage=1,
                           offload=False, ds_config=None, precision=precision, model_dir="random", **spec["extra"])


MODEL_INPUTS = ("input_ids", "labels", "label_positions", "position_ids", "attention_mask", "packed_rows")


def run_training_variant(method, gradient_checkpointing, reference, steps, warmup, compile_blocks_=True,
                         compile_mode=None, bucket=None, step_graphs=False, group_by_length=False, pack_rows=False,
                         profile_kernels=False, find_host_waits=False, memory_at_peak=False):
    from model_family import FAMILIES
    from data_set import labelled_positions
    from training_engine import build_engine, compile_blocks, enable_checkpointing, setup_distributed
    spec = METHODS[method]
    _, _, device = setup_distributed()
    torch.manual_seed(0)
    dtype = torch.float16 if reference else torch.bfloat16
    overrides = {k: v for k, v in spec["extra"].items() if k in ("pre_seq_len", "prefix_projection",
                                                                 "prompt_embedding_only")}
    config = official_config(**overrides)
    model = build_model(config, dtype)
    trained_layers = [f"layers.{i}." for i in range(config.num_layers - 5, config.num_layers)]
    quantize_if_asked(model, keep=trained_layers if method == "freeze" else ())
    if reference:
        model.config._attn_implementation = "eager"
    enable_checkpointing(model, gradient_checkpointing)
    model.train()
    module = __import__(spec["module"])
    args = method_args(spec, "fp16" if reference else "bf16")
    model = getattr(module, spec["cls"])().prepare(model, args, FAMILIES[FAMILY])
    compiled = compile_blocks_ and not reference
    if compiled:
        compile_blocks(model, compile_mode)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(model, args, 1, device, total_steps=10_000)
    if step_graphs:
        bucket = bucket or 64
    batches = make_batches(load_profile(), config, warmup + steps, pad_to=768 if reference else None, bucket=bucket,
                           group_by_length=group_by_length, pack=pack_rows)
    for b in batches:
        b["padded"], b["full_logits"] = reference, reference
        if step_graphs:
            b["label_positions"] = labelled_positions(b["labels"], bucket)
    reset_peak()
    if MEMORY_LIMIT_GIB and on_gpu():  # from here on: the model is built (a bf16 model first) and quantized
        torch.cuda.set_per_process_memory_fraction(MEMORY_LIMIT_GIB * 2 ** 30 /
                                                   torch.cuda.get_device_properties(0).total_memory)
    recording = None
    if memory_at_peak and on_gpu():  # slows the host: this run's times are not comparable
        from memory_at_peak import MemoryAtPeak
        recording = MemoryAtPeak()
    if step_graphs:
        from training_graphs import TrainingGraphs
        graphs = TrainingGraphs(engine.module, device)
        batch_loss = lambda b: graphs({k: b[k] for k in MODEL_INPUTS if k in b})
    else:
        batch_loss = lambda b: engine(**{k: b[k].to(device) for k in MODEL_INPUTS if k in b},
                                      loss_only=not reference).loss

    def step(b):
        engine.backward(batch_loss(b))
        engine.step()
    warm = batches[:warmup]
    if bucket:  # every batch shape the timed steps will see, twice (compilation, then CUDA graph recording)
        shapes = {tuple(b[k].shape[-1] for k in ("input_ids", "label_positions") if k in b): b
                  for b in batches[warmup:]}
        warm += [b for b in shapes.values() for _ in range(1 if step_graphs else 2)]
    for b in warm:
        step(b)
    sync()
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    sync()
    seconds = (time.perf_counter() - start) / steps
    at_peak = recording.stop() if recording else None
    if at_peak:
        from memory_at_peak import print_table
        print_table(at_peak)
    phases = step_phases(step, batches[warmup:], engine, batch_loss)
    if profile_kernels:
        print_kernel_profile(step, batches[warmup:warmup + 10])
    if find_host_waits:
        print_host_waits(engine, batch_loss, batches[warmup:warmup + 10])
    measured = batches[warmup:]
    real_tokens = sum(b["real_tokens"] for b in measured) / steps
    flops = sum(train_flops(b, config, method, 5) for b in measured) / steps
    steps_per_epoch = REFERENCE_EPOCH_ROWS // 2
    return {"family": FAMILY, "method": method, "quantization_bit": QUANTIZATION_BIT, "quantization": BNB_QUANTIZATION,
            "gradient_checkpointing": gradient_checkpointing,
            "reference_config": reference, "compiled": compiled, "compile_mode": compile_mode, "bucket": bucket,
            "step_graphs": step_graphs, "group_by_length": group_by_length, "pack_rows": pack_rows,
            "synced_phases_ms": phases,
            "optimizer": type(engine.optimizer).__name__,
            "trainable_params": trainable, "ms_per_step": round(seconds * 1000, 1),
            "real_tokens_per_s": round(real_tokens / seconds), "s_per_epoch": round(seconds * steps_per_epoch, 1),
            "min_for_5_epochs": round(seconds * steps_per_epoch * 5 / 60, 2),
            "sliced_loss": bool(__import__("modeling_chatglm").LOSS_SLICE_LOGITS),
            "peak_gib": peak_gib(), "peak_reserved_gib": peak_reserved_gib(), "memory_at_peak": at_peak,
            "mfu": round(flops / seconds / PEAK_FLOPS, 3), "gpu": device_name()}


# first match wins: flash attention's kernel names mention cutlass types
KERNEL_KINDS = [("attention", ("flash", "fmha", "attention")), ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
                ("compiled (triton)", ("triton",)), ("copy / fill", ("memcpy", "memset", "copy", "fill")),
                ("index / scatter", ("index", "scatter", "gather")), ("reduction", ("reduce",))]


def kernel_kind(name):
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other")


def print_kernel_profile(step, batches):
    """GPU time per kernel kind and the top kernels over `batches` steps (CUDA graph replays included), against
    the wall time: what the GPU computes and how long it sits idle."""
    from torch.profiler import ProfilerActivity, profile
    sync()
    start = time.perf_counter()
    on_gpu = torch.cuda.is_available()  # on the CPU (the tests' tiny model) operators stand in for kernels
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for b in batches:
            step(b)
        sync()
    wall = (time.perf_counter() - start) * 1000 / len(batches)
    kinds, kernels = {}, []
    for event in prof.key_averages():
        gpu_ms = (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1000 / len(batches)
        if gpu_ms <= 0:
            continue
        kinds[kernel_kind(event.key)] = kinds.get(kernel_kind(event.key), 0.0) + gpu_ms
        kernels.append((gpu_ms, event.count // len(batches), event.key[:90]))
    print(f"kernel profile: {wall:.1f} ms per step under the profiler, GPU busy {sum(kinds.values()):.1f} ms", flush=True)
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:20s} {ms:7.2f} ms/step")
    for ms, count, name in sorted(kernels, reverse=True)[:25]:
        print(f"  {ms:7.2f} ms {count:5d}x  {name}")


def print_host_waits(engine, batch_loss, batches):
    """Host time of each part of a step, nothing synchronised by us, and every place where torch waits for the GPU
    (torch.cuda.set_sync_debug_mode): a part whose host time is the GPU's step time is waiting for it."""
    import warnings
    host = {"loss": 0.0, "backward": 0.0, "step": 0.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for b in batches:
            t0 = time.perf_counter()
            loss = batch_loss(b)
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            for part, seconds in zip(host, (t1 - t0, t2 - t1, t3 - t2)):
                host[part] += seconds
        torch.cuda.set_sync_debug_mode("default")
    sync()
    print("host ms per step, unsynchronised: " + ", ".join(f"{k} {v * 1000 / len(batches):.1f}" for k, v in host.items()))
    places = {}
    for w in caught:
        key = f"{w.filename}:{w.lineno}: {str(w.message)[:80]}"
        places[key] = places.get(key, 0) + 1
    print(f"host waits for the GPU: {sum(places.values())} in {len(batches)} steps")
    for key, count in sorted(places.items(), key=lambda kv: -kv[1]):
        print(f"  {count:4d}x {key}")


def step_phases(step, batches, engine, batch_loss):
    """Milliseconds per step of forward+backward and of DeepSpeed's optimizer step, each timed with the GPU
    drained before and after (so host and GPU time do not overlap: the sum exceeds a free-running step)."""
    forward_backward = optimizer = 0.0
    for b in batches:
        sync()
        t0 = time.perf_counter()
        engine.backward(batch_loss(b))
        sync()
        t1 = time.perf_counter()
        engine.step()
        sync()
        forward_backward, optimizer = forward_backward + t1 - t0, optimizer + time.perf_counter() - t1
    return {"forward_backward": round(forward_backward / len(batches) * 1000, 1),
            "optimizer_step": round(optimizer / len(batches) * 1000, 1)}


def make_prompts(profile, config, rows=50):
    """The test prompts' lengths in the family's layout, random text."""
    prompts = []
    for length in profile["test_prompt_lengths"][:rows]:
        if FAMILY == "glm4":
            vocab = config.padded_vocab_size
            ids = torch.randint(100, min(151000, vocab - 1), (length,)).tolist()
            ids[:3] = [GLM4_IDS["gmask"] % vocab, GLM4_IDS["sop"] % vocab, GLM4_IDS["user"] % vocab]
            ids[-1] = GLM4_IDS["assistant"] % vocab
        elif FAMILY == "chatglm2":
            ids = torch.randint(100, 64000, (length,)).tolist()
            ids[:2] = [GLM2_IDS["gmask"], GLM2_IDS["sop"]]
        else:
            ids = torch.randint(20005, 130000, (length,)).tolist()
            ids[-2:] = [config.gmask_token_id, config.bos_token_id]
        prompts.append(ids)
    return prompts


def timed_generate(model, prompts, batch_size, new_tokens, pad_id, decoder, prefill_rows=13, decode_bucket=64):
    """Seconds to generate exactly `new_tokens` per prompt (no stop token), `batch_size` rows at a time."""
    from decoding import greedy_decode
    from decoding import left_pad
    device = head_of(model).weight.device
    sync()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        input_ids, mask = left_pad(prompts[i:i + batch_size], pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        if decoder == "static":
            greedy_decode(model, input_ids, mask, new_tokens, stop_ids=[], prefill_rows=prefill_rows,
                          bucket=decode_bucket)
        else:
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    sync()
    return time.perf_counter() - start


PREDICTION_VARIANTS = [  # name, dtype, attention, rows per batch, decoder
    ("batched, static cache + CUDA graph (ours)", torch.bfloat16, "sdpa", 50, "static"),
    ("batched, transformers generate()", torch.bfloat16, "sdpa", 50, "generate"),
    ("one row at a time, static cache + CUDA graph (ours)", torch.bfloat16, "sdpa", 1, "static"),
    ("one row at a time (reference config: fp16, eager, generate())", torch.float16, "eager", 1, "generate"),
]


def run_prediction(new_tokens, single_rows, matching=None, prefill_rows=13, decode_bucket=64):
    """50 test prompts, `new_tokens` generated each, in the variants above (those whose name contains `matching`);
    one-row-at-a-time variants time the first `single_rows` rows and scale to 50. `prefill_rows`: the static
    decoder's prompt groups (50: the whole batch in one forward)."""
    torch.manual_seed(0)
    config = official_config()
    prompts = make_prompts(load_profile(), config)
    results = []
    for name, dtype, attention, batch, decoder in PREDICTION_VARIANTS:
        if matching and matching not in name:
            continue
        model = quantize_if_asked(build_model(config, dtype)).eval()
        model.config._attn_implementation = attention
        rows = prompts if batch > 1 else prompts[:single_rows]
        timed_generate(model, rows[:2], batch, 8, config.pad_token_id, decoder, prefill_rows, decode_bucket)  # warm-up
        seconds = timed_generate(model, rows, batch, new_tokens, config.pad_token_id, decoder,
                                 prefill_rows, decode_bucket) * len(prompts) / len(rows)
        results.append({"family": FAMILY, "prediction": name, "quantization_bit": QUANTIZATION_BIT,
                        "quantization": BNB_QUANTIZATION,
                        "rows": len(prompts), "measured_rows": len(rows),
                        "prefill_rows": prefill_rows if decoder == "static" else None,
                        "decode_bucket": decode_bucket if decoder == "static" else None,
                        "new_tokens": new_tokens, "seconds_for_50": round(seconds, 2),
                        "ms_per_token_step": round(seconds / (len(prompts) / batch) / new_tokens * 1000, 2),
                        "peak_gib": peak_gib(), "gpu": device_name()})
        print(json.dumps(results[-1]), flush=True)
        del model
        reset_peak()
    return results


def run_attention_comparison(steps=10):
    """Forward + backward (all weights trainable) of the 6B model at batch 2 x 768 in bf16: SDPA against eager."""
    torch.manual_seed(0)
    config = official_config()
    model = build_model(config, torch.bfloat16).train()
    batch = make_batches(load_profile(), config, 1, pad_to=768)[0]
    device = head_of(model).weight.device
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    ids[:, :] = torch.where(ids == config.pad_token_id, 20100, ids)  # 768 real tokens per row
    results = []
    for attention in ("sdpa", "eager"):
        model.config._attn_implementation = attention
        for p in model.parameters():
            p.grad = None
        sync()
        reset_peak()
        for i in range(steps + 2):
            if i == 2:
                sync()
                start = time.perf_counter()
            model(input_ids=ids, labels=labels, loss_only=True).loss.backward()
        sync()
        results.append({"attention": attention, "batch": "2 x 768", "dtype": "bf16",
                        "fwd_bwd_ms": round((time.perf_counter() - start) / steps * 1000, 1),
                        "peak_gib": peak_gib(), "gpu": device_name()})
    return results


def variant_list(cuda_graphs=False):
    """First the training scripts' GPU defaults (rows packed, the step as CUDA graphs: only on a GPU), then the
    older variants (padded rows, compiled blocks), checkpointing and the reference configuration."""
    methods = ["lora", "pt2"] if glm2_shaped() else METHODS  # the issues ask for LoRA and P-Tuning v2 at those sizes
    defaults = [[m, "--step_graphs", "--pack_rows"] for m in methods] if torch.cuda.is_available() else []
    if glm2_shaped():
        variants = defaults + [["lora"], ["lora", "--gc"], ["pt2"], ["pt2", "--gc"], ["lora", "--reference"],
                               ["pt2", "--reference"]]
    else:
        variants = list(defaults)
        for method in METHODS:
            variants.append([method])
            variants.append([method, "--gc"])
        variants += [["lora", "--no_compile"], ["lora", "--reference"], ["freeze", "--reference"],
                     ["pt2", "--reference"], ["pt_embedding_only", "--reference"]]
    if cuda_graphs:  # lengths padded to multiples of 64: alone, and with each block replayed as a CUDA graph
        variants = [v for v in variants if "--reference" not in v and "--gc" not in v and "--no_compile" not in v
                    and "--step_graphs" not in v]
        variants = [v + extra for v in variants
                    for extra in (["--bucket", "64"], ["--bucket", "64", "--compile_mode", "reduce-overhead"])]
    return variants


def run_all(out_dir, steps, warmup, new_tokens, single_rows, skip_predict, prediction_from=None, only=None,
            cuda_graphs=False):
    rows = []
    tiny = (["--tiny"] if TINY else []) + ["--family", FAMILY]
    for variant in variant_list(cuda_graphs):
        if only and variant[0] not in only:
            continue
        command = [sys.executable, os.path.abspath(__file__), "--variant", *variant, "--steps", str(steps),
                   "--warmup", str(warmup), *tiny]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"FAILED {variant}: {done.stderr[-1500:]}", flush=True)
            continue
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if prediction_from:
        with open(prediction_from) as f:
            prediction = json.load(f)
    else:
        prediction = [] if skip_predict else json.loads(subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--predict", "--new_tokens", str(new_tokens),
         "--single_rows", str(single_rows), *tiny], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    write_report({"date": time.strftime("%Y-%m-%d"), "training": rows, "prediction": prediction}, out_dir)


def merge_reports(paths, out_dir):
    """One report from several partial runs (each GPU call has a time limit)."""
    report = {"date": None, "training": [], "prediction": []}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        report["date"] = part["date"]
        report["training"] += part["training"]
        known = {(r.get("family", "chatglm"), r["prediction"]) for r in part["prediction"]}
        report["prediction"] = [r for r in report["prediction"]
                                if (r.get("family", "chatglm"), r["prediction"]) not in known] + part["prediction"]
    write_report(report, out_dir)


def write_report(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown_table(report)
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write(table)
    print(table)


MODEL_NAMES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2/3-6B", "glm4": "GLM-4-9B"}


def markdown_table(report):
    gpu = (report["training"] or report["prediction"] or [{"gpu": "?"}])[0]["gpu"]
    lines = [f"Measured {report['date']} on {gpu} with `bench/bench_gpu.py` (commands: bench/results/README.md).", "",
             "| model | method | config | ms/step | real tokens/s | 5 epochs (min) | peak GiB | MFU | speed-up vs reference config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    reference = {(r.get("family", "chatglm"), r["method"]): r["ms_per_step"] for r in report["training"]
                 if r["reference_config"]}
    for r in report["training"]:
        family = r.get("family", "chatglm")
        config = "reference config (pad 768, fp16, eager)" if r["reference_config"] else \
            ("ours" + (f", checkpointing {'blocks' if r['gradient_checkpointing'] is True else r['gradient_checkpointing']}"
                       if r["gradient_checkpointing"] else "")
             + ("" if r.get("compiled", True) else ", not compiled")
             + (f", lengths padded to x{r['bucket']}" if r.get("bucket") else "")
             + (", blocks as CUDA graphs" if r.get("compile_mode") == "reduce-overhead" else "")
             + (", step as CUDA graphs" if r.get("step_graphs") else "")
             + (", --group_by_length" if r.get("group_by_length") else "")
             + (", --pack_rows" if r.get("pack_rows") else "")
             + (f", {r['optimizer']}" if r.get("optimizer") else ""))
        ratio = "" if r["reference_config"] or (family, r["method"]) not in reference else \
            f"{reference[family, r['method']] / r['ms_per_step']:.1f}x"
        lines.append(f"| {MODEL_NAMES[family]} | {r['method']} | {config} | {r['ms_per_step']} | {r['real_tokens_per_s']} | "
                     f"{r['min_for_5_epochs']} | {r['peak_gib']} | {100 * r['mfu']:.1f}% | {ratio} |")
    if report["prediction"]:
        lines += ["", "| model | prediction of the 50 test rows | new tokens per row | seconds (50 rows) | ms per decode step | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in report["prediction"]:
            note = "" if r["measured_rows"] == r["rows"] else f" ({r['measured_rows']} rows timed, scaled to 50)"
            lines.append(f"| {MODEL_NAMES[r.get('family', 'chatglm')]} | {r['prediction']}{note} | {r['new_tokens']} | {r['seconds_for_50']} | "
                         f"{r['ms_per_token_step']} | {r['peak_gib']} |")
    return "\n".join(lines) + "\n"


def main():
    from training_options import CHECKPOINTING_KINDS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every variant and prediction; writes --out")
    parser.add_argument("--variant", choices=list(METHODS), help="one training variant")
    parser.add_argument("--gc", nargs="?", const="blocks", choices=CHECKPOINTING_KINDS, default=None,
                        help="with gradient checkpointing: whole blocks (bare), only the MLPs' inner part, or that and "
                             "the packed rows' attention kernels")
    parser.add_argument("--reference", action="store_true", help="the reference configuration")
    parser.add_argument("--no_compile", action="store_true", help="ours without torch.compile of the blocks")
    parser.add_argument("--predict", action="store_true")
    parser.add_argument("--attention", action="store_true", help="SDPA vs eager forward+backward")
    parser.add_argument("--skip_predict", action="store_true")
    parser.add_argument("--prediction_from", default=None, help="with --all: a JSON file of --predict output "
                        "measured earlier, put into the report instead of measuring again")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation happens here)")
    parser.add_argument("--new_tokens", type=int, default=315, help="generated per row (the reference's maximum)")
    parser.add_argument("--single_rows", type=int, default=3, help="rows timed one at a time (scaled to 50)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--only", default=None, help="with --all: comma-separated methods to run")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge bench_gpu.json files of "
                        "partial runs into --out")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script, measures nothing")
    parser.add_argument("--family", choices=["chatglm", "chatglm2", "glm4"], default="chatglm",
                        help="ChatGLM-6B, the ChatGLM2/3-6B size (ChatGLM3-6B has ChatGLM2-6B's shapes) or "
                             "GLM-4-9B's (40 layers, vocab 151,552)")
    parser.add_argument("--bucket", type=int, default=None, help="pad each batch's length up to a multiple of this")
    parser.add_argument("--compile_mode", default=None, choices=["reduce-overhead"],
                        help="torch.compile mode of the blocks (reduce-overhead: CUDA graphs; use with --bucket)")
    parser.add_argument("--block_graph_variants", action="store_true", help="with --all: only the bucketed and "
                        "per-block CUDA-graph variants (an earlier experiment)")
    parser.add_argument("--step_graphs", action="store_true", help="replay each step's forward and backward as "
                        "CUDA graphs (training_graphs.py; lengths padded to a multiple of --bucket, default 64)")
    parser.add_argument("--pack_rows", action="store_true", help="each pair of rows as one sequence, as the training "
                        "scripts' --pack_rows")
    parser.add_argument("--group_by_length", action="store_true", help="pair rows as the training scripts' "
                        "--group_by_length does (less padding) instead of at random")
    parser.add_argument("--variants_matching", default=None, help="with --predict: only the variants whose name "
                        "contains this text")
    parser.add_argument("--prefill_rows", type=int, default=13, help="with --predict: prompts per prefill forward "
                        "of the static decoder (grouped by length; 50 = all at once)")
    parser.add_argument("--decode_bucket", type=int, default=64, help="with --predict: the static decoder's cache "
                        "slots per CUDA graph (attention reads the visible slots rounded up to this)")
    parser.add_argument("--profile_kernels", action="store_true", help="with --variant: also print the GPU time per "
                        "kernel kind and the top kernels of 10 steps")
    parser.add_argument("--find_host_waits", action="store_true", help="with --variant: also print each step part's "
                        "host time and where the host waits for the GPU")
    parser.add_argument("--quantization_bit", type=int, choices=[0, 8, 4], default=0,
                        help="the frozen base's block linears in INT8/INT4 (THUDM's format, quantization.py)")
    parser.add_argument("--quantization", choices=["nf4", "int8"], default=None,
                        help="the frozen base's block linears as bitsandbytes NF4 (QLoRA) or LLM.int8() layers")
    parser.add_argument("--num_layers", type=int, default=None, help="fewer blocks than the family's 6B size "
                        "(quick memory checks: bench/results/quantized/memory_call1to4)")
    parser.add_argument("--memory_limit_gib", type=float, default=None, help="let this process allocate at most this "
                        "much (torch.cuda.set_per_process_memory_fraction): does the variant run on a smaller card? "
                        "(set once the model is built and quantized; the CUDA context, ~0.5 GiB, comes on top)")
    parser.add_argument("--plain_loss", action="store_true", help="the loss over all labelled rows at once, as "
                        "before the sliced loss (modeling_chatglm.LOSS_SLICE_LOGITS = 0)")
    parser.add_argument("--memory_at_peak", action="store_true", help="with --variant: also print what the "
                        "allocations alive at the peak were made by (bench/memory_at_peak.py; the run is not timed)")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    global TINY, FAMILY, QUANTIZATION_BIT, BNB_QUANTIZATION
    TINY, FAMILY, QUANTIZATION_BIT, BNB_QUANTIZATION = args.tiny, args.family, args.quantization_bit, args.quantization
    global MEMORY_LIMIT_GIB, NUM_LAYERS
    MEMORY_LIMIT_GIB = args.memory_limit_gib
    NUM_LAYERS = args.num_layers
    from training_options import TRAINING_CUBLAS_WORKSPACE, choose_allocator
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", TRAINING_CUBLAS_WORKSPACE)  # as the training scripts run
    choose_allocator(SimpleNamespace(quantization_bit=args.quantization_bit, quantization=args.quantization,
                                     model_dir="random"))
    if args.plain_loss:
        import modeling_chatglm
        modeling_chatglm.LOSS_SLICE_LOGITS = 0
    if args.all:
        run_all(args.out, args.steps, args.warmup, args.new_tokens, args.single_rows, args.skip_predict,
                args.prediction_from, args.only.split(",") if args.only else None, args.block_graph_variants)
    elif args.merge:
        merge_reports(args.merge, args.out)
    elif args.variant:
        try:
            row = run_training_variant(args.variant, args.gc, args.reference, args.steps, args.warmup,
                                       not args.no_compile, args.compile_mode, args.bucket, args.step_graphs,
                                       args.group_by_length, args.pack_rows, args.profile_kernels,
                                       args.find_host_waits, args.memory_at_peak)
        except torch.cuda.OutOfMemoryError as err:
            if not args.memory_limit_gib:
                raise
            row = {"method": args.variant, "out_of_memory": str(err).splitlines()[0][:300]}
        print(json.dumps({**row, "memory_limit_gib": args.memory_limit_gib}), flush=True)
        # shut the process group down before exit: once in a CI run (CPU) a communication thread left running
        # aborted the process at exit ("terminate called without an active exception") after its result was printed
        torch.distributed.destroy_process_group()
    elif args.predict:
        print(json.dumps(run_prediction(args.new_tokens, args.single_rows, args.variants_matching,
                                        args.prefill_rows, args.decode_bucket)))
    elif args.attention:
        print(json.dumps(run_attention_comparison()))
    else:
        parser.error("choose --all, --variant, --predict or --attention")


if __name__ == "__main__":
    main()
