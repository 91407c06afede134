"""INT8 / INT4 bases: THUDM's quantization rules bit for bit, pre-quantized folders, gradients, and every method
trained on a quantized tiny base through the launcher.

The references below are written from the rules THUDM's quantization.py and quantization_kernels.c state (per-row
absmax / (2^(bits-1) - 1) in fp16, round, int8; INT4 packs column 2j into the high nibble and 2j+1 into the low one,
both read back as signed numbers; extraction is int x scale), element by element, independently of quantization.py.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MODES, launch, launch_all, memorise_args, metrics_of


def reference_quantize(weight_fp16, bits):
    """Row by row with Python numbers where the rule is about bits."""
    scale = weight_fp16.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)  # fp16 arithmetic, as the official code
    values = torch.round(weight_fp16 / scale[:, None]).to(torch.int8)
    if bits == 8:
        return values, scale
    rows = []
    for row in values.tolist():
        packed = [((row[2 * j] << 4) | (row[2 * j + 1] & 15)) & 0xFF for j in range(len(row) // 2)]
        rows.append([b - 256 if b > 127 else b for b in packed])  # the unsigned char read as int8
    return torch.tensor(rows, dtype=torch.int8), scale


def reference_extract_half(weight, scale, bits):
    """The extraction kernels: int x scale, as a half (one rounding of the exact product)."""
    out = []
    for row, s in zip(weight.tolist(), scale.float().tolist()):
        if bits == 4:
            values = []
            for byte in row:
                values += [byte >> 4, (((byte << 4) & 0xFF) ^ 0x80) - 0x80 >> 4]
        else:
            values = row
        out.append([v * s for v in values])
    return torch.tensor(out, dtype=torch.float64).half()


def quantized_layers(model):
    from quantization import QuantizedLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


THUDM_FORMAT_FAMILIES = ["chatglm", "chatglm2", "chatglm3", "glm4", "glm4-0414"]
LINEARS_PER_LAYER = {"glm4-0414": 6}  # q, k, v, o, gate_up, down; THUDM's layout 4 (qkv fused, dense, two MLP)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", THUDM_FORMAT_FAMILIES)
def test_quantized_weights_and_scales_equal_the_official_rules(family_model_dirs, family, bits):
    from model_family import load_model
    folder = family_model_dirs[family]
    float_model = load_model(folder)  # the folder's float32 weights: rounded to fp16 first, as model.half() does
    quantized = load_model(folder, quantization_bit=bits)
    layers = quantized_layers(quantized)
    assert len(layers) == LINEARS_PER_LAYER.get(family, 4) * float_model.config.num_layers
    float_state = float_model.state_dict()
    for name, layer in layers.items():
        weight, scale = reference_quantize(float_state[f"{name}.weight"].half(), bits)
        assert torch.equal(layer.weight, weight) and torch.equal(layer.weight_scale, scale), name
        assert layer.weight_scale.dtype == torch.float16 and layer.weight.dtype == torch.int8
        assert torch.equal(layer.dequantized_weight(torch.float16), reference_extract_half(weight, scale, bits))
    # embeddings, output layer and norms are not quantized
    assert all(".layers." in n for n in layers)


def test_int4_packing_round_trips_every_value():
    from quantization import pack_int4, unpack_int4
    values = torch.tensor([[a, b] for a in range(-8, 8) for b in range(-8, 8)], dtype=torch.int8).reshape(16, 32)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    assert pack_int4(torch.tensor([[-1, 2]], dtype=torch.int8)).item() == -14  # 0xF2: -1 high, 2 low


@pytest.fixture(scope="module")
def prequantized_dirs(family_model_dirs, tmp_path_factory):
    """tools/quantize_model.py's INT4 folder of each family."""
    folders = {family: str(tmp_path_factory.mktemp(f"{family}-int4") / "model") for family in THUDM_FORMAT_FAMILIES}
    launch_all([("tools/quantize_model.py", "--model_dir", family_model_dirs[family], "--quantization_bit", 4,
                 "--output_dir", out) for family, out in folders.items()], launcher=False)  # side by side
    return folders


@pytest.mark.parametrize("family", THUDM_FORMAT_FAMILIES)
def test_a_prequantized_folder_loads_as_quantizing_at_load_time(family_model_dirs, prequantized_dirs, family):
    from model_family import family_for, load_model, load_tokenizer
    folder = prequantized_dirs[family]
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["quantization_bit"] == 4
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert all(saved[k].dtype == torch.int8 for k in saved if k.endswith("weight") and f"{k}_scale" in saved)
    assert all(v.dtype == torch.float16 for k, v in saved.items() if k.endswith("weight_scale"))
    assert family_for(folder).name == family
    loaded = load_model(folder)
    on_the_fly = load_model(family_model_dirs[family], quantization_bit=4)
    loaded_state, fly_state = loaded.state_dict(), on_the_fly.state_dict()
    for name in quantized_layers(loaded):
        for key in (f"{name}.weight", f"{name}.weight_scale"):
            assert torch.equal(loaded_state[key], fly_state[key]), key
    ids = torch.tensor([load_tokenizer(folder).encode("发动机 异响", add_special_tokens=True)])
    on_the_fly.half().float()  # the rest of the pre-quantized folder is fp16: the same values, then the same logits
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, on_the_fly(input_ids=ids).logits)


def test_gradients_through_quantized_linears_equal_a_dequantized_float_reference(family_model_dirs):
    """P-Tuning's prompt and LoRA-like inputs below a quantized layer get the gradient of x @ W^T with W the
    dequantized weight (THUDM's W8A16 backward)."""
    from model_family import load_model
    from quantization import QuantizedLinear
    for family in ("chatglm", "chatglm2"):
        folder = family_model_dirs[family]
        quantized = load_model(folder, quantization_bit=4, pre_seq_len=4)
        reference = load_model(folder, pre_seq_len=4)
        state = quantized.state_dict()
        for name, layer in quantized_layers(quantized).items():
            float_layer = reference.get_submodule(name)
            float_layer.weight.data = layer.dequantized_weight(torch.float32)
        reference.transformer.prefix_encoder.load_state_dict(quantized.transformer.prefix_encoder.state_dict())
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        labels = ids.clone()
        if family == "chatglm":  # ChatGLM-6B needs its [gMASK] <sop> layout
            from model_family import load_tokenizer
            tok = load_tokenizer(folder)
            ids = torch.tensor([[5, 6, tok.gmask_token_id, tok.bos_token_id, 7, 8]])
            labels = torch.tensor([[-100, -100, -100, tok.bos_token_id, 7, 8]])
        grads = []
        for model in (quantized, reference):
            model.train()
            for n, p in model.named_parameters():
                p.requires_grad = "prefix_encoder" in n
            torch.manual_seed(0)
            model.transformer.prefix_dropout.p = 0.0
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            grads.append((loss.item(), model.transformer.prefix_encoder.embedding.weight.grad.clone()))
        assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
        assert grads[0][1].abs().sum() > 0
        assert all(not p.requires_grad for m in quantized.modules() if isinstance(m, QuantizedLinear)
                   for p in m.parameters())
        assert state  # the quantized model was used as built


def test_quantized_linear_keeps_its_fp16_scale_through_casts(tiny_model_dir):
    from model_family import load_model
    model = load_model(tiny_model_dir, quantization_bit=8, dtype=torch.bfloat16)
    layer = next(iter(quantized_layers(model).values()))
    scale = layer.weight_scale.clone()
    model.to(torch.float32)
    model.half()
    assert layer.weight_scale.dtype == torch.float16 and torch.equal(layer.weight_scale, scale)


# ---- bad input: one line each, nothing written ----------------------------------------------------------------

def test_bad_quantization_requests_are_one_line(tiny_model_dir, prequantized_dirs, tmp_path):
    result = launch("tools/quantize_model.py", "--model_dir", prequantized_dirs["chatglm"], "--quantization_bit", 8,
                    "--output_dir", tmp_path / "again", launcher=False, check=False)
    assert result.returncode != 0 and "already quantized to 4 bits" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "again").exists()
    result = launch("finetuning_lora.py", "--model_dir", tiny_model_dir, "--quantization_bit", 3,
                    "--output_dir", tmp_path / "out", launcher=False, check=False)
    assert result.returncode == 2 and "--quantization_bit: invalid choice: 3" in result.stderr
    result = launch("finetuning_lora.py", "--model_dir", prequantized_dirs["chatglm"], "--quantization_bit", 8,
                    "--output_dir", tmp_path / "out", "--train_path", "data/spo_train.jsonl", launcher=False,
                    check=False)
    assert "already quantized to 4 bits (its config.json); --quantization_bit 8 needs the float folder" in \
        result.stderr and "Traceback" not in result.stderr


def test_a_prequantized_folder_missing_a_scale_is_named(prequantized_dirs, tmp_path):
    import shutil

    from model_family import ModelFolderError, load_model
    folder = tmp_path / "broken"
    shutil.copytree(prequantized_dirs["chatglm2"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="missing.*layers.0.mlp.dense_4h_to_h.weight_scale"):
        load_model(str(folder))


# ---- every method on a quantized base, through the launcher ----------------------------------------------------

# two runs, side by side on the two cores, to keep CI short: LoRA over THUDM's INT4 layers (PEFT around them,
# predict without merging), with its MLPs recomputed (--gradient_checkpointing mlp: the 8 GB card's setting), and
# P-Tuning v2 over bitsandbytes' NF4 (QLoRA's format; it runs on the CPU too). Freeze's float layers and the
# gradients through both formats are checked in-process above and below.
QUANTIZED_RUNS = [("lora", 4), ("pt2", "nf4")]
RUN_OPTIONS = {("lora", 4): ["--gradient_checkpointing", "mlp"]}
PREDICT = {"freeze": "predict_freeze.py", "pt2": "predict_pt.py", "lora": "predict_lora.py"}


# a constant rate of 5e-3 left LoRA on INT4 a step away from its minimum once (training loss 3.5e-5, then 0.05 after
# the last step): the linear decay ends on small steps
@pytest.fixture(scope="module")
def trained_quantized(tiny_model_dir, few_rows, tmp_path_factory):
    outputs = {run: str(tmp_path_factory.mktemp(f"{run[0]}-{run[1]}")) for run in QUANTIZED_RUNS}
    launch_all([(MODES[mode][0], *memorise_args(tiny_model_dir, few_rows, outputs[mode, bits], epochs=300), *MODES[mode][1],
                 *quantization_options(bits), *RUN_OPTIONS.get((mode, bits), []), "--lr_scheduler", "linear")
                for mode, bits in QUANTIZED_RUNS])
    return outputs


def quantization_options(bits):
    return ["--quantization", bits] if bits == "nf4" else ["--quantization_bit", bits]


@pytest.mark.parametrize("mode, bits", QUANTIZED_RUNS)
def test_every_method_learns_on_a_quantized_base_and_predicts_on_it(trained_quantized, few_rows, tmp_path, mode,
                                                                   bits):
    out = trained_quantized[mode, bits]
    losses = [r["loss"] for r in metrics_of(out) if "loss" in r]
    assert losses[-1] < 0.05, losses
    with open(os.path.join(out, "latest")) as f:
        checkpoint = os.path.join(out, f.read().strip())
    with open(os.path.join(checkpoint, "training_args.json")) as f:  # predict quantizes the same way by default
        saved_args = json.load(f)
    assert saved_args["quantization" if bits == "nf4" else "quantization_bit"] == bits
    assert saved_args["gradient_checkpointing"] == ("mlp" if (mode, bits) in RUN_OPTIONS else None)
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors" if mode == "lora" else "model.safetensors"))
    assert all(v.is_floating_point() for v in saved.values())  # only what trained, in full precision
    result = launch(PREDICT[mode], "--model_dir", out, "--test_path", few_rows, "--output_dir", tmp_path,
                    "--device", "cpu", launcher=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["f1"] >= 0.9, result.stdout[-2000:]


def test_freezes_trained_layers_stay_float_on_a_quantized_base(tiny_model_dir):
    from model_family import load_model
    from quantization import QuantizedLinear
    model = load_model(tiny_model_dir, quantization_bit=8, keep_float=("transformer.layers.1.",))
    assert isinstance(model.transformer.layers[0].mlp.dense_4h_to_h, QuantizedLinear)
    assert type(model.transformer.layers[1].mlp.dense_4h_to_h) is torch.nn.Linear


def test_bitsandbytes_layers_replace_the_block_linears(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from model_family import load_model
    model = load_model(tiny_model_dir, bnb_quantization="nf4", keep_float=("layers.1.",))
    assert type(model.transformer.layers[0].attention.query_key_value) is bnb.nn.Linear4bit
    assert type(model.transformer.layers[1].attention.query_key_value) is torch.nn.Linear  # kept for Freeze


def test_quantization_without_bitsandbytes_is_one_line(tiny_model_dir, monkeypatch):
    import sys

    from model_family import ModelFolderError, load_model
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ModelFolderError, match="needs bitsandbytes: pip install bitsandbytes"):
        load_model(tiny_model_dir, bnb_quantization="nf4")


def test_a_model_without_block_linears_is_refused_by_name():
    from quantization import quantize_model
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = type("Config", (), {})()
    with pytest.raises(ValueError, match="--quantization_bit 4: no block linears found to quantize in Sequential"):
        quantize_model(model, 4)
