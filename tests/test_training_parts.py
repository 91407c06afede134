"""Small parts of the training module that the launcher tests do not reach."""
import argparse
import os
import sys

import torch

import pytest

from conftest import ROOT
from training import check_finite, schedule_length
from training_engine import deepspeed_config
from training_options import COMPILE_PAYS_FROM, resolve_compile, resolve_cuda_graphs, resolve_pack_rows


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_stops_the_run(value):
    with pytest.raises(SystemExit, match=f"step 7: the loss is {value}; stopping without saving"):
        check_finite(value, 7)


def test_a_finite_loss_passes():
    check_finite(0.5, 1)


def args(**overrides):
    base = dict(train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=1.0, zero_stage=2, precision="fp16",
                offload=True, ds_config=None, num_train_epochs=2, max_steps=0, train_path="x.jsonl")
    return argparse.Namespace(**{**base, **overrides})


def test_deepspeed_config_is_built_from_the_arguments():
    config = deepspeed_config(args(), world_size=4)
    assert config["train_batch_size"] == 2 * 3 * 4
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0 and "bf16" not in config


def test_bf16_skips_deepspeeds_per_gradient_overflow_check():
    config = deepspeed_config(args(precision="bf16", offload=False), world_size=1)
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False} and "fp16" not in config


def test_one_bf16_process_hands_deepspeed_the_master_weight_optimizer_and_no_mixed_precision():
    config = deepspeed_config(args(precision="bf16", offload=False, zero_stage=1), world_size=1)
    assert config["zero_optimization"] == {"stage": 0} and "bf16" not in config and "fp16" not in config
    assert config["gradient_clipping"] == 0.0  # optimizer.MasterWeightAdamW clips
    assert config["train_batch_size"] == 2 * 3
    # several processes, or ZeRO-2, keep DeepSpeed's own bf16 optimizer
    assert config != deepspeed_config(args(precision="bf16", offload=False, zero_stage=1), world_size=2)
    assert deepspeed_config(args(precision="bf16", offload=False, zero_stage=2), world_size=1)["bf16"]["enabled"]


@pytest.mark.parametrize("device, overrides, expected", [
    ("cuda", {}, True), ("cpu", {}, False), ("cuda", {"train_batch_size": 1}, False),
    ("cuda", {"prompt_embedding_only": True}, True), ("cpu", {"pack_rows": True}, True),
    ("cuda", {"pack_rows": False}, False)])
def test_packing_rows_defaults_to_on_where_it_helps(device, overrides, expected):
    assert resolve_pack_rows(args(**{"pack_rows": None, **overrides}), torch.device(device)) is expected


@pytest.mark.parametrize("device, overrides, expected", [
    ("cuda", {}, True), ("cpu", {}, False), ("cuda", {"gradient_checkpointing": True}, True),
    ("cuda", {"zero_stage": 3}, False), ("cuda", {"cuda_graphs": False}, False)])
def test_cuda_graphs_default_to_on_where_a_captured_step_works(device, overrides, expected):
    options = args(**{"cuda_graphs": None, "gradient_checkpointing": False, "zero_stage": 1, **overrides})
    assert resolve_cuda_graphs(options, torch.device(device)) is expected


@pytest.mark.parametrize("device, overrides", [("cpu", {}), ("cuda", {"zero_stage": 3})])
def test_asking_for_cuda_graphs_where_they_cannot_work_is_a_clear_error(device, overrides):
    options = args(**{"cuda_graphs": True, "gradient_checkpointing": False, "zero_stage": 1, **overrides})
    with pytest.raises(SystemExit, match="--cuda_graphs cannot be used here"):
        resolve_cuda_graphs(options, torch.device(device))


@pytest.mark.parametrize("device, steps, overrides, expected", [
    ("cuda", COMPILE_PAYS_FROM, {}, True), ("cuda", 3545, {}, False), ("cpu", 10 ** 6, {}, False),
    ("cuda", COMPILE_PAYS_FROM // 2, {"gradient_accumulation_steps": 2}, True),  # passes, not optimizer steps
    ("cuda", 10, {"quantization_bit": 4}, True), ("cuda", 10, {"quantization": "nf4"}, True),
    ("cuda", 3545, {"compile": True}, True), ("cpu", 10, {"compile": True}, True),
    ("cuda", 10 ** 6, {"compile": False}, False)])
def test_blocks_compile_by_default_where_the_run_wins_the_compile_time_back(tiny_model_dir, device, steps, overrides,
                                                                            expected):
    options = args(**{"compile": None, "quantization_bit": 0, "quantization": None, "model_dir": tiny_model_dir,
                      "gradient_accumulation_steps": 1, **overrides})
    assert resolve_compile(options, torch.device(device), steps) is expected


def test_ds_config_file_overrides(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"gradient_clipping": 0.3}')
    assert deepspeed_config(args(ds_config=str(path)), 1)["gradient_clipping"] == 0.3


def test_epochs_end_on_an_optimizer_step():
    class Sampler:
        def __len__(self):
            return 13
    # 13 rows / batch 2 = 6 micro-batches, 3 per step: 2 steps an epoch, 4 in all
    assert schedule_length(args(), Sampler()) == (6, 4)
    assert schedule_length(args(max_steps=3), Sampler()) == (6, 3)
    with pytest.raises(SystemExit, match="fewer rows than one global batch"):
        schedule_length(args(train_batch_size=20), Sampler())


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_blocks_compile_as_one_graph_for_every_length(family):
    """compile_blocks relies on each block tracing whole: a graph break (as a symbolic `is_causal` once caused on
    ChatGLM2) silently falls back to eager and made LoRA steps twice as slow on the GPU."""
    import torch._dynamo
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_gpu
    bench_gpu.FAMILY, bench_gpu.TINY = family, True
    try:
        config = bench_gpu.official_config()
        model = bench_gpu.build_model(config, torch.float32).train()
        batches = bench_gpu.make_batches(bench_gpu.load_profile(), config, 2)
    finally:
        bench_gpu.FAMILY, bench_gpu.TINY = "chatglm", False
    torch._dynamo.reset()
    for block in model.transformer.encoder.layers if family == "chatglm2" else model.transformer.layers:
        block.compile(backend="eager", fullgraph=True, dynamic=True)  # fullgraph: a graph break raises
    for b in batches:
        model(input_ids=b["input_ids"], labels=b["labels"], loss_only=True).loss.backward()


@pytest.mark.parametrize("preset", [None, ":4096:8"])
def test_training_runs_take_a_small_cublas_workspace_unless_the_user_chose_one(monkeypatch, preset):
    import finetuning_lora
    import training
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    with pytest.raises(SystemExit):  # --help: the setting comes before the arguments are read
        training.main(finetuning_lora.LoRA(), ["--help"])
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (preset or ":4096:1")


@pytest.mark.parametrize("options, preset, expected", [
    ({"quantization_bit": 4}, None, "expandable_segments:True"),
    ({"quantization": "nf4"}, None, "expandable_segments:True"),
    ({}, None, None),  # a bf16 base keeps PyTorch's default
    ({"quantization_bit": 4}, "max_split_size_mb:128", "max_split_size_mb:128"),  # the user's value wins
])
def test_quantized_bases_get_growing_allocator_segments(tiny_model_dir, monkeypatch, options, preset, expected):
    from training_options import choose_allocator
    if preset is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset)
    choose_allocator(argparse.Namespace(**{"quantization_bit": None, "quantization": None,
                                           "model_dir": tiny_model_dir, **options}))
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected


@pytest.mark.parametrize("device, options, expected", [
    ("cuda", {"quantization_bit": 4}, "mlp+attention"),
    ("cuda", {"quantization": "nf4", "pack_rows": False}, "mlp"),  # nothing packed: no packed attention
    ("cuda", {}, None),  # a bf16 base keeps everything (the fastest step)
    ("cpu", {"quantization_bit": 4}, None),
    ("cuda", {"quantization_bit": 4, "gradient_checkpointing": "none"}, None),  # the user's choice wins
    ("cuda", {"quantization_bit": 8, "gradient_checkpointing": "blocks"}, "blocks"),
])
def test_quantized_bases_recompute_mlps_and_attention_by_default_on_a_gpu(tiny_model_dir, device, options, expected):
    """The small cards' default: INT4 LoRA at 5.5 GiB within 1.5x of bf16 (H200, bench/results/README.md)."""
    from training_options import resolve_gradient_checkpointing
    run = argparse.Namespace(**{"quantization_bit": None, "quantization": None, "model_dir": tiny_model_dir,
                                "pack_rows": True, "gradient_checkpointing": None, **options})
    assert resolve_gradient_checkpointing(run, torch.device(device)) == expected
