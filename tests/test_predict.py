"""Predict scripts: the trained tiny models predict the rows they learned; batching and merging change nothing."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, predict_in_process

PREDICT = {"freeze": "predict_freeze.py", "pt2": "predict_pt.py", "pt2_projection": "predict_pt.py",
           "pt_embedding_only": "predict_pt.py", "lora": "predict_lora.py", "full": "predict_full.py"}


def predict(mode, trained, rows, tmp_path, *extra, check=True):
    """The predict script's files (metrics, predictions); with check=False its process (exit code, output)."""
    out = tmp_path / f"{mode}-{len(list(tmp_path.iterdir()))}"
    argv = ["--model_dir", trained[mode], "--test_path", rows, "--output_dir", out, "--device", "cpu",
            "--batch_size", 4, *extra]
    if not check:
        return launch(PREDICT[mode], *argv, launcher=False, check=False)
    predict_in_process(PREDICT[mode], *argv)
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    with open(out / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    return metrics, predictions


@pytest.mark.parametrize("mode", ["freeze", "pt2", "pt2_projection", "lora", "full"])
def test_trained_model_predicts_the_rows_it_learned(trained, few_rows, tmp_path, mode):
    metrics, predictions = predict(mode, trained, few_rows, tmp_path)
    assert metrics["f1"] >= 0.9
    assert metrics["rows"] == len(predictions) == 6
    assert {"micro_precision", "micro_recall", "micro_f1", "seconds", "rows_per_s", "generated_tokens_per_s"} <= set(metrics)
    assert set(predictions[0]) == {"text", "reference", "generated", "score"}


def test_embedding_only_prompt_predicts_and_is_scored(trained, few_rows, tmp_path):
    metrics, predictions = predict("pt_embedding_only", trained, few_rows, tmp_path)
    assert 0.0 <= metrics["f1"] <= 1.0 and len(predictions) == 6


def test_batched_equals_one_row_at_a_time(trained, tmp_path):
    _, batched = predict("lora", trained, "data/spo_test.jsonl", tmp_path, "--max_new_tokens", 24,
                         "--batch_size", 16)
    _, single = predict("lora", trained, "data/spo_test.jsonl", tmp_path, "--max_new_tokens", 24,
                        "--batch_size", 1)
    assert [p["generated"] for p in batched] == [p["generated"] for p in single]
    assert any(p["generated"] for p in batched)


def test_merged_and_unmerged_lora_give_the_same_tokens(trained, few_rows, tmp_path):
    _, merged = predict("lora", trained, few_rows, tmp_path)
    _, separate = predict("lora", trained, few_rows, tmp_path, "--no_merge")
    assert [p["generated"] for p in merged] == [p["generated"] for p in separate]


def official_ptuning_folder(trained, tmp_path):
    """A checkpoint as THUDM's P-Tuning v2 recipe saves it: config.json and a pytorch_model.bin of the prefix."""
    with open(os.path.join(trained["pt2_projection"], "latest")) as f:
        ours = os.path.join(trained["pt2_projection"], f.read().strip())
    folder = tmp_path / "official-ptuning"
    folder.mkdir()
    shutil.copy(os.path.join(ours, "config.json"), folder / "config.json")
    torch.save(load_file(os.path.join(ours, "model.safetensors")), folder / "pytorch_model.bin")
    with open(os.path.join(ours, "training_args.json")) as f:
        base = json.load(f)["model_dir"]
    return str(folder), base


def test_predict_pt_loads_an_official_ptuning_checkpoint(trained, few_rows, tmp_path):
    folder, base = official_ptuning_folder(trained, tmp_path)
    _, ours = predict("pt2_projection", trained, few_rows, tmp_path)
    metrics, theirs = predict("pt2_projection", {"pt2_projection": folder}, few_rows, tmp_path,
                              "--ori_model_dir", base, "--prompt_text", "抽取：", "--max_len", 128, "--max_src_len", 100)
    assert [p["generated"] for p in theirs] == [p["generated"] for p in ours]


@pytest.mark.parametrize("option, message", [
    (["--pre_seq_len", 4], "--pre_seq_len 4 does not match the checkpoint"),
    (["--no-prefix_projection"], "--prefix_projection False does not match the checkpoint"),
])
def test_predict_pt_says_when_the_prompt_settings_do_not_match(trained, few_rows, tmp_path, option, message):
    result = predict("pt2_projection", trained, few_rows, tmp_path, *option, check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_checkpoint_is_named(tmp_path):
    result = launch("predict_lora.py", "--model_dir", tmp_path / "none", launcher=False, check=False)
    assert result.returncode != 0 and "none: checkpoint folder not found" in result.stderr


def test_an_interrupted_prediction_resumes_from_the_rows_it_wrote(trained, few_rows, tmp_path):
    _, expected = predict("lora", trained, few_rows, tmp_path)
    out = tmp_path / "resumed"
    out.mkdir()
    with open(few_rows, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    # row 2 was done (kept: here an empty answer, so that regenerating it would show), the next line was cut short
    (out / "predictions.partial.jsonl").write_text(
        json.dumps({"index": 2, "text": texts[2], "tokens": []}, ensure_ascii=False) + '\n{"index": 3, "te',
        encoding="utf-8")
    result = launch(PREDICT["lora"], "--model_dir", trained["lora"], "--test_path", few_rows, "--output_dir", out,
                    "--device", "cpu", "--batch_size", 4, "--resume", launcher=False)
    assert "--resume: 1 rows from" in result.stdout
    with open(out / "predictions.jsonl") as f:
        got = [json.loads(line)["generated"] for line in f]
    assert got[2] == "" and got[:2] + got[3:] == [p["generated"] for p in expected[:2] + expected[3:]]
    assert json.load(open(out / "metrics.json"))["generated_rows"] == 5
    assert not (out / "predictions.partial.jsonl").exists()


def test_resuming_against_other_test_rows_is_refused_with_the_line(trained, few_rows, tmp_path):
    (tmp_path / "predictions.partial.jsonl").write_text('{"index": 0, "text": "another row", "tokens": [5]}\n')
    result = launch(PREDICT["lora"], "--model_dir", trained["lora"], "--test_path", few_rows, "--output_dir", tmp_path,
                    "--device", "cpu", "--resume", launcher=False, check=False)
    assert result.returncode != 0
    assert "predictions.partial.jsonl:1: row 0 does not match the test file" in result.stderr
    assert (tmp_path / "predictions.partial.jsonl").exists()  # nothing already written is lost


def test_a_full_fine_tuning_checkpoint_is_a_base_for_the_other_predict_scripts(trained, few_rows, tmp_path):
    """The folder finetuning_full.py saves loads wherever a base model folder does (here under LoRA's adapters)."""
    with open(os.path.join(trained["full"], "latest")) as f:
        full = os.path.join(trained["full"], f.read().strip())
    metrics, predictions = predict("lora", trained, few_rows, tmp_path, "--ori_model_dir", full)
    assert metrics["base_model"] == full and metrics["rows"] == len(predictions) == 6
