"""Every method on ChatGLM2, ChatGLM3 and GLM-4 tiny folders (THUDM's layout, and transformers' GlmForCausalLM and
Glm4ForCausalLM), each training script run as `python finetuning_*.py` (one process, DeepSpeed set up by the script
itself: the launcher's two extra processes cost CI ~45 s over these 18 runs and test nothing family-specific; the
launcher runs in test_finetuning, test_multi_rank, test_quantization), then its predict script.

The family is read from the folder; nothing is passed to say which model it is. ChatGLM3 and GLM-4 also learn
multi-turn conversation rows (the loss on assistant turns only) and predict their last answer.
"""
import json
import os

import pytest

from conftest import MODES, launch_all, memorise_args, metrics_of, predict_in_process

# Every method on every GLM-4 family (issue 18); each run costs ~15 s of start-up (CI's time), so the older
# families run what they add: ChatGLM3 Freeze, P-Tuning v2 and LoRA (embedding-only P-Tuning runs on GLM-4,
# the same model file), ChatGLM2 (ChatGLM3's model code, the plain layout) LoRA. transformers' classes have no
# P-Tuning (tests/test_glm_native.py checks the refusal). Full fine-tuning of ChatGLM-6B: test_finetuning.py,
# test_multi_rank.py
RUNS = [("chatglm3", mode) for mode in ("freeze", "pt2", "lora")] + [("chatglm2", "lora")] + \
    [("glm4", mode) for mode in ("freeze", "pt2", "pt_embedding_only", "lora", "full")] + \
    [(family, mode) for family in ("glm4-hf", "glm4-0414") for mode in ("freeze", "lora", "full")]
PREDICT = {"freeze": "predict_freeze.py", "pt2": "predict_pt.py", "pt_embedding_only": "predict_pt.py",
           "lora": "predict_lora.py", "full": "predict_full.py"}
TRAINED_PREFIX = {"freeze": "transformer.encoder.layers.1.", "pt2": "transformer.prefix_encoder.",
                  "pt_embedding_only": "transformer.prefix_encoder."}
NATIVE = ("glm4-hf", "glm4-0414")  # transformers' classes: no P-Tuning (tests/test_glm_native.py)
CONVERSATION_FAMILIES = ("chatglm3", "glm4", "glm4-0414")


@pytest.fixture(scope="module")
def conversation_rows(few_rows, tmp_path_factory):
    """The six rows as three two-turn ChatGLM3 conversations (system prompt, two questions, two answers)."""
    with open(few_rows, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    chats = []
    for a, b in zip(rows[0::2], rows[1::2]):
        chats.append({"conversations": [
            {"role": "system", "content": "抽取三元组"}, {"role": "user", "content": a["text"]},
            {"role": "assistant", "content": a["answer"]}, {"role": "user", "content": b["text"]},
            {"role": "assistant", "content": b["answer"]}]})
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained_families(family_model_dirs, few_rows, conversation_rows, tmp_path_factory):
    runs = [(family, mode, few_rows, []) for family, mode in RUNS]
    runs += [(family, "lora_conversations", conversation_rows, ["--train_batch_size", 3])
             for family in CONVERSATION_FAMILIES]
    folders, launches = [], []
    for family, mode, rows, extra in runs:
        script, options = MODES[mode.replace("_conversations", "")]
        folders.append(str(tmp_path_factory.mktemp(f"{family}-{mode}")))
        launches.append((script, *memorise_args(family_model_dirs[family], rows, folders[-1], epochs=120),
                         *options, *extra))  # P-Tuning v2 too: on these folders it learns the rows by step 120
    results = launch_all(launches, launcher=False)
    return {(family, mode): (out, result.stdout) for (family, mode, _, _), out, result in zip(runs, folders, results)}


def read_metrics(out):
    return [r for r in metrics_of(out) if "loss" in r]


def predict(mode, out, rows, tmp_path):
    folder = tmp_path / f"pred-{mode}"
    predict_in_process(PREDICT[mode.replace("_conversations", "")], "--model_dir", out, "--test_path", rows,
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
    with open(os.path.join(out, "latest")) as f:
        checkpoint = os.path.join(out, f.read().strip())
    tokenizer_file = "tokenizer.json" if family in NATIVE else "tokenizer.model"
    assert os.path.isfile(os.path.join(checkpoint, tokenizer_file))  # the family's tokenizer travels with it
    prefix = {"freeze": "model.layers.1."}.get(mode) if family in NATIVE else TRAINED_PREFIX.get(mode)
    if prefix:
        from safetensors.torch import load_file
        names = load_file(os.path.join(checkpoint, "model.safetensors"))
        assert names and all(k.startswith(prefix) for k in names)


@pytest.mark.parametrize("family", CONVERSATION_FAMILIES)
def test_chat_families_learn_conversations_and_predict_their_last_answer(trained_families, conversation_rows,
                                                                         tmp_path, family):
    out, _ = trained_families[family, "lora_conversations"]
    assert read_metrics(out)[-1]["loss"] < 0.05
    metrics, predictions = predict("lora_conversations", out, conversation_rows, tmp_path)
    assert metrics["f1"] >= 0.9, predictions
    assert len(predictions) == 3 and all(p["text"] and p["generated"] for p in predictions)
