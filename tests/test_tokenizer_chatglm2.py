"""ChatGLM2/3 tokenizer: the official id layout and a lossless round trip on all data."""
import glob
import os

import pytest

from conftest import ROOT, SHARED
from test_tokenizer import strings_in
from tokenization_chatglm import train_sentencepiece_model
from tokenization_chatglm2 import ChatGLMTokenizer


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    texts = list(strings_in(sorted(glob.glob(os.path.join(ROOT, "data", "*.jsonl")))))
    return train_sentencepiece_model(texts, str(tmp_path_factory.mktemp("glm2") / "tokenizer.model"), 3000,
                                     chatglm6b_pieces=False)


@pytest.mark.parametrize("roles", [False, True])
def test_special_ids_follow_the_sentencepiece_vocabulary(model_file, roles):
    tokenizer = ChatGLMTokenizer(model_file, role_tokens=roles)
    n = tokenizer.sp.GetPieceSize()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + \
        (["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"] if roles else [])
    assert [tokenizer.get_command(name) for name in names] == list(range(n, n + len(names)))
    assert tokenizer.vocab_size == n + len(names)
    assert tokenizer.pad_token_id == tokenizer.sp.unk_id() == 0 and tokenizer.eos_token_id == tokenizer.sp.eos_id()


def test_prompt_and_pair_layout(model_file):
    tokenizer = ChatGLMTokenizer(model_file)
    a = tokenizer.encode("发动机异响", add_special_tokens=False)
    b = tokenizer.encode("发动机_部件故障_异响", add_special_tokens=False)
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert tokenizer.encode("发动机异响") == prefix + a
    assert tokenizer.build_inputs_with_special_tokens(a, b) == prefix + a + b + [tokenizer.eos_token_id]
    assert tokenizer.decode(prefix + a, skip_special_tokens=True) == "发动机异响"


def test_chatglm3_message_layout(model_file):
    tokenizer = ChatGLMTokenizer(model_file, role_tokens=True)
    message = tokenizer.build_single_message("user", "", "大灯不亮")
    assert message[0] == tokenizer.get_command("<|user|>")
    assert message[1:] == tokenizer.sp.EncodeAsIds("\n") + tokenizer.sp.EncodeAsIds("大灯不亮")
    with pytest.raises(ValueError, match="role tokens are ChatGLM3's"):
        ChatGLMTokenizer(model_file).build_single_message("user", "", "x")


@pytest.mark.parametrize("roles", [False, True])
def test_text_never_encodes_to_a_special_token(model_file, roles):
    # the official tokenizers run plain text through SentencePiece only: "eop" in "people", "sop" in "isopropyl"
    # and a role or mask token typed in a message stay text
    tokenizer = ChatGLMTokenizer(model_file, role_tokens=roles)
    text = "people isopropyl [gMASK] <|user|> sop eop"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == tokenizer.sp.EncodeAsIds(text) and max(ids) < tokenizer.sp.GetPieceSize()
    assert tokenizer.decode(ids) == text


def test_round_trip_on_every_row_of_data_and_shared_data(model_file):
    tokenizer = ChatGLMTokenizer(model_file, role_tokens=True)
    files = sorted(glob.glob(os.path.join(ROOT, "data", "*.jsonl"))) + \
        sorted(glob.glob(os.path.join(SHARED, "data", "*", "*.jsonl")))
    texts = set(strings_in(files)) | {"tabs\t\tand\nnew\n\nlines", "x" + " " * 100 + "y", " leading", "🚗"}  # distinct
    assert [t for t in texts if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) != t] == []


def test_save_and_reload(model_file, tmp_path):
    tokenizer = ChatGLMTokenizer(model_file, role_tokens=True)
    tokenizer.save_pretrained(tmp_path)
    again = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert again.role_tokens and again.encode("水泵漏水") == tokenizer.encode("水泵漏水")
