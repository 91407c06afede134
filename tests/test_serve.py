"""serve.py through the real `openai` client and raw HTTP: answers, streaming, concurrency, errors, hang-ups."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port

QUERIES = ["发动机异响", "大灯不亮", "刹车软", "油耗高", "怠速抖动", "空调不制冷", "方向盘抖", "变速箱打滑"]


@pytest.fixture(scope="module")
def server(family_model_dirs):
    """serve.py on a tiny ChatGLM2 base folder (its official chat template), on a free port of its own."""
    yield from serving(family_model_dirs["chatglm2"])


@pytest.fixture(scope="module")
def native_server(family_model_dirs):
    """serve.py on a tiny GLM-4-0414 folder (transformers' layout: modeling_glm4.py), its tokenizer's chat template."""
    yield from serving(family_model_dirs["glm4-0414"])


def serving(folder):
    httpx = pytest.importorskip("httpx")
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", folder,
                                "--port", str(port), "--model_name", "tiny", "--max_new_tokens", "24", "--device",
                                "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.3)
    yield base
    process.terminate()
    process.wait(timeout=30)


def client(base):
    from openai import OpenAI
    return OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def ask(base, query, **extra):
    extra.setdefault("temperature", 0)
    reply = client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": query}],
                                                 **extra)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def test_models_and_a_greedy_answer_equal_chat_py(server, family_model_dirs, tmp_path):
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    assert_greedy_answer_equals_chat_py(server, family_model_dirs["chatglm2"], tmp_path)


def assert_greedy_answer_equals_chat_py(base, folder, tmp_path):
    text, reason = ask(base, QUERIES[0])
    assert text and reason in ("stop", "length")
    turns = tmp_path / "turns.jsonl"
    turns.write_text(json.dumps({"query": QUERIES[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    from conftest import launch
    result = launch("chat.py", "--model_dir", folder, "--input", turns, "--greedy", "--max_new_tokens", 24,
                    "--device", "cpu", launcher=False)
    assert json.loads(result.stdout.strip().splitlines()[-1])["response"] == text


def test_a_transformers_layout_folder_serves_greedy_and_sampled_answers(native_server, family_model_dirs, tmp_path):
    """On the continuous batch's slots as THUDM's layout; the prompt is the tokenizer's chat template."""
    assert_greedy_answer_equals_chat_py(native_server, family_model_dirs["glm4-0414"], tmp_path)
    reply = client(native_server).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "汽修助手"}, {"role": "user", "content": QUERIES[1]}],
        temperature=0.8, top_p=0.8)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_chunks_add_up_to_the_answer(server):
    whole, _ = ask(server, QUERIES[1])
    stream = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUERIES[1]}], temperature=0, stream=True)
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole and len(pieces) > 3 and reasons[-1] in ("stop", "length")


def test_eight_concurrent_clients_get_their_one_at_a_time_answers(server):
    """Eight greedy clients arriving 20 ms apart (later ones join the running batch) beside two sampling ones."""
    alone = [ask(server, q)[0] for q in QUERIES]
    together, sampled = [None] * len(QUERIES), [None] * 2

    def one(i):
        time.sleep(0.02 * i)
        together[i] = ask(server, QUERIES[i])[0]

    def sampling(i):
        sampled[i] = ask(server, QUERIES[i], temperature=0.9, top_p=0.9)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUERIES))] + \
        [threading.Thread(target=sampling, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and len(set(alone)) > 1
    assert all(reason in ("stop", "length") for _, reason in sampled)


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}', 404, "does not exist"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a"}', 400, "not valid JSON"),
    ('{"model": "tiny", "messages": []}', 400, "non-empty list"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 2}', 400, "only n=1"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 5000}', 400, "context length"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": -1}', 400, "temperature"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, words):
    import httpx
    reply = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status and words in reply.json()["error"]["message"]
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert ask(server, QUERIES[2])[0]


def test_the_openai_client_sees_an_unknown_model_as_not_found(server):
    import openai
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "a"}])


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server):
    import httpx
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUERIES[3]}], "temperature": 0, "stream": True,
            "max_tokens": 1900}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in seen)
        assert httpx.get(f"{server}/health").json()["active_requests"] >= 1
    deadline = time.time() + 20  # 1,900 tokens would take far longer than this
    while httpx.get(f"{server}/health").json()["active_requests"] and time.time() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{server}/health").json()["active_requests"] == 0
    assert ask(server, QUERIES[4])[0]


def test_a_failed_prompt_forward_ends_its_requests_with_the_error():
    """The engine thread survives a failing prompt forward (out of memory, say), and the requests it held get the
    error instead of waiting for ever."""
    import queue

    import serve

    class FailingSlots:
        requests = [None, None]

        def free_rows(self):
            return [0, 1]

        def fits(self, request):
            return True

        def live(self):
            return 0

        def admit(self, requests):
            raise RuntimeError("CUDA out of memory")
    engine = serve.Engine.__new__(serve.Engine)  # no model: only the loop's bookkeeping is under test
    engine.max_batch, engine.gather_idle_s, engine.gather_busy_s, engine.cohorts_started = 4, 0.0, 0.0, 0
    engine.slots, engine.cohorts, engine.pending, engine.waiting = FailingSlots(), [], [], queue.Queue()
    ended = threading.Event()
    reasons = []

    def emit(token, reason):
        reasons.append(reason)
        ended.set()
    engine.submit(serve.Request([1, 2], 4, 0.0, 0.7, 0, [], emit))
    threading.Thread(target=engine.run, daemon=True).start()
    assert ended.wait(10) and reasons == ["error: CUDA out of memory"]
