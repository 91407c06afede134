"""The tokenizer gives ChatGLM-6B's id layout and round-trips every row of our data and the shared data sets."""
import glob
import json
import os

import pytest

from conftest import ROOT, SHARED
from model_family import load_tokenizer
from tokenization_chatglm import ChatGLMTokenizer, encode_layout


def strings_in(files):
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line in f:
                for value in json.loads(line).values():
                    yield from (value if isinstance(value, list) else [value])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_special_token_ids_are_the_ones_the_config_names(tokenizer, tiny_model_dir):
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        config = json.load(f)
    assert tokenizer.convert_tokens_to_ids("[gMASK]") == config["gmask_token_id"]
    assert tokenizer.convert_tokens_to_ids("[MASK]") == config["mask_token_id"]
    assert tokenizer.convert_tokens_to_ids("<sop>") == config["bos_token_id"] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<eop>") == config["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.vocab_size == config["vocab_size"]


def test_image_token_offset_and_layout_pieces(tokenizer):
    assert tokenizer.num_image_tokens == 20000
    assert min(tokenizer.encode("发动机 异响", add_special_tokens=False)) >= 20000
    tokens = tokenizer.tokenize("a\tb\nc" + " " * 5 + "d" + " " * 90 + "e")
    assert "<|tab|>" in tokens and "<n>" in tokens and "<|blank_5|>" in tokens
    assert "<|blank_80|>" in tokens and "<|blank_10|>" in tokens  # a run of 90 spaces is 80 + 10
    assert tokenizer.convert_ids_to_tokens(5) == "<image_5>"
    assert tokenizer.decode([5, 6] + tokenizer.encode("发动机", add_special_tokens=False)) == "发动机"


def test_prompt_and_pair_layout(tokenizer):
    source = tokenizer.encode("发动机异响", add_special_tokens=False)
    answer = tokenizer.encode("发动机_部件故障_异响", add_special_tokens=False)
    g, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer.encode("发动机异响") == source + [g, sop]
    assert tokenizer.build_inputs_with_special_tokens(source, answer) == source + [g, sop] + answer + [eop]
    # what generation returns after <sop> decodes to the answer text
    assert tokenizer.decode(answer + [eop], skip_special_tokens=True) == "发动机_部件故障_异响"


def test_left_padding_by_default(tokenizer):
    batch = tokenizer(["发动机异响", "大灯不亮，同时水泵漏水"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0


ODD_TEXTS = ["", " leading space", "trailing  ", "tabs\t\tand\nnew\n\nlines", "数字123456和English words",
             "全角：（）《》、。", "x" + " " * 200 + "y", "emoji 🚗 and rare 龘"]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_of_odd_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_round_trip_on_every_row_of_data(tokenizer):
    texts = list(strings_in(sorted(glob.glob(os.path.join(ROOT, "data", "*.jsonl")))))
    assert len(texts) > 1000
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_round_trip_on_every_row_of_shared_data(tokenizer):
    files = sorted(glob.glob(os.path.join(SHARED, "data", "*", "*.jsonl")))
    if not files:
        pytest.skip("../shared/data is not beside this checkout")
    texts = set(strings_in(files))  # each distinct string once: 6,818 of 12,516 (~12 s of CI)
    bad = [t for t in texts if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) != t]
    assert bad == []


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = ChatGLMTokenizer.from_pretrained(tmp_path)
    text = "用万用表检测电压\n结果正常"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.num_image_tokens == tokenizer.num_image_tokens


def test_layout_encoding_is_what_the_vocabulary_expects():
    assert encode_layout("a\n\tb   c") == "a<n><|tab|>b<|blank_3|>c"


def test_a_file_that_is_not_sentencepiece_is_named(tmp_path):
    bad = tmp_path / "ice_text.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="ice_text.model: not a SentencePiece model"):
        ChatGLMTokenizer(str(bad))
