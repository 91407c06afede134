"""chat.py: the official chat templates, the task layout, streaming, history and `clear` as a person types them."""
import json
import os
import sys

import pytest

from conftest import ROOT, launch

HISTORY = [("发动机异响", "检查皮带"), ("大灯不亮", "换灯泡"), ("刹车软", "排空气")]


def expected_chat_ids(tokenizer, family, history, query, system=None):
    """The official rules, written out: ChatGLM-6B's chat() text (the query alone without history, else rounds from
    0) then [gMASK] <sop>; ChatGLM2's build_prompt (rounds from 1) after [gMASK] sop; ChatGLM3's role messages."""
    if family == "chatglm":
        text = query if not history else "".join(
            "[Round %d]\n问：%s\n答：%s\n" % (i, q, r) for i, (q, r) in enumerate(history)) + \
            "[Round %d]\n问：%s\n答：" % (len(history), query)
        return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    if family == "chatglm2":
        text = "".join("[Round %d]\n\n问：%s\n\n答：%s\n\n" % (i + 1, q, r) for i, (q, r) in enumerate(history)) + \
            "[Round %d]\n\n问：%s\n\n答：" % (len(history) + 1, query)
        return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] + \
            tokenizer.encode(text, add_special_tokens=False)
    sp, command = tokenizer.sp.EncodeAsIds, tokenizer.get_command
    messages = ([("system", system)] if system else []) + \
        [m for q, r in history for m in (("user", q), ("assistant", r))] + [("user", query)]
    ids = [command("[gMASK]"), command("sop")]
    for role, content in messages:
        ids += [command(f"<|{role}|>")] + sp("\n") + sp(content)
    return ids + [command("<|assistant|>")]


@pytest.mark.parametrize("turns", [0, 1, 3])
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_chat_template_ids_equal_the_official_rules(family_model_dirs, family, turns):
    from chat import chat_prompt_ids
    from model_family import family_for, load_tokenizer
    folder = family_model_dirs[family]
    tokenizer = load_tokenizer(folder)
    got = chat_prompt_ids(tokenizer, family_for(folder), HISTORY[:turns], "油耗高")
    assert got == expected_chat_ids(tokenizer, family, HISTORY[:turns], "油耗高")
    if family == "chatglm3":
        got = chat_prompt_ids(tokenizer, family_for(folder), HISTORY[:turns], "油耗高", system="你是汽修助手")
        assert got == expected_chat_ids(tokenizer, family, HISTORY[:turns], "油耗高", system="你是汽修助手")


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_task_format_is_predicts_prompt(family_model_dirs, family):
    from chat import task_prompt_ids
    from data_set import Row, encode_prompt
    from model_family import family_for, load_tokenizer
    folder = family_model_dirs[family]
    tokenizer, model_family = load_tokenizer(folder), family_for(folder)
    for text in ("发动机异响，怠速抖动", "大灯"):
        assert task_prompt_ids(tokenizer, model_family, HISTORY, text, "抽取：", 100) == \
            encode_prompt(tokenizer, model_family, Row("抽取：", text, ["x"], 1), 100)


def test_streamed_text_equals_the_answer(family_model_dirs):
    from chat import answer, chat_prompt_ids
    from model_family import family_for, load_model, load_tokenizer
    for family in ("chatglm2", "chatglm3", "glm4", "glm4-0414"):
        folder = family_model_dirs[family]
        tokenizer, model_family, model = load_tokenizer(folder), family_for(folder), load_model(folder).eval()
        pieces = []
        text, interrupted = answer(model, tokenizer, model_family, chat_prompt_ids(tokenizer, model_family, [], "你好"),
                                   {"do_sample": False}, 40, write=pieces.append)
        assert not interrupted and len(pieces) > 3 and "".join(pieces) == text


def run_chat(*args):
    result = launch("chat.py", *args, launcher=False)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# full fine-tuning's checkpoint is a whole model folder: chat loads it as the model, with no base folder
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_greedy_task_answers_equal_predicts(trained, few_rows, tmp_path, mode):
    with open(few_rows, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    turns = tmp_path / "turns.jsonl"
    turns.write_text("".join(json.dumps({"query": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    answers = run_chat("--model_dir", trained[mode], "--input", turns, "--greedy", "--device", "cpu")
    from conftest import predict_in_process
    predict_in_process(f"predict_{mode}.py", "--model_dir", trained[mode], "--test_path", few_rows,
                       "--output_dir", tmp_path / "p", "--device", "cpu")
    with open(tmp_path / "p" / "predictions.jsonl", encoding="utf-8") as f:
        predicted = [json.loads(line)["generated"] for line in f]
    assert [a["response"] for a in answers] == predicted and all(predicted)


def test_history_and_clear_through_a_terminal_match_the_input_file(family_model_dirs, tmp_path):
    """A person types two questions, `clear`, the second question again, then `stop`; the answers equal those of
    --input with the same turns, and the second answer used the first turn (it differs after `clear`)."""
    pexpect = pytest.importorskip("pexpect")
    folder = family_model_dirs["chatglm2"]
    options = ["--model_dir", folder, "--greedy", "--max_new_tokens", 12, "--device", "cpu"]
    turns = tmp_path / "turns.jsonl"
    turns.write_text('{"query": "发动机异响"}\n{"query": "大灯不亮"}\n{"clear": true}\n{"query": "大灯不亮"}\n',
                     encoding="utf-8")
    expected = [a["response"] for a in run_chat(*options, "--input", turns)]
    assert expected[1] != expected[2]  # the history changed the answer
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "chat.py"), *map(str, options)], cwd=ROOT,
                          encoding="utf-8", timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    typed = []
    for query in ("发动机异响", "大灯不亮", "clear", "大灯不亮"):
        child.expect("User: ")
        child.sendline(query)
        if query == "clear":
            child.expect("history cleared")
            continue
        child.expect("ChatGLM: ")
        child.expect("\r\n")
        typed.append(child.before.strip())
    child.expect("User: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert typed == [e.strip() for e in expected]


def test_bad_turns_file_names_the_line(family_model_dirs, tmp_path):
    turns = tmp_path / "turns.jsonl"
    turns.write_text('{"query": "你好"}\n{"ask": 1}\n', encoding="utf-8")
    result = launch("chat.py", "--model_dir", family_model_dirs["chatglm2"], "--input", turns, "--greedy",
                    "--max_new_tokens", 4, launcher=False, check=False)
    assert result.returncode != 0 and "turns.jsonl:2: expected" in result.stderr and "Traceback" not in result.stderr
