"""Reading rows, the token layout, truncation, padding and the sampler."""
import json

import pytest

from data_set import DataError, EpochSampler, PadToLongest, Seq2SeqDataset, read_rows
from model_family import CHATGLM6B, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_layout_and_labels(tokenizer, tmp_path):
    path = write(tmp_path, "a.jsonl", json.dumps({"text": "发动机异响", "answer": "发动机_部件故障_异响"}) + "\n")
    example = Seq2SeqDataset(path, tokenizer, CHATGLM6B, 64, 32, "抽取：", log=lambda *a: None)[0]
    prompt = tokenizer.encode("抽取：", add_special_tokens=False)
    text = tokenizer.encode("发动机异响", add_special_tokens=False)
    answer = tokenizer.encode("发动机_部件故障_异响", add_special_tokens=False)
    g, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    assert example["input_ids"] == prompt + text + [g, sop] + answer + [eop]
    context = len(prompt + text) + 1
    assert example["labels"] == [-100] * context + [sop] + answer + [eop]


def test_instruction_rows_and_json_arrays(tokenizer, tmp_path):
    rows = [{"instruction": "生成问题：", "input": "水泵漏水", "output": "水泵为什么漏水？"},
            {"instruction": "判断：", "output": ["1", "1"]}]
    path = write(tmp_path, "a.json", json.dumps(rows, ensure_ascii=False))
    parsed = read_rows(path, prompt_text="ignored")
    assert [(r.prompt, r.text, r.answers) for r in parsed] == [("生成问题：", "水泵漏水", ["水泵为什么漏水？"]),
                                                              ("判断：", "", ["1", "1"])]


def test_truncation_as_the_reference_and_counted(tokenizer, tmp_path):
    rows = [{"text": "发动机" * 50, "answer": "异响" * 50}, {"text": "大灯不亮", "answer": "大灯_部件故障_不亮"}]
    path = write(tmp_path, "a.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    messages = []
    data = Seq2SeqDataset(path, tokenizer, CHATGLM6B, 40, 20, "抽取：", log=messages.append)
    assert data.truncated == 1 and "1 truncated" in messages[0]
    long = data[0]
    context = long["labels"].count(-100)
    assert context - 1 == 20  # prompt + text cut to max_src_len, then [gMASK]
    assert len(long["input_ids"]) == 40  # the answer cut to max_len - max_src_len - 3


def test_batches_pad_to_their_own_longest_row():
    batch = PadToLongest(pad_token_id=3)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                          {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "answer": "b"}\nnot json\n', "x.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n', "x.jsonl:1: row without 'answer'"),
    ('{"instruction": "a", "input": "b"}\n', "x.jsonl:1: instruction row without 'output'"),
    ('{"text": "a", "answer": "  "}\n', "x.jsonl:1: empty answer"),
    ('{"foo": 1}\n', "x.jsonl:1: row has neither text/answer nor instruction/input/output"),
    ("\n\n", "x.jsonl: empty file"),
    ('[1, 2]', "x.jsonl: element 1: expected a JSON object"),  # a JSON array: its element, not a line
])
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read_rows(write(tmp_path, "x.jsonl", content))


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"text": "a", "answer": "b"}\nbad\n{"text": "c"}\n')
    messages = []
    rows = read_rows(path, skip_bad=True, log=messages.append)
    assert len(rows) == 1 and "skipped 2 bad row(s): 1 x not valid JSON" in messages[0]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_sampler_is_a_function_of_seed_and_epoch_and_splits_ranks():
    lengths = list(range(100))
    a, b = EpochSampler(lengths, 2, seed=1), EpochSampler(lengths, 2, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    ranks = [EpochSampler(lengths, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(list(ranks[0]) + list(ranks[1])) == lengths


def test_grouping_by_length_makes_batches_of_similar_rows():
    import random
    lengths = [random.Random(i).randrange(10, 500) for i in range(400)]
    grouped = list(EpochSampler(lengths, 4, seed=0, group_by_length=True))
    plain = list(EpochSampler(lengths, 4, seed=0))

    def padding(order):
        return sum(4 * max(lengths[j] for j in order[i:i + 4]) - sum(lengths[j] for j in order[i:i + 4])
                   for i in range(0, len(order), 4))
    assert sorted(grouped) == sorted(plain) == list(range(400))
    assert padding(grouped) < padding(plain) / 5


def test_a_prompt_longer_than_max_src_len_is_an_error(tokenizer, tmp_path):
    path = write(tmp_path, "a.jsonl", json.dumps({"text": "发动机异响", "answer": "x"}) + "\n")
    with pytest.raises(DataError, match="a.jsonl:1: the prompt alone is .* tokens, leaving no room"):
        Seq2SeqDataset(path, tokenizer, CHATGLM6B, 64, 8, "很长的提示" * 10, log=lambda *a: None)


def test_batches_pad_up_to_a_multiple_when_asked():
    batch = PadToLongest(pad_token_id=3, multiple=4)([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, 9, -100, -100, -100]]


def test_ranks_get_the_one_rank_global_batches_with_balanced_token_counts():
    """Two ranks of 2 rows see, step by step, the rows one rank of 4 sees; the longest rows are split between them."""
    import random
    lengths = [random.Random(i).randrange(10, 700) for i in range(400)]
    one = list(EpochSampler(lengths, 4, seed=3))
    ranks = [list(EpochSampler(lengths, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    spread, unbalanced = 0, 0
    for step in range(100):
        mine = [ranks[r][2 * step:2 * step + 2] for r in range(2)]
        assert sorted(mine[0] + mine[1]) == sorted(one[4 * step:4 * step + 4])
        totals = [sum(lengths[j] for j in rows) for rows in mine]
        spread += abs(totals[0] - totals[1])
        naive = [sum(lengths[j] for j in one[4 * step + r:4 * step + 4:2]) for r in range(2)]  # rows dealt in turn
        unbalanced += abs(naive[0] - naive[1])
    assert spread < unbalanced / 1.8  # about halved: a + d against b + c is the best split of four rows
