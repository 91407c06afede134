"""GLM-4 in transformers' layout (glm-4-9b-chat-hf: `model_type` glm; GLM-4-0414: glm4) on our model file
(modeling_glm4.py): it computes what transformers' own GlmForCausalLM / Glm4ForCausalLM compute (fp32 logits, loss,
greedy tokens), with padding, packed rows, a LoRA adapter that plain PEFT on transformers' class loads, a P-Tuning v2
prefix (against transformers' class with the prefix in its cache, which is what a prefix is) and an INT4 base
(against its dequantized weights); the layouts follow the tokenizer's chat template; a folder of another GLM
architecture is refused in one line before anything loads. Training every method through the launcher:
tests/test_families.py."""
import json
import os
import shutil

import pytest
import torch

from conftest import launch

FAMILIES = ["glm4-hf", "glm4-0414"]
TRANSFORMERS_CLASS = {"glm4-hf": "GlmForCausalLM", "glm4-0414": "Glm4ForCausalLM"}
ROWS = [("发动机异响，怠速抖动", "发动机_部件故障_异响"), ("大灯不亮", "大灯_部件故障_不亮"),
        ("水泵漏水严重需要更换", "水泵_部件故障_漏水")]


def transformers_model(folder, family_name):
    import transformers
    return getattr(transformers, TRANSFORMERS_CLASS[family_name]).from_pretrained(folder, dtype=torch.float32).eval()


def prompt_batch(folder):
    """Three prompts of different lengths, left-padded, with the positions transformers' generate() gives them."""
    from model_family import family_for, load_tokenizer
    from decoding import left_pad
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    prompts = [family.build_prompt_ids(tokenizer, tokenizer.encode(text, add_special_tokens=False))
               for text, _ in ROWS]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def max_difference(ours, theirs, mask):
    return (ours - theirs).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("family_name", FAMILIES)
def test_logits_loss_and_greedy_tokens_equal_transformers_class(family_model_dirs, family_name):
    from decoding import greedy_decode
    from model_family import load_model
    folder = family_model_dirs[family_name]
    ours, theirs = load_model(folder).eval(), transformers_model(folder, family_name)
    assert type(ours).__module__ == "modeling_glm4" and type(ours).__name__ == TRANSFORMERS_CLASS[family_name]
    assert set(ours.state_dict()) == set(theirs.state_dict())  # transformers' names, nothing more
    ids, mask, positions = prompt_batch(folder)
    labels = torch.where(mask.bool(), ids, -100)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        reference = theirs(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    assert max_difference(out.logits, reference.logits, mask) <= 1e-4
    assert out.loss.item() == pytest.approx(reference.loss.item(), abs=1e-5)
    expected = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[:, ids.shape[1]:]
    assert greedy_decode(ours, ids, mask, 12, []).tolist() == expected.tolist()  # the static decoder
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, ids.shape[1]:].tolist() == expected.tolist()


def training_rows(folder):
    from model_family import family_for, load_tokenizer
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    rows = []
    for text, answer in ROWS:
        ids, labels = family.build_training_ids(tokenizer, tokenizer.encode(text, add_special_tokens=False),
                                                tokenizer.encode(answer, add_special_tokens=False))
        rows.append({"input_ids": ids, "labels": labels})
    return family, tokenizer, rows


@pytest.mark.parametrize("family_name", FAMILIES)
def test_training_loss_and_gradients_padded_and_packed_equal_transformers_rows(family_model_dirs, family_name):
    from data_set import PackRows, PadToLongest
    from model_family import load_model
    folder = family_model_dirs[family_name]
    family, tokenizer, rows = training_rows(folder)
    ours, theirs = load_model(folder).train(), transformers_model(folder, family_name).train()
    padded = PadToLongest(tokenizer.pad_token_id)(rows)
    packed = PackRows(tokenizer.pad_token_id, family.packed_row_inputs, ours.config, 8)(rows)
    assert packed["input_ids"].shape[0] == 1  # one sequence: the rows attend only to themselves, or this fails
    # transformers' own forward and loss, each row alone, token-weighted: the reference
    losses, counts = [], []
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        losses.append(theirs(input_ids=ids, labels=labels).loss)
        counts.append((labels[:, 1:] != -100).sum())
    reference = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    reference.backward()
    expected = {name: p.grad for name, p in theirs.named_parameters()}
    for batch in (padded, packed):
        ours.zero_grad()
        loss = ours(**{k: v for k, v in batch.items() if k != "num_tokens"}, loss_only=True).loss
        loss.backward()
        assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_a_lora_adapter_of_ours_loads_with_plain_peft_on_transformers_class(family_model_dirs, family_name,
                                                                             tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from model_family import family_for, load_model
    folder = family_model_dirs[family_name]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=family_for(folder).lora_target.split(","),
                        task_type="CAUSAL_LM")
    ours = get_peft_model(load_model(folder), config).eval()
    torch.manual_seed(0)
    for name, p in ours.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: an adapter that changes nothing would prove nothing
            torch.nn.init.normal_(p, std=0.5)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(transformers_model(folder, family_name), tmp_path / "adapter").eval()
    ids, mask, positions = prompt_batch(folder)
    with torch.no_grad():
        adapted = ours(input_ids=ids, attention_mask=mask).logits
        reference = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert max_difference(adapted, reference, mask) <= 1e-4
        base = transformers_model(folder, family_name)(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert max_difference(adapted, base.logits, mask) > 1e-2  # the adapter is in the comparison
        merged = ours.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    assert max_difference(merged, reference, mask) <= 1e-4


@pytest.mark.parametrize("family_name", FAMILIES)
def test_a_prefix_equals_transformers_class_with_the_prefix_in_its_cache(family_model_dirs, family_name):
    """P-Tuning v2's prefix is per-layer keys and values before the row's, with no rotary position and the row's
    positions counted from 0: transformers' class computes exactly that when they are in its cache."""
    from transformers import DynamicCache

    from model_family import load_model
    folder = family_model_dirs[family_name]
    ours = load_model(folder, pre_seq_len=4, prefix_dropout=0.0).eval()
    theirs = transformers_model(folder, family_name)
    ids, mask, positions = prompt_batch(folder)
    with torch.no_grad():
        prefix = ours.model.prefix_key_values(ids.shape[0], torch.float32)
        cache = DynamicCache(config=theirs.config)
        for layer, (key, value) in enumerate(prefix):
            cache.update(key, value, layer)
        reference = theirs(input_ids=ids, attention_mask=torch.cat([torch.ones(ids.shape[0], 4, dtype=mask.dtype),
                                                                    mask], 1),
                           position_ids=positions, past_key_values=cache).logits
        assert max_difference(ours(input_ids=ids, attention_mask=mask).logits, reference, mask) <= 1e-4
        plain = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert max_difference(reference, plain, mask) > 1e-2  # the prefix is in the comparison


@pytest.mark.parametrize("family_name", FAMILIES)
def test_an_int4_base_equals_transformers_class_on_its_dequantized_weights(family_model_dirs, family_name):
    from model_family import load_model
    from quantization import QuantizedLinear
    folder = family_model_dirs[family_name]
    ours = load_model(folder, quantization_bit=4).eval()
    quantized = {name for name, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 6 * ours.config.num_hidden_layers  # q, k, v, o, gate_up, down
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("weight_scale")}
    for name in quantized:
        state[f"{name}.weight"] = ours.get_submodule(name).dequantized_weight(torch.float32)
    theirs = transformers_model(folder, family_name)
    theirs.load_state_dict(state)
    ids, mask, positions = prompt_batch(folder)
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        reference = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert max_difference(logits, reference, mask) <= 1e-4


@pytest.mark.parametrize("family_name", FAMILIES)
def test_layouts_follow_the_tokenizers_chat_template(family_model_dirs, family_name):
    from model_family import family_for, load_tokenizer
    folder = family_model_dirs[family_name]
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    assert family.name == family_name
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    turns = [("system", "抽取三元组"), ("user", "发动机异响"), ("assistant", "发动机_部件故障_异响"), ("user", "大灯不亮")]
    official = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert family.build_conversation_prompt(tokenizer, [(r, encode(c)) for r, c in turns]) == official
    ids, labels = family.build_conversation_ids(tokenizer, [(r, encode(c)) for r, c in turns[:3]])
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|user|>")  # THUDM's "EOS for chat"
    learned = [t for t, label in zip(ids, labels) if label != -100]
    assert learned == encode("\n") + encode("发动机_部件故障_异响") + [ids[-1]]


@pytest.mark.parametrize("model_type, architecture, message", [
    ("glm4", "Glm4vForConditionalGeneration", "architecture Glm4vForConditionalGeneration is not served"),
    ("glm4v", "Glm4vForConditionalGeneration", "model_type 'glm4v' is not a model this suite serves"),
])
def test_another_glm_architecture_is_refused_in_one_line_before_any_weights_load(family_model_dirs, few_rows,
                                                                                 tmp_path, model_type, architecture,
                                                                                 message):
    folder = tmp_path / "glm-4.1v"
    shutil.copytree(family_model_dirs["glm4-0414"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type,
                                                    "architectures": [architecture]}))
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            (folder / name).write_bytes(b"not weights")  # were they read, loading would fail differently
    result = launch("finetuning_lora.py", "--model_dir", folder, "--train_path", few_rows, "--output_dir",
                    tmp_path / "out", launcher=False, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in errors[0] and "Glm4ForCausalLM" in errors[0] and "GlmForCausalLM" in errors[0]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_bitsandbytes_quantizes_every_block_linear(family_model_dirs, family_name):
    import bitsandbytes as bnb

    from model_family import load_model
    model = load_model(family_model_dirs[family_name], bnb_quantization="nf4")
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 6 * model.config.num_hidden_layers  # q, k, v, o, gate_up, down
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused GPU kernels (RMSNorm, flash attention)")
@pytest.mark.parametrize("family_name", FAMILIES)
def test_on_a_gpu_the_logits_equal_transformers_class_in_fp32_and_within_bf16_rounding(family_model_dirs,
                                                                                        family_name):
    from model_family import load_model
    folder = family_model_dirs[family_name]
    ids, mask, positions = (t.cuda() for t in prompt_batch(folder))
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.02)):
        ours = load_model(folder, dtype=dtype).cuda().eval()
        theirs = transformers_model(folder, family_name).to(device="cuda", dtype=dtype)
        with torch.no_grad():
            logits = ours(input_ids=ids, attention_mask=mask).logits.float()
            reference = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        scale = reference[mask.bool()].abs().max().item() if dtype == torch.bfloat16 else 1.0
        assert max_difference(logits, reference, mask) <= tolerance * scale, dtype


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_on_q_k_v_computed_together_equals_peft_forward_values_and_gradients(family_model_dirs, dropout):
    """modeling_glm4.lora_projections: the three adapters' work in fewer kernels, PEFT's numbers (eval mode, where
    dropout draws nothing); in training each adapter draws a mask of its own, as PEFT's three dropouts do."""
    from peft import LoraConfig, get_peft_model

    from model_family import load_model
    from modeling_glm4 import lora_projections, plain_lora_adapter
    model = get_peft_model(load_model(family_model_dirs["glm4-hf"]), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"],
        init_lora_weights=False))
    attention = model.base_model.model.model.layers[0].self_attn
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    assert plain_lora_adapter(layers) == "default"
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model.eval()
    results = []
    for together in (True, False):
        outputs = lora_projections(x, layers, "default") if together else [layer(x) for layer in layers]
        sum((o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outputs)).backward()
        results.append(([o.detach() for o in outputs], x.grad.clone(),
                        [p.grad.clone() for layer in layers for p in layer.parameters() if p.requires_grad]))
        x.grad = None
        model.zero_grad()
    for got, expected in zip(results[0][0] + [results[0][1]] + results[0][2],
                             results[1][0] + [results[1][1]] + results[1][2]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # the scaling comes before B, not after
    if dropout:  # k and v given the same adapter: equal updates in eval mode, different masks in training
        with torch.no_grad():
            for name in ("lora_A", "lora_B"):
                getattr(attention.v_proj, name)["default"].weight.copy_(getattr(attention.k_proj, name)["default"].weight)
        model.train()
        with torch.no_grad():
            x1 = torch.ones(1, 64, model.config.hidden_size)

            def updates():
                k, v = lora_projections(x1, layers, "default")[1:]
                return k - attention.k_proj.base_layer(x1), v - attention.v_proj.base_layer(x1)
            assert not torch.allclose(*updates())
            model.eval()
            torch.testing.assert_close(*updates())
    attention.k_proj.merge()  # a merged adapter: PEFT's own forward
    assert plain_lora_adapter(layers) is None
