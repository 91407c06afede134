"""Packed rows (data_set.PackRows): one sequence per batch, each row attending to itself only, the same loss."""
import pytest
import torch

from data_set import PackRows, PadToLongest
from model_family import family_for, load_model
from test_training_graphs import LONG, SHORT, rows_for


def packed_and_padded(folder, rows, tokenizer, config, multiple=8):
    family = family_for(folder)
    packed = PackRows(tokenizer.pad_token_id, family.packed_row_inputs, config, multiple, with_label_positions=True)
    return packed(rows), PadToLongest(tokenizer.pad_token_id, multiple, with_label_positions=True)(rows)


@pytest.mark.parametrize("prompt", [{}, {"pre_seq_len": 3, "prefix_dropout": 0.0}])
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_packed_rows_give_the_padded_batchs_loss_and_gradients(family_model_dirs, family, prompt):
    folder = family_model_dirs[family]
    model = load_model(folder, dtype=torch.float32, **prompt).train()
    rows, tokenizer = rows_for(folder, SHORT + LONG)  # four rows of different lengths
    packed, padded = packed_and_padded(folder, rows, tokenizer, model.config)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] < padded["input_ids"].numel()
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch, loss_only=True).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss, grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    assert len(packed_grads) == len(grads)
    for got, expected in zip(packed_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_each_row_sees_only_itself_and_padding_only_itself(family_model_dirs):
    folder = family_model_dirs["chatglm"]
    rows, tokenizer = rows_for(folder, SHORT)
    config = load_model(folder).config
    packed, _ = packed_and_padded(folder, rows, tokenizer, config, multiple=64)
    mask, first = packed["attention_mask"][0, 0], len(rows[0]["input_ids"])
    end = first + len(rows[1]["input_ids"])
    assert not mask[:first, first:].any() and not mask[first:end, :first].any()
    assert mask[end:, end:].equal(torch.eye(64 - end, dtype=torch.bool))
    # ChatGLM-6B's context is seen both ways: the first token sees the row's [gMASK]; the answer is causal
    gmask = rows[0]["input_ids"].index(tokenizer.gmask_token_id)
    assert gmask > 0 and mask[0, gmask] and not mask[gmask + 1, gmask + 2] and mask[gmask + 2, gmask + 1]
    assert packed["position_ids"].shape == (1, 2, 64) and packed["position_ids"][0, 0, first] == 0  # row 2 from 0


def test_packing_refuses_soft_prompt_tokens(family_model_dirs):
    folder = family_model_dirs["chatglm"]
    model = load_model(folder, pre_seq_len=3, prompt_embedding_only=True)
    rows, tokenizer = rows_for(folder, SHORT)
    packed, _ = packed_and_padded(folder, rows, tokenizer, model.config)
    with pytest.raises(ValueError, match="soft prompt tokens"):
        model(**packed, loss_only=True)


def run_lora(model_dir, rows, out, *extra, accelerator="cpu"):
    import json
    import os
    from conftest import launch, memorise_args
    args = memorise_args(model_dir, rows, out) + ["--lora_r", 8, "--lora_dropout", 0, "--learning_rate", 5e-3]
    args[args.index("--num_train_epochs") + 1] = 3
    args[args.index("--train_batch_size") + 1] = 3  # two batches an epoch
    args[args.index("--log_steps") + 1] = 1
    result = launch("finetuning_lora.py", *args, *extra, accelerator=accelerator)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line], result


@pytest.mark.parametrize("accelerator", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_training_with_packed_rows_logs_the_padded_losses(tiny_model_dir, few_rows, tmp_path, accelerator):
    extra = ["--no-compile", "--pad_to_multiple_of", 16] if accelerator == "cuda" else []  # + CUDA graphs there
    packed, result = run_lora(tiny_model_dir, few_rows, str(tmp_path / "packed"), "--pack_rows", *extra,
                              accelerator=accelerator)
    assert "batches: rows packed into one sequence" in result.stdout
    padded, _ = run_lora(tiny_model_dir, few_rows, str(tmp_path / "padded"), "--no-pack_rows", *extra,
                         accelerator=accelerator)
    assert len(packed) == 6 and packed[-1] < packed[0]
    assert packed == pytest.approx(padded, rel=1e-4)


def test_asking_to_pack_soft_prompt_rows_is_a_clear_error(tiny_model_dir, tmp_path):
    from conftest import launch
    result = launch("finetuning_pt.py", "--model_dir", tiny_model_dir, "--output_dir", tmp_path, "--pre_seq_len", 4,
                    "--prompt_embedding_only", "--pack_rows", launcher=False, check=False)
    assert result.returncode != 0 and "error: --pack_rows cannot be used here" in result.stderr, result.stderr[-2000:]
