"""Every method on ChatGLM2, ChatGLM3, GLM-4 (THUDM's layout) and GLM-4 in transformers' layout (glm-4-9b-chat-hf,
GLM-4-0414), then its predict script. THUDM's layouts run as `python finetuning_*.py` (one process, DeepSpeed set up
by the script itself: the launcher's two extra processes cost CI ~45 s over those runs and test nothing
family-specific; the launcher runs in test_finetuning, test_multi_rank, test_quantization); the transformers-layout
folders, the newest, through the `deepspeed` launcher as their users run them, INT4 LoRA included. Their full and
Freeze checkpoints are checked against transformers' own classes.

The family is read from the folder; nothing is passed to say which model it is. ChatGLM3 and GLM-4 also learn
multi-turn conversation rows (the loss on assistant turns only) and predict their last answer.
"""
import json
import os

import pytest
import torch

from conftest import CONVERSATION_FAMILIES, FAMILY_RUNS, TRANSFORMERS_LAYOUT, metrics_of, predict_in_process

# Each run costs ~15 s of start-up (CI's time), so the older families run what they add: ChatGLM3 Freeze, P-Tuning
# v2 and LoRA (embedding-only P-Tuning runs on GLM-4, the same model file), ChatGLM2 (ChatGLM3's model code, the
# plain layout) LoRA; every method on the transformers-layout folders. The runs: conftest.FAMILY_RUNS (trained once
# a session: tests/test_export.py exports them). Full fine-tuning of ChatGLM-6B: test_finetuning.py,
# test_multi_rank.py
RUNS = FAMILY_RUNS
PREDICT = {"freeze": "predict_freeze.py", "pt2": "predict_pt.py", "pt_embedding_only": "predict_pt.py",
           "lora": "predict_lora.py", "lora_int4": "predict_lora.py", "full": "predict_full.py"}
TRAINED_PREFIX = {"freeze": "transformer.encoder.layers.1.", "pt2": "transformer.prefix_encoder.",
                  "pt_embedding_only": "transformer.prefix_encoder."}
TRANSFORMERS_TRAINED_PREFIX = {"freeze": "model.layers.1.", "pt2": "model.prefix_encoder.",
                               "pt_embedding_only": "model.prefix_encoder."}
def read_metrics(out):
    return [r for r in metrics_of(out) if "loss" in r]


def predict(mode, out, rows, tmp_path):
    folder = tmp_path / f"pred-{mode}"
    predict_in_process(PREDICT.get(mode, "predict_lora.py"), "--model_dir", out, "--test_path", rows,
                       "--output_dir", folder, "--device", "cpu", "--batch_size", 4)
    with open(folder / "metrics.json") as f:
        metrics = json.load(f)
    with open(folder / "predictions.jsonl") as f:
        return metrics, [json.loads(line) for line in f]


@pytest.mark.parametrize("family, mode", RUNS)
def test_every_method_learns_and_predicts_on_the_family(trained_families, few_rows, tmp_path, family, mode):
    out, stdout = trained_families[family, mode]
    losses = [r["loss"] for r in read_metrics(out)]
    assert losses[-1] < 0.5 * losses[0]
    metrics, predictions = predict(mode, out, few_rows, tmp_path)
    assert metrics["rows"] == len(predictions) == 6
    if mode != "pt_embedding_only":  # a soft input prompt cannot hold six answers; the others learn them by heart
        assert losses[-1] < 0.05
        assert metrics["f1"] >= 0.9, predictions
    checkpoint = latest(out)
    tokenizer_file = "tokenizer.json" if family in TRANSFORMERS_LAYOUT else "tokenizer.model"
    assert os.path.isfile(os.path.join(checkpoint, tokenizer_file))  # the family's tokenizer travels with it
    prefix = (TRANSFORMERS_TRAINED_PREFIX if family in TRANSFORMERS_LAYOUT else TRAINED_PREFIX).get(mode)
    if prefix:
        from safetensors.torch import load_file
        names = load_file(os.path.join(checkpoint, "model.safetensors"))
        assert names and all(k.startswith(prefix) for k in names)


def latest(out):
    with open(os.path.join(out, "latest")) as f:
        return os.path.join(out, f.read().strip())


@pytest.mark.parametrize("family", TRANSFORMERS_LAYOUT)
@pytest.mark.parametrize("mode", ["full", "freeze"])
def test_saved_full_and_freeze_folders_load_with_transformers_class_and_give_our_logits(
        trained_families, family_model_dirs, family, mode):
    """A full checkpoint is a folder transformers' AutoModelForCausalLM loads as its own class; Freeze's trained
    layers go into transformers' class under their own names. Either gives the logits our predict model gives."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from model_family import load_model
    from prediction import load_partial_state
    checkpoint, base = latest(trained_families[family, mode][0]), family_model_dirs[family]
    if mode == "full":
        theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        ours = load_model(checkpoint)
    else:
        theirs = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        trained = load_file(os.path.join(checkpoint, "model.safetensors"))
        assert not theirs.load_state_dict(trained, strict=False).unexpected_keys
        ours = load_model(base)
        load_partial_state(ours, checkpoint)
    assert type(theirs).__module__.startswith("transformers.models.")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert (ours.eval()(input_ids=ids).logits - theirs.eval()(input_ids=ids).logits).abs().max() <= 1e-4
        assert (theirs(input_ids=ids).logits - AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(
            input_ids=ids).logits).abs().max() > 1e-3  # what was trained is in the comparison


@pytest.mark.parametrize("family", CONVERSATION_FAMILIES)
def test_chat_families_learn_conversations_and_predict_their_last_answer(trained_families, conversation_rows,
                                                                         tmp_path, family):
    out, _ = trained_families[family, "lora_conversations"]
    assert read_metrics(out)[-1]["loss"] < 0.05
    metrics, predictions = predict("lora_conversations", out, conversation_rows, tmp_path)
    assert metrics["f1"] >= 0.9, predictions
    assert len(predictions) == 3 and all(p["text"] and p["generated"] for p in predictions)
