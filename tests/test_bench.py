"""The benchmark script runs (a tiny model on the CPU) and counts FLOPs as its docstring says."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_gpu  # noqa: E402


def test_one_training_variant_runs_and_reports(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "bench/bench_gpu.py", "--variant", "lora", "--tiny", "--steps", "1",
                             "--warmup", "1", "--no_compile"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["method"] == "lora" and row["ms_per_step"] > 0 and row["real_tokens_per_s"] > 0


def test_flops_of_a_step():
    config = bench_gpu.official_config()
    h, layers, vocab = config.hidden_size, config.num_layers, config.vocab_size
    labels = torch.full((2, 100), -100)
    labels[:, 60:100] = 7
    batch = {"input_ids": torch.full((2, 100), 20100), "labels": labels, "real_tokens": 200}
    attention = 2 * 4 * 100 * 100 * h
    forward = layers * (2 * 12 * h * h * 200 + attention) + 2 * 2 * 40 * h * vocab
    lora = bench_gpu.train_flops(batch, config, "lora", 5)
    # LoRA: forward, then activation gradients through every layer (attention backward twice its forward)
    assert lora == forward + 2 * 2 * 40 * h * vocab + layers * (2 * 12 * h * h * 200 + 2 * attention)
    freeze = bench_gpu.train_flops(batch, config, "freeze", 5)
    assert forward < freeze < lora
    # roughly 4 x 6.2e9 FLOP per token for LoRA, as the brief estimates (attention and the head on top)
    assert 3.5 * 5.6e9 * 200 < lora < 5 * 6.2e9 * 200


def test_markdown_table_has_ratios_against_the_reference_config():
    report = {"date": "2026-01-01", "prediction": [], "training": [
        {"method": "lora", "reference_config": True, "gradient_checkpointing": False, "ms_per_step": 100.0,
         "real_tokens_per_s": 1, "min_for_5_epochs": 1, "peak_gib": 1, "mfu": 0.1, "gpu": "X"},
        {"method": "lora", "reference_config": False, "gradient_checkpointing": False, "ms_per_step": 25.0,
         "real_tokens_per_s": 1, "min_for_5_epochs": 1, "peak_gib": 1, "mfu": 0.4, "gpu": "X"}]}
    table = bench_gpu.markdown_table(report)
    assert "on X" in table and "| 4.0x |" in table


def test_chatglm2_size_variant_runs_and_counts_its_own_layer_weights(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "bench/bench_gpu.py", "--variant", "pt2", "--tiny", "--steps", "1",
                             "--warmup", "1", "--no_compile", "--family", "chatglm2", "--bucket", "64", "--pack_rows"],
                            cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["family"] == "chatglm2" and row["bucket"] == 64 and row["pack_rows"] and row["ms_per_step"] > 0
    bench_gpu.FAMILY = "chatglm2"
    try:
        config = bench_gpu.official_config()
    finally:
        bench_gpu.FAMILY = "chatglm"
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size, config.vocab_size) == (28, 4096, 13696, 65024)
    # q 4096 + k, v 2 x 2 groups x 128, dense 4096 x 4096, SwiGLU 3 x 4096 x 13696: about 6.2e9 with embeddings
    assert bench_gpu.layer_weights(config) == 4096 * (4096 + 512) + 4096 * 4096 + 3 * 4096 * 13696
    assert 6.1e9 < 28 * bench_gpu.layer_weights(config) + 2 * 65024 * 4096 < 6.3e9


def test_glm4_rows_are_laid_out_as_the_glm4_family_trains(monkeypatch):
    monkeypatch.setattr(bench_gpu, "FAMILY", "glm4")
    config = bench_gpu.official_config()
    assert (config.num_layers, config.padded_vocab_size, config.rope_ratio) == (40, 151552, 500)
    ids, first_label = bench_gpu.random_row(config, 30, 8)
    ids = ids.tolist()
    g = bench_gpu.GLM4_IDS
    assert ids[:3] == [g["gmask"], g["sop"], g["user"]] and ids[-1] == g["user"]
    assert ids[first_label - 1] == g["assistant"]  # learned from the newline after <|assistant|> to the end


def test_quantized_table_names_each_base_and_compares_it_with_bf16():
    import bench_quantized
    row = dict(family="chatglm", method="lora", gradient_checkpointing=None, real_tokens_per_s=1, peak_gib=1.0, mfu=0.1)
    rows = [{**row, "quantization_bit": 0, "quantization": None, "ms_per_step": 30.0},
            {**row, "quantization_bit": 0, "quantization": "nf4", "ms_per_step": 45.0},
            {**row, "quantization_bit": 4, "quantization": None, "ms_per_step": 36.0},
            {**row, "quantization_bit": 4, "quantization": None, "ms_per_step": 42.0, "gradient_checkpointing": "mlp"}]
    lines = bench_quantized.table(rows, []).splitlines()
    assert "| NF4 (bitsandbytes) | none | 45.0 | 1.50 |" in lines[3] and "| INT4 | none | 36.0 | 1.20 |" in lines[4]
    assert "| INT4 | mlp | 42.0 | 1.40 |" in lines[5]  # against bf16 without checkpointing
    assert bench_quantized.base_options("nf4") == ["--quantization", "nf4"]
    assert bench_quantized.base_options("4") == ["--quantization_bit", "4"]


def test_memory_at_peak_finds_what_is_alive_at_the_highest_total():
    from memory_at_peak import BEFORE, DEFERRED, live_at_peak
    ours = [{"filename": os.path.join(ROOT, "modeling_chatglm.py"), "line": 12, "name": "forward"}]
    compiled = [{"filename": "/tmp/torchinductor_u/ab/cab.py", "line": 3, "name": "call"}] + ours
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": ours},
             {"action": "alloc", "addr": 2, "size": 300, "frames": compiled},
             {"action": "free_completed", "addr": 1, "size": 100},
             {"action": "free_completed", "addr": 9, "size": 50},  # allocated before recording began
             {"action": "alloc", "addr": 3, "size": 200, "frames": []},
             {"action": "free_completed", "addr": 3, "size": 200},
             {"action": "alloc", "addr": 4, "size": 10, "frames": ours}]
    peak, sites = live_at_peak(trace, before_bytes=1000, root=ROOT)
    assert peak == 1000 + 300 - 50 + 200  # after the third allocation
    assert sites == {BEFORE: [950, 0], "modeling_chatglm.py:12 forward [compiled]": [300, 1],
                     "outside the project: no Python frame (autograd's engine)": [200, 1]}
    trace.insert(2, {"action": "free_requested", "addr": 2, "size": 300})  # its reuse waits for another stream
    assert live_at_peak(trace, 1000, ROOT)[1][f"{DEFERRED}: modeling_chatglm.py:12 forward [compiled]"] == [300, 1]


def test_the_load_and_fault_script_finds_no_error_and_no_leaked_row(family_model_dirs, tmp_path):
    """bench/serve_load_faults.py, briefly: poison, hang-ups and over-long prompts beside greedy and sampled clients;
    it exits 1 on any unexpected outcome, a greedy answer unlike its alone answer, or a row left in use."""
    result = subprocess.run([sys.executable, "bench/serve_load_faults.py", "--model_dir", family_model_dirs["chatglm2"],
                             "--clients", "3", "--seconds", "4", "--max_tokens", "12", "--out", str(tmp_path / "t.md"),
                             "--serve_args", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "t.md").read_text()
    assert "| rows leaked (in use once the load ended) | 0 |" in table and "poison: 400" in table
