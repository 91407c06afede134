"""GLM-4-9B in THUDM's layout: our ChatGLM2/3 model file with rope_ratio computes what THUDM's own glm-4-9b-chat code
computes (official.json) and what transformers' GlmForCausalLM (the port THUDM publishes as glm-4-9b-chat-hf)
computes (golden.json); the tiktoken tokenizer splits text as THUDM's ChatGLM4Tokenizer and transformers' conversion
of the same file do; the family is recognised from the folder."""
import json
import os

import pytest
import torch

from conftest import FIXTURES
from modeling_chatglm2 import ChatGLMForConditionalGeneration

FIXTURE = os.path.join(FIXTURES, "glm4", "base")


def load_fixture(**config_overrides):
    with open(os.path.join(FIXTURE, "golden.json")) as f:
        golden = json.load(f)
    model = ChatGLMForConditionalGeneration.from_pretrained(FIXTURE, dtype=torch.float32, **config_overrides).eval()
    return golden, model


def batch_logits_and_loss(model, golden):
    ids, mask = torch.tensor(golden["input_ids"]), torch.tensor(golden["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor(golden["labels"]))
        fast = model(input_ids=ids, attention_mask=mask, labels=torch.tensor(golden["labels"]), loss_only=True)
    assert abs(fast.loss.item() - out.loss.item()) <= 1e-6  # the training path's fused loss
    return out.logits, out.loss.item(), mask.bool()


def test_matches_transformers_glm_logits_loss_and_greedy_tokens():
    golden, model = load_fixture()
    logits, loss, real = batch_logits_and_loss(model, golden)
    expected = torch.load(os.path.join(FIXTURE, "logits.pt"))
    assert (logits - expected).abs()[real].max().item() <= 1e-4
    assert abs(loss - golden["loss"]) <= 1e-5
    generated = model.generate(torch.tensor([golden["generate_prompt"]]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None)
    assert generated[0].tolist() == golden["generate_output"]


def test_matches_thudm_official_glm4_code():
    """official.json / official_logits.pt: THUDM's glm-4-9b-chat modeling_chatglm.py run on the same folder and batch
    (tools/make_glm4_fixtures.py --official_code)."""
    golden, model = load_fixture()
    with open(os.path.join(FIXTURE, "official.json")) as f:
        official = json.load(f)
    logits, loss, real = batch_logits_and_loss(model, golden)
    assert (logits - torch.load(os.path.join(FIXTURE, "official_logits.pt"))).abs()[real].max().item() <= 1e-4
    assert abs(loss - official["loss"]) <= 1e-5
    assert logits.argmax(-1)[real].tolist() == torch.tensor(official["argmax"])[real].tolist()
    generated = model.generate(torch.tensor([golden["generate_prompt"]]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None)
    assert generated[0].tolist() == official["generate_output"]


def test_tokenizer_equals_thudm_official_tokenizer():
    """The ids THUDM's ChatGLM4Tokenizer gave every data string on this folder's tokenizer.model (a digest of all
    of them, and the edge cases in full)."""
    from model_family import load_tokenizer
    from tools.make_glm4_fixtures import fixture_texts, ids_digest
    with open(os.path.join(FIXTURE, "official.json")) as f:
        official = json.load(f)
    tokenizer, texts = load_tokenizer(FIXTURE), fixture_texts()
    assert len(texts) == official["texts"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert ids[-5:] == official["edge_text_ids"]
    assert ids_digest(ids) == official["text_ids_sha256"]
    assert tokenizer.encode(texts[0]) == official["with_special_tokens"]


def test_the_fixture_tells_rope_ratio_apart():
    """GLM-4's one change to ChatGLM3's model is the rotary base (10000 x rope_ratio 500): with ChatGLM3's base the
    same weights give other logits, so the comparison above checks it."""
    golden, model = load_fixture(rope_ratio=1.0)
    logits, _, real = batch_logits_and_loss(model, golden)
    assert (logits - torch.load(os.path.join(FIXTURE, "logits.pt"))).abs()[real].max().item() > 1e-2


def data_texts():
    from tools.make_glm4_fixtures import fixture_texts
    return fixture_texts()


def test_tokenizer_splits_text_as_transformers_conversion_of_the_same_file(family_model_dirs):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from model_family import load_tokenizer
    from tokenization_glm4 import SPLIT_PATTERN
    folder = family_model_dirs["glm4"]
    ours = load_tokenizer(folder)
    reference = TikTokenConverter(vocab_file=os.path.join(folder, "tokenizer.model"), pattern=SPLIT_PATTERN).converted()
    texts = data_texts()
    mismatched = [t for t in texts if ours.encode(t, add_special_tokens=False) != reference.encode(t).ids]
    assert not mismatched, mismatched[:3]
    assert all(ours.decode(ours.encode(t, add_special_tokens=False)) == t for t in texts)


def test_tokenizer_special_tokens_and_chat_template(family_model_dirs):
    from chat import chat_prompt_ids
    from model_family import family_for, load_tokenizer
    folder = family_model_dirs["glm4"]
    tokenizer, family = load_tokenizer(folder), family_for(folder)
    assert family.name == "glm4"
    bpe_size = tokenizer.vocab_size - 14
    assert [tokenizer.get_command(n) for n in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>")] == \
        [bpe_size, bpe_size + 2, bpe_size + 4, bpe_size + 7, bpe_size + 8]
    # as with THUDM's tokenizer (special tokens are added tokens), a special token's text in a message is the token
    assert tokenizer.encode("a<|user|>b", add_special_tokens=False)[1] == tokenizer.get_command("<|user|>")
    assert tokenizer.encode("油耗高")[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("<sop>")]
    history = [("发动机异响", "检查皮带"), ("大灯不亮", "换灯泡")]
    messages = [{"role": "system", "content": "你是汽修助手"}] + \
        [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))] + \
        [{"role": "user", "content": "油耗高"}]
    official = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat_prompt_ids(tokenizer, family, history, "油耗高", system="你是汽修助手") == official


def test_a_malformed_tokenizer_file_names_its_line(tmp_path):
    from tokenization_glm4 import read_bpe_ranks
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nnot-base64 1\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2: "):
        read_bpe_ranks(str(path))


def test_glm4_training_layout_ends_with_the_user_token(family_model_dirs):
    """THUDM's GLM-4 fine-tuning: `[gMASK]<sop><|user|>\\n text <|assistant|>\\n answer <|user|>`, the loss on what
    follows `<|assistant|>` (the newline, the answer, the closing <|user|>)."""
    from model_family import family_for, load_tokenizer
    folder = family_model_dirs["glm4"]
    tokenizer, family = load_tokenizer(folder), family_for(folder)
    text, answer = tokenizer.encode("发动机", add_special_tokens=False), tokenizer.encode("异响", add_special_tokens=False)
    input_ids, labels = family.build_training_ids(tokenizer, text, answer)
    command = tokenizer.get_command
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert input_ids == [command("[gMASK]"), command("<sop>"), command("<|user|>")] + newline + text + \
        [command("<|assistant|>")] + newline + answer + [command("<|user|>")]
    learned = len(newline) + len(answer) + 1
    assert labels == [-100] * (len(input_ids) - learned) + input_ids[-learned:]
