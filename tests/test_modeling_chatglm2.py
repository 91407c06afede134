"""ChatGLM2/3: the model computes what the official implementation computes (fixtures), and its fast paths agree."""
import json
import os

import pytest
import torch

from conftest import FIXTURES
from configuration_chatglm2 import ChatGLMConfig
from modeling_chatglm2 import ChatGLMForConditionalGeneration

CASES = ["base", "prefix", "prefix_projection"]


def load_fixture(case, **kwargs):
    folder = os.path.join(FIXTURES, "chatglm2", case)
    with open(os.path.join(folder, "golden.json")) as f:
        golden = json.load(f)
    return folder, golden, ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("case", CASES)
def test_matches_official_logits_loss_and_greedy_tokens(case):
    folder, golden, model = load_fixture(case)
    input_ids, mask = torch.tensor(golden["input_ids"]), torch.tensor(golden["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, labels=torch.tensor(golden["labels"]))
        fast = model(input_ids=input_ids, attention_mask=mask, labels=torch.tensor(golden["labels"]), loss_only=True)
    expected = torch.load(os.path.join(folder, "logits.pt"))
    assert (out.logits - expected).abs()[mask.bool()].max().item() <= 1e-4
    assert abs(out.loss.item() - golden["loss"]) <= 1e-5 and abs(fast.loss.item() - golden["loss"]) <= 1e-5
    generated = model.generate(torch.tensor([golden["generate_prompt"]]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None)
    assert generated[0].tolist() == golden["generate_output"]


@pytest.mark.parametrize("case", ["base", "prefix"])
def test_sdpa_and_eager_agree(case):
    folder, golden, sdpa = load_fixture(case)
    _, _, eager = load_fixture(case, attn_implementation="eager")
    ids, mask = torch.tensor(golden["input_ids"]), torch.tensor(golden["attention_mask"])
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits
        b = eager(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = ChatGLMConfig(num_layers=2, padded_vocab_size=300, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                           num_attention_heads=4, multi_query_group_num=2, **overrides)
    model = ChatGLMForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger random weights, so that greedy decoding of a random model is informative
        for name, p in model.named_parameters():
            if p.ndim == 2 and "prefix" not in name:
                p.normal_(0.0, 1.0 if "embeddings" in name or "output_layer" in name else 0.2)
    return model


@pytest.mark.parametrize("overrides", [{}, {"pre_seq_len": 3}, {"pre_seq_len": 3, "prefix_projection": True},
                                       {"pre_seq_len": 3, "prompt_embedding_only": True}])
def test_batched_left_padded_generation_equals_one_row_at_a_time(overrides):
    model = tiny_model(**overrides)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert batched[i, width:].tolist() == alone[0, len(row):].tolist()


@pytest.mark.parametrize("how", ["blocks", "mlp"])
def test_gradient_checkpointing_with_frozen_embeddings_gives_the_same_gradients(how):
    model = tiny_model(pre_seq_len=3, prefix_projection=True).train()
    model.transformer.prefix_dropout.p = 0.0
    for name, p in model.named_parameters():
        p.requires_grad = "prefix_encoder" in name
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    plain = grads()
    model.gradient_checkpointing_enable() if how == "blocks" else model.recompute_mlp_enable()
    checkpointed = grads()
    assert len(plain) == 5 and all(plain[n].abs().sum() > 0 for n in plain)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_embedding_only_prompt_equals_those_embeddings_typed_as_tokens():
    """A soft prompt holding the embeddings of tokens t1..tn computes what the plain model computes on t1..tn + input."""
    base = tiny_model()
    soft = tiny_model(pre_seq_len=3, prompt_embedding_only=True)
    soft.load_state_dict(base.state_dict(), strict=False)
    prompt_tokens = torch.tensor([21, 22, 23])
    with torch.no_grad():
        soft.transformer.prefix_encoder.embedding.weight.copy_(base.transformer.embedding.word_embeddings(prompt_tokens))
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        expected = base(input_ids=torch.cat([prompt_tokens[None], ids], dim=1)).logits[:, 3:]
        got = soft(input_ids=ids).logits
    assert got.shape == (1, 5, base.config.padded_vocab_size)
    assert torch.allclose(got, expected, atol=1e-5)
    generated = soft.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 5:]
    typed = base.generate(torch.cat([prompt_tokens[None], ids], dim=1), max_new_tokens=6, do_sample=False,
                          eos_token_id=None)[0, 8:]
    assert generated.tolist() == typed.tolist()
