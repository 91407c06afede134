"""transformers' own GLM classes (GlmForCausalLM: glm-4-9b-chat-hf; Glm4ForCausalLM: GLM-4-0414): recognised from
the folder, our training path's loss equals transformers' plain forward (padded and packed), the layouts equal the
tokenizer's chat template, and what the suite's own model files alone can do is refused in one line. Training every
method through the launcher: tests/test_families.py."""
import pytest
import torch

from conftest import launch

NATIVE = ["glm4-hf", "glm4-0414"]
ROWS = [("发动机异响，怠速抖动", "发动机_部件故障_异响"), ("大灯不亮", "大灯_部件故障_不亮"),
        ("水泵漏水严重需要更换", "水泵_部件故障_漏水")]


def training_rows(folder):
    from model_family import family_for, load_tokenizer
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    rows = []
    for text, answer in ROWS:
        ids, labels = family.build_training_ids(tokenizer, tokenizer.encode(text, add_special_tokens=False),
                                                tokenizer.encode(answer, add_special_tokens=False))
        rows.append({"input_ids": ids, "labels": labels})
    return family, tokenizer, rows


@pytest.mark.parametrize("family_name", NATIVE)
def test_training_loss_equals_transformers_forward_padded_and_packed(family_model_dirs, family_name):
    import transformers

    from data_set import PackRows, PadToLongest
    from model_family import load_model
    folder = family_model_dirs[family_name]
    family, tokenizer, rows = training_rows(folder)
    model = load_model(folder, dtype=torch.float32).train()
    assert isinstance(model, model.transformers_class) and \
        model.transformers_class is getattr(transformers, {"glm4-hf": "GlmForCausalLM"}.get(family_name,
                                                                                            "Glm4ForCausalLM"))
    padded = PadToLongest(tokenizer.pad_token_id)(rows)
    packed = PackRows(tokenizer.pad_token_id, family.packed_row_inputs, model.config, 8)(rows)
    # transformers' own forward and loss, each row alone: the reference
    losses, counts = [], []
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        losses.append(model.transformers_class.forward(model, input_ids=ids, labels=labels).loss)
        counts.append((labels[:, 1:] != -100).sum())
    reference = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    grads = {}
    for name, batch in (("reference", None), ("padded", padded), ("packed", packed)):
        model.zero_grad()
        loss = reference if batch is None else \
            model(**{k: v for k, v in batch.items() if k != "num_tokens"}, loss_only=True).loss
        loss.backward()
        grads[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert packed["input_ids"].shape[0] == 1  # one sequence: the rows attend only to themselves, or this fails
    for name in ("padded", "packed"):
        assert grads[name][0] == pytest.approx(grads["reference"][0], abs=1e-5)
        for got, expected in zip(grads[name][1], grads["reference"][1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family_name", NATIVE)
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


@pytest.mark.parametrize("script, args, message", [
    ("finetuning_pt.py", [], "P-Tuning's prefix encoder is part of our model files"),
    ("finetuning_lora.py", ["--compile"], "--compile: compiling transformer blocks is set up for our model files"),
    ("finetuning_lora.py", ["--gradient_checkpointing", "mlp"], "--gradient_checkpointing mlp recomputes our model "
                                                                "files' MLPs only"),
])
def test_what_only_our_model_files_do_is_refused_in_one_line(family_model_dirs, few_rows, tmp_path, script, args,
                                                             message):
    result = launch(script, "--model_dir", family_model_dirs["glm4-0414"], "--train_path", few_rows,
                    "--output_dir", tmp_path / "out", *args, launcher=False, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_thudm_quantization_is_refused_on_a_transformers_class(family_model_dirs):
    from model_family import ModelFolderError, load_model
    with pytest.raises(ModelFolderError, match="glm4-hf: THUDM's INT8/INT4 format"):
        load_model(family_model_dirs["glm4-hf"], quantization_bit=4)


@pytest.mark.parametrize("family_name", NATIVE)
def test_bitsandbytes_quantizes_every_block_linear_of_a_transformers_class(family_model_dirs, family_name):
    import bitsandbytes as bnb

    from model_family import load_model
    model = load_model(family_model_dirs[family_name], bnb_quantization="nf4")
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 6 * model.config.num_hidden_layers  # q, k, v, o, gate_up, down
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
