"""The model computes what the official ChatGLM-6B implementation computes, and runs the fast paths correctly."""
import json
import os

import pytest
import torch

from conftest import FIXTURES
from model_family import load_model, load_tokenizer
from modeling_chatglm import ChatGLMForConditionalGeneration

CASES = ["base", "tied", "prefix", "prefix_projection"]


def load_fixture(case):
    folder = os.path.join(FIXTURES, "chatglm6b", case)
    with open(os.path.join(folder, "golden.json")) as f:
        golden = json.load(f)
    model = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, golden, model


@pytest.mark.parametrize("case", CASES)
def test_matches_official_logits_loss_and_greedy_tokens(case):
    folder, golden, model = load_fixture(case)
    input_ids = torch.tensor(golden["input_ids"])
    labels = torch.tensor(golden["labels"])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    expected = torch.load(os.path.join(folder, "logits.pt"))
    not_padding = input_ids != model.config.pad_token_id
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs()[not_padding].max().item() <= 1e-4
    assert abs(out.loss.item() - golden["loss"]) <= 1e-5
    prompt = torch.tensor([golden["generate_prompt"]])
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert generated[0].tolist() == golden["generate_output"]


def test_tied_case_shares_lm_head_with_embeddings():
    _, _, model = load_fixture("tied")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    _, _, model = load_fixture("base")
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight


def test_loss_only_path_gives_the_same_loss():
    _, golden, model = load_fixture("prefix_projection")
    batch = dict(input_ids=torch.tensor(golden["input_ids"]), labels=torch.tensor(golden["labels"]))
    with torch.no_grad():
        full = model(**batch).loss
        fast = model(**batch, loss_only=True).loss
    assert abs(full.item() - fast.item()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_head_loss_equals_cross_entropy_and_its_gradient(dtype, monkeypatch):
    import modeling_chatglm
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).to(dtype).requires_grad_(False)
    hidden = torch.randn(300, 64, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = -100
    plain = torch.nn.functional.cross_entropy(head(hidden).float(), targets, ignore_index=-100)
    monkeypatch.setattr(modeling_chatglm, "LOSS_SLICE_LOGITS", 64 * 1000)  # 64 rows a slice: five slices
    sliced = modeling_chatglm.head_cross_entropy(head, hidden, targets)
    assert type(sliced.grad_fn).__name__ == "SlicedHeadLossBackward"
    assert abs(sliced.item() - plain.item()) <= 1e-6
    # 1: the same operations as autograd's; 0.37 (a gradient accumulation's 1 / steps): applied after the rounding
    # to bf16 instead of before it
    for scale, bf16_ulps in ((1.0, 1), (0.37, 4)):
        (plain_grad,) = torch.autograd.grad(plain, hidden, torch.tensor(scale), retain_graph=True)
        (sliced_grad,) = torch.autograd.grad(sliced, hidden, torch.tensor(scale), retain_graph=True)
        tolerance = 1e-9 if dtype == torch.float32 else bf16_ulps * 2 ** -8 * plain_grad.abs().max().item()
        assert (sliced_grad.float() - plain_grad.float()).abs().max().item() <= tolerance
    with torch.no_grad():  # evaluation: the loss alone
        assert abs(modeling_chatglm.head_cross_entropy(head, hidden, targets).item() - plain.item()) <= 1e-6
    head.weight.requires_grad_(True)  # a trained head (full fine-tuning) keeps autograd's path
    assert type(modeling_chatglm.head_cross_entropy(head, hidden, targets).grad_fn).__name__ != "SlicedHeadLossBackward"


def test_model_never_freezes_parameters():
    _, _, model = load_fixture("prefix")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("case", ["base", "prefix"])
def test_sdpa_and_eager_attention_agree(case):
    folder, golden, sdpa = load_fixture(case)
    eager = ChatGLMForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    ids = torch.tensor(golden["input_ids"])
    with torch.no_grad():
        assert torch.allclose(sdpa(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5)


PROMPT_MODES = {
    "plain": {},
    "prefix": dict(pre_seq_len=3),
    "prefix_projection": dict(pre_seq_len=3, prefix_projection=True),
    "embedding_only": dict(pre_seq_len=3, prompt_embedding_only=True),
}


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_batched_left_padded_generation_equals_one_row_at_a_time(untied_model_dir, mode):
    torch.manual_seed(0)
    model = load_model(untied_model_dir, **PROMPT_MODES[mode]).eval()
    tokenizer = load_tokenizer(untied_model_dir)
    texts = ["发动机异响", "刹车片磨损严重，同时水泵漏水，需进一步检查", "大灯不亮"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding is exercised
    batched = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None)
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        single = tokenizer(text, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert batched[i, width:].tolist() == alone[0, single["input_ids"].shape[1]:].tolist()


def test_embedding_only_prompt_keeps_logits_aligned_with_input(untied_model_dir):
    model = load_model(untied_model_dir, pre_seq_len=5, prompt_embedding_only=True).eval()
    assert model.transformer.prefix_encoder.embedding.weight.shape == (5, model.config.hidden_size)
    tokenizer = load_tokenizer(untied_model_dir)
    ids = tokenizer("发动机异响", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        cached = model(input_ids=ids, use_cache=True)
    assert logits.shape[:2] == ids.shape
    # the soft prompt tokens are in the cache, in front of the input
    assert cached.past_key_values.get_seq_length() == ids.shape[1] + 5


@pytest.mark.parametrize("how", ["blocks", "mlp"])
def test_gradient_checkpointing_with_frozen_embeddings_gives_the_same_gradients(untied_model_dir, how):
    model = load_model(untied_model_dir, pre_seq_len=3, prefix_projection=True)
    model.train()
    model.transformer.prefix_dropout.p = 0.0
    for name, p in model.named_parameters():
        p.requires_grad = "prefix_encoder" in name or "layers.1.attention.query_key_value" in name
    tokenizer = load_tokenizer(untied_model_dir)
    ids = tokenizer("发动机异响", "火花塞积碳", return_tensors="pt")["input_ids"]
    labels = ids.clone()

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_saved = grads(), saved_bytes(lambda: model(input_ids=ids, labels=labels).loss)
    model.gradient_checkpointing_enable() if how == "blocks" else model.recompute_mlp_enable()
    checkpointed, checkpointed_saved = grads(), saved_bytes(lambda: model(input_ids=ids, labels=labels).loss)
    assert checkpointed_saved < plain_saved
    if how == "mlp":  # each block's pre-activation (inner_hidden_size per token) is no longer kept
        per_token = model.config.num_layers * model.config.inner_hidden_size * 4  # float32
        assert plain_saved - checkpointed_saved >= ids.shape[1] * per_token
    assert plain.keys() == checkpointed.keys() and len(plain) == 7  # prefix encoder 5, qkv 2
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def saved_bytes(forward):
    """Bytes autograd keeps for the backward of `forward()` (parameters included once)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype):
    folder, golden, model = load_fixture("base")
    half = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    assert half.transformer.word_embeddings.weight.dtype == dtype
    ids = torch.tensor(golden["input_ids"])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        low = half(input_ids=ids).logits.float()
    assert (low - reference).abs().max().item() < 0.1
