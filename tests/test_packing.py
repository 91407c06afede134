"""Packed rows (data_set.PackRows): one sequence per batch, each row attending to itself only, the same loss."""
import pytest
import torch

import modeling_chatglm
from data_set import PackRows, PadToLongest
from model_family import family_for, load_model
from modeling_chatglm import PackedRows, packed_rows_mask
from test_training_graphs import LONG, SHORT, rows_for

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a GPU")


def varlen_attention_by_hand(query, key, value, query_starts, key_starts, max_queries, max_keys, causal):
    """What flash attention's variable-length kernel computes, one sequence at a time (for the CPU tests)."""
    outputs = []
    for i in range(len(query_starts) - 1):
        q = query[query_starts[i]:query_starts[i + 1]]
        k, v = (t[key_starts[i]:key_starts[i + 1]] for t in (key, value))
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
        if causal:  # aligned at the bottom right: query j sees keys up to j + (keys - queries)
            seen = torch.ones(len(q), len(k), dtype=torch.bool).tril(len(k) - len(q))
            scores = scores.masked_fill(~seen, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1))  # a query that sees no key gets 0, as from the kernel
        outputs.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.cat(outputs)


@pytest.fixture
def flash_by_hand(monkeypatch):
    """The flash path of packed rows on the CPU, with the kernel computed by hand."""
    monkeypatch.setattr(modeling_chatglm, "flash_varlen_available", lambda tensor, head_dim: True)
    monkeypatch.setattr(modeling_chatglm, "flash_varlen", varlen_attention_by_hand)


def packed_and_padded(folder, rows, tokenizer, config, multiple=8):
    family = family_for(folder)
    packed = PackRows(tokenizer.pad_token_id, family.packed_row_inputs, config, multiple, with_label_positions=True)
    return packed(rows), PadToLongest(tokenizer.pad_token_id, multiple, with_label_positions=True)(rows)


@pytest.mark.parametrize("attention", ["mask", "flash_by_hand"])
@pytest.mark.parametrize("prompt", [{}, {"pre_seq_len": 3, "prefix_dropout": 0.0},
                                    {"pre_seq_len": 3, "prompt_embedding_only": True, "prefix_dropout": 0.0}])
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4-0414"])
def test_packed_rows_give_the_padded_batchs_loss_and_gradients(family_model_dirs, family, prompt, attention,
                                                                request):
    if attention == "flash_by_hand":
        request.getfixturevalue("flash_by_hand")
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


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "glm4-0414"])
def test_mlp_and_attention_recomputed_give_the_same_loss_and_gradients(family_model_dirs, family, flash_by_hand):
    folder = family_model_dirs[family]
    model = load_model(folder, dtype=torch.float32).train()
    rows, tokenizer = rows_for(folder, SHORT + LONG)
    packed, _ = packed_and_padded(folder, rows, tokenizer, model.config)
    results = []
    for recompute in (False, True):
        if recompute:
            model.recompute_mlp_enable(attention=True)
        model.zero_grad()
        loss = model(**packed, loss_only=True).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert model.base_model.recompute_packed_attention
    (loss, grads), (again, grads_again) = results
    torch.testing.assert_close(again, loss)
    for got, expected in zip(grads_again, grads):
        torch.testing.assert_close(got, expected)


def test_each_row_sees_only_itself_and_padding_nothing_real(family_model_dirs):
    folder = family_model_dirs["chatglm"]
    rows, tokenizer = rows_for(folder, SHORT)
    config = load_model(folder).config
    packed, _ = packed_and_padded(folder, rows, tokenizer, config, multiple=64)
    first, second = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    end = first + second
    gmask = rows[0]["input_ids"].index(tokenizer.gmask_token_id)
    context = [row["input_ids"].index(tokenizer.bos_token_id) for row in rows]  # the tokens before <sop>
    assert packed["packed_rows"].tolist() == [[first, context[0]], [64 - first, context[1]]]  # padding: last row
    mask = packed_rows_mask(packed["packed_rows"], 64, prefix_keys=0)[0, 0]
    assert not mask[:first, first:].any() and not mask[first:end, :first].any() and not mask[:end, end:].any()
    # ChatGLM-6B's context is seen both ways: the first token sees the row's [gMASK]; the answer is causal
    assert gmask > 0 and mask[0, gmask] and not mask[gmask + 1, gmask + 2] and mask[gmask + 2, gmask + 1]
    assert packed["position_ids"].shape == (1, 2, 64) and packed["position_ids"][0, 0, first] == 0  # row 2 from 0


def test_each_packed_row_gets_slots_for_its_own_soft_prompt(family_model_dirs):
    folder = family_model_dirs["chatglm"]
    model = load_model(folder, pre_seq_len=3, prompt_embedding_only=True)
    rows, tokenizer = rows_for(folder, SHORT)
    packed, _ = packed_and_padded(folder, rows, tokenizer, model.config, multiple=64)
    first = 3 + len(rows[0]["input_ids"])
    context = [row["input_ids"].index(tokenizer.bos_token_id) for row in rows]
    assert packed["packed_rows"].tolist() == [[first, 3 + context[0]], [64 - first, 3 + context[1]]]
    assert packed["input_ids"][0, 3:first].tolist() == rows[0]["input_ids"]
    assert (packed["labels"][0, first:first + 3] == -100).all()
    # soft prompt positions 0, 1, 2 (block 0), then the row's own from 3, as the model gives a row alone
    assert packed["position_ids"][0, :, first:first + 4].tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]


METHOD_ARGS = {"finetuning_lora.py": ["--lora_r", 8, "--lora_dropout", 0, "--learning_rate", 5e-3],
               "finetuning_pt.py": ["--pre_seq_len", 4, "--prompt_embedding_only", "--prefix_dropout", 0,
                                    "--learning_rate", 5e-2]}


def method_args(script, model_dir, rows, out, *extra):
    from conftest import memorise_args
    args = memorise_args(model_dir, rows, out) + METHOD_ARGS[script]
    args[args.index("--num_train_epochs") + 1] = 3
    args[args.index("--train_batch_size") + 1] = 3  # two batches an epoch
    args[args.index("--log_steps") + 1] = 1
    return [script, *args, *extra]


@pytest.mark.parametrize("script, accelerator", [("finetuning_lora.py", "cpu"), ("finetuning_pt.py", "cpu")]
                         + [("finetuning_lora.py", "cuda"), ("finetuning_pt.py", "cuda")] * torch.cuda.is_available())
def test_training_with_packed_rows_logs_the_padded_losses(tiny_model_dir, few_rows, tmp_path, script, accelerator):
    """LoRA, and embedding-only P-Tuning (whose packed rows each get their own soft prompt)."""
    from conftest import launch_all, logged_losses
    extra = ["--no-compile", "--pad_to_multiple_of", 16] if accelerator == "cuda" else []  # + CUDA graphs there
    outs = {"packed": str(tmp_path / "packed"), "padded": str(tmp_path / "padded")}
    result, _ = launch_all([method_args(script, tiny_model_dir, few_rows, outs[name], f"--{prefix}pack_rows", *extra)
                            for name, prefix in (("packed", ""), ("padded", "no-"))], accelerator=accelerator)
    assert "batches: rows packed into one sequence" in result.stdout
    packed, padded = logged_losses(outs["packed"]), logged_losses(outs["padded"])
    assert len(packed) == 6 and (packed[-1] < packed[0] or "lora" not in script)  # a soft prompt learns slowly
    assert packed == pytest.approx(padded, rel=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("prefix_keys", [0, 3])
def test_packed_rows_index_the_kernel_as_the_mask_does(bidirectional, prefix_keys):
    """PackedRows with the kernel computed by hand equals attention under packed_rows_mask, a row without a
    bidirectional part and one that is all bidirectional included (values and gradients)."""
    torch.manual_seed(0)
    rows = torch.tensor([[5, 3], [1, 0], [4, 4], [6, 2]]) if bidirectional else torch.tensor([[5, 0], [1, 0], [10, 0]])
    width, heads, groups, dim = int(rows[:, 0].sum()), 4, 2, 8
    query = torch.randn(1, heads, width, dim, requires_grad=True)
    key, value = (torch.randn(1, groups, prefix_keys + width, dim, requires_grad=True) for _ in range(2))
    mask = packed_rows_mask(rows, width, prefix_keys)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_chatglm, "flash_varlen", varlen_attention_by_hand)
        got = PackedRows(rows, width, prefix_keys, bidirectional).attend(query, key, value)
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (query, key, value))
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * weights).sum(), (query, key, value))):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("bidirectional, prefix_keys", [(True, 0), (True, 3), (False, 3)])
def test_recomputed_packed_attention_keeps_only_its_inputs_and_gives_the_same_gradients(bidirectional, prefix_keys,
                                                                                       monkeypatch):
    """--gradient_checkpointing mlp+attention: the gathers and kernels run again in the backward."""
    monkeypatch.setattr(modeling_chatglm, "flash_varlen", varlen_attention_by_hand)
    torch.manual_seed(0)
    rows = torch.tensor([[5, 3], [1, 0], [4, 4], [6, 2]]) if bidirectional else torch.tensor([[5, 0], [1, 0], [10, 0]])
    width, heads, groups, dim = int(rows[:, 0].sum()), 4, 2, 8
    qkv = torch.randn(1, heads + 2 * groups, prefix_keys + width, dim, requires_grad=True)
    weights = torch.randn(1, heads, width, dim)
    results = {}
    for recompute in (False, True):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size() if t.is_floating_point() else 0)
            return t
        # the value is a view of a larger projection output, as in the model
        query, key, value = qkv[:, :heads, prefix_keys:], qkv[:, heads:heads + groups], qkv[:, heads + groups:]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = PackedRows(rows, width, prefix_keys, bidirectional, recompute).attend(query, key, value)
        results[recompute] = out, torch.autograd.grad((out * weights).sum(), qkv), sum(saved)
    (out, (grad,), _), (again, (grad_again,), kept) = results[False], results[True]
    torch.testing.assert_close(again, out)
    torch.testing.assert_close(grad_again, grad)
    inputs = (heads * width + 2 * groups * (prefix_keys + width)) * dim * 4  # query, key, value in float32
    assert kept == inputs  # nothing of the kernels' or the gathers' outputs


@GPU
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("prefix_keys", [0, 16])
def test_flash_attention_over_packed_rows_equals_the_masked_attention(bidirectional, prefix_keys, dtype, recompute):
    """recompute: --gradient_checkpointing mlp+attention runs the kernels again in the backward."""
    torch.manual_seed(0)
    lengths = [300, 17, 451, 0] if bidirectional else [300, 17, 451]
    rows = torch.tensor([[n, n * 2 // 3] if bidirectional else [n, 0] for n in lengths])
    rows[-1, 0] += 64 * 13 - int(rows[:, 0].sum())  # padding, as PackRows adds it
    width, heads, groups, dim = int(rows[:, 0].sum()), 32, 2, 128
    query = torch.randn(1, heads, width, dim, device="cuda", dtype=dtype, requires_grad=True)
    key, value = (torch.randn(1, groups, prefix_keys + width, dim, device="cuda", dtype=dtype, requires_grad=True)
                  for _ in range(2))
    rows = rows.cuda()
    got = PackedRows(rows, width, prefix_keys, bidirectional, recompute).attend(query, key, value)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(16, dim=1), value.float().repeat_interleave(16, dim=1),
        attn_mask=packed_rows_mask(rows, width, prefix_keys))
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weights.float()).sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=5e-2, rtol=5e-2)
