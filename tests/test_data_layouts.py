"""The ChatGLM2 and ChatGLM3 token layouts, ChatGLM3's multi-turn rows, and their truncation and errors."""
import json

import pytest

from data_set import DataError, Seq2SeqDataset, encode_prompt, read_rows
from model_family import CHATGLM2, CHATGLM3, load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(family_model_dirs):
    return {name: load_tokenizer(folder) for name, folder in family_model_dirs.items()}


def write_rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def quiet(*args):
    pass


def test_chatglm2_layout_gmask_sop_source_answer_eos(tokenizers, tmp_path):
    tok = tokenizers["chatglm2"]
    path = write_rows(tmp_path, [{"text": "发动机异响", "answer": "发动机_部件故障_异响"}])
    example = Seq2SeqDataset(path, tok, CHATGLM2, 64, 32, "抽取：", log=quiet)[0]
    source = tok.encode("抽取：", add_special_tokens=False) + tok.encode("发动机异响", add_special_tokens=False)
    answer = tok.encode("发动机_部件故障_异响", add_special_tokens=False)
    prefix = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    assert example["input_ids"] == prefix + source + answer + [tok.eos_token_id]
    assert example["labels"] == [-100] * (2 + len(source)) + answer + [tok.eos_token_id]
    # what the official tokenizer's pair encoding gives, and what generation continues
    assert example["input_ids"] == tok.build_inputs_with_special_tokens(source, answer)
    assert encode_prompt(tok, CHATGLM2, read_rows(path, "抽取：")[0], 32) == prefix + source


def test_chatglm3_layout_is_the_chat_turn_with_the_answer_as_assistant(tokenizers, tmp_path):
    tok = tokenizers["chatglm3"]
    path = write_rows(tmp_path, [{"text": "发动机异响", "answer": "发动机_部件故障_异响"}])
    example = Seq2SeqDataset(path, tok, CHATGLM3, 64, 32, "抽取：", log=quiet)[0]
    source = tok.encode("抽取：", add_special_tokens=False) + tok.encode("发动机异响", add_special_tokens=False)
    answer = tok.encode("发动机_部件故障_异响", add_special_tokens=False)
    newline = tok.sp.EncodeAsIds("\n")
    user, assistant = tok.get_command("<|user|>"), tok.get_command("<|assistant|>")
    prompt = [tok.get_command("[gMASK]"), tok.get_command("sop"), user] + newline + source + [assistant]
    assert example["input_ids"] == prompt + newline + answer + [tok.eos_token_id]
    # learned: what follows the <|assistant|> token (its metadata line, the answer, eos), as the official demo
    assert example["labels"] == [-100] * len(prompt) + newline + answer + [tok.eos_token_id]
    assert encode_prompt(tok, CHATGLM3, read_rows(path, "抽取：")[0], 32) == prompt


def test_chatglm3_multi_turn_learns_only_assistant_turns(tokenizers, tmp_path):
    tok = tokenizers["chatglm3"]
    turns = [{"role": "system", "content": "你是汽车维修助手"}, {"role": "user", "content": "大灯不亮"},
             {"role": "assistant", "content": "大灯_部件故障_不亮"}, {"role": "user", "content": "水泵呢"},
             {"role": "assistant", "content": "水泵_部件故障_漏水"}]
    path = write_rows(tmp_path, [{"conversations": turns}])
    example = Seq2SeqDataset(path, tok, CHATGLM3, 256, 32, "ignored for conversations", log=quiet)[0]
    ids, labels = example["input_ids"], example["labels"]
    expected = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    for t in turns:
        expected += tok.build_single_message(t["role"], "", t["content"])
    assert ids == expected + [tok.eos_token_id]
    learned = tok.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert "大灯_部件故障_不亮" in learned and "水泵_部件故障_漏水" in learned
    assert "大灯不亮" not in learned and "水泵呢" not in learned and "维修助手" not in learned
    # the token after each answer (the next <|user|>, the final eos) is learned: the model learns to stop
    assert labels[-1] == tok.eos_token_id
    second_user = [i for i, t in enumerate(ids) if t == tok.get_command("<|user|>")][1]
    assert labels[second_user] == ids[second_user]
    assert all(labels[i] == -100 for i, t in enumerate(ids) if t == tok.get_command("<|assistant|>"))
    # prediction continues the turns before the last answer, which is the reference
    row = read_rows(path)[0]
    assert row.answers == ["水泵_部件故障_漏水"] and row.text == "水泵呢"
    prompt = encode_prompt(tok, CHATGLM3, row, 256)
    assert prompt == expected[:len(prompt) - 1] + [tok.get_command("<|assistant|>")]
    assert tok.decode(prompt).endswith("水泵呢<|assistant|>")


def test_long_conversation_prompts_drop_the_oldest_turns_but_keep_the_system_turn(tokenizers, tmp_path):
    tok = tokenizers["chatglm3"]
    turns = [{"role": "system", "content": "系统"}]
    for i in range(6):
        turns += [{"role": "user", "content": f"问题{i}" * 5}, {"role": "assistant", "content": f"回答{i}" * 5}]
    path = write_rows(tmp_path, [{"conversations": turns}])
    prompt = encode_prompt(tok, CHATGLM3, read_rows(path)[0], 60)
    text = tok.decode(prompt)
    assert len(prompt) <= 60 and "系统" in text and "问题5" in text and "问题0" not in text


def test_conversations_cut_at_max_len_and_rows_without_a_learnable_token(tokenizers, tmp_path):
    tok = tokenizers["chatglm3"]
    digits = "".join(str(i) for i in range(60))  # one token per digit
    long_question = {"conversations": [{"role": "user", "content": digits},
                                       {"role": "assistant", "content": "异响"}]}
    ok = {"conversations": [{"role": "user", "content": "大灯"}, {"role": "assistant", "content": digits}]}
    path = write_rows(tmp_path, [ok, long_question])
    with pytest.raises(DataError, match=r"rows.jsonl:2: no assistant token within --max_len 48"):
        Seq2SeqDataset(path, tok, CHATGLM3, 48, 20, log=quiet)
    messages = []
    data = Seq2SeqDataset(path, tok, CHATGLM3, 48, 20, skip_bad=True, log=messages.append)
    assert len(data) == 1 and len(data[0]["input_ids"]) == 48 and data.truncated == 1
    assert any("skipped 1" in m for m in messages)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_conversation_rows_need_a_chat_family(tokenizers, tmp_path, family):
    from model_family import FAMILIES
    path = write_rows(tmp_path, [{"text": "a", "answer": "b"},
                                 {"conversations": [{"role": "user", "content": "大灯"},
                                                    {"role": "assistant", "content": "不亮"}]}])
    with pytest.raises(DataError, match=rf"rows.jsonl:2: a conversation row needs a chat model \(ChatGLM3, GLM-4\); "
                                        rf"the {family} family has no chat layout"):
        Seq2SeqDataset(path, tokenizers[family], FAMILIES[family], 64, 32, log=quiet)


@pytest.mark.parametrize("conversation, message", [
    ([], "'conversations' must be a non-empty list"),
    ([{"role": "user", "content": "大灯"}], "conversation without an assistant turn"),
    ([{"role": "bot", "content": "x"}], "conversation turn 1: expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "conversation turn 2: expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "empty answer"),
])
def test_bad_conversation_rows_name_file_and_line(tmp_path, conversation, message):
    path = write_rows(tmp_path, [{"conversations": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"}]},
                                 {"conversations": conversation}])
    with pytest.raises(DataError, match=rf"rows.jsonl:2: {message}"):
        read_rows(path)


def test_chatglm3_answer_drops_the_metadata_line():
    assert CHATGLM3.answer_text("\n 大灯_部件故障_不亮") == "大灯_部件故障_不亮"
    assert CHATGLM3.answer_text("大灯_部件故障_不亮") == "大灯_部件故障_不亮"  # no metadata line: kept whole
    assert CHATGLM3.answer_text("tool_call\n{}") == "tool_call\n{}"  # real metadata (a tool call) is kept


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_padding_up_to_a_multiple_leaves_the_loss_unchanged(family_model_dirs, tokenizers, tmp_path, family):
    import torch

    from data_set import PadToLongest
    from model_family import FAMILIES, load_model
    path = write_rows(tmp_path, [{"text": "发动机异响", "answer": "发动机_部件故障_异响"},
                                 {"text": "大灯不亮，水泵漏水", "answer": "大灯_部件故障_不亮"}])
    rows = list(Seq2SeqDataset(path, tokenizers[family], FAMILIES[family], 64, 32, "抽取：", log=quiet))
    model = load_model(family_model_dirs[family]).eval()
    pad_id = tokenizers[family].pad_token_id
    tight, padded = PadToLongest(pad_id)(rows), PadToLongest(pad_id, multiple=32)(rows)
    assert padded["input_ids"].shape[1] == 32 > tight["input_ids"].shape[1]
    with torch.no_grad():
        losses = [model(**b, loss_only=True).loss.item() for b in (tight, padded)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
