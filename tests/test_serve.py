"""serve.py through the real `openai` client and raw HTTP: answers, streaming, concurrency; isolation (a bad
request never touches another's answer), hang-ups, limits, access, honest options, metrics. The chat page in a real
browser: tests/test_chat_page.py."""
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port

QUERIES = ["发动机异响", "大灯不亮", "刹车软", "油耗高", "怠速抖动", "空调不制冷", "方向盘抖", "变速箱打滑"]
API_KEY = "test-key-1"


@pytest.fixture(scope="module")
def server(family_model_dirs):
    """serve.py on a tiny ChatGLM2 base folder (its official chat template), on a free port of its own."""
    yield from serving(family_model_dirs["chatglm2"])


@pytest.fixture(scope="module")
def native_server(family_model_dirs):
    """serve.py on a tiny GLM-4-0414 folder (transformers' layout: modeling_glm4.py), its tokenizer's chat template."""
    yield from serving(family_model_dirs["glm4-0414"])


@pytest.fixture(scope="module")
def guarded_server(family_model_dirs):
    """Limits and access: an API key, one row, one waiting place, a small body limit, a 1.5 s timeout, greedy by
    default (--temperature 0), one allowed web origin."""
    yield from serving(family_model_dirs["chatglm2"], "--api_key", API_KEY, "--max_batch", 1, "--max_queue", 1,
                       "--max_body_bytes", 4096, "--request_timeout", 1.5, "--temperature", 0,
                       "--allowed_origins", "http://good.example")


@pytest.fixture(scope="module")
def task_server(trained):
    """A LoRA checkpoint of the tiny ChatGLM-6B (trained on single rows): the task format."""
    yield from serving(trained["lora"])


def serving(folder, *options, log=None):
    httpx = pytest.importorskip("httpx")
    port = free_port()
    log = open(os.path.join(os.path.dirname(folder.rstrip("/")), f"serve-{port}.log"), "w+")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", folder,
                                "--port", str(port), "--model_name", "tiny", "--max_new_tokens", "24", "--device",
                                "cpu", *map(str, options)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            assert process.poll() is None, open(log.name).read()
            time.sleep(0.3)
    base_url = Base(base)
    base_url.log_path = log.name
    yield base_url
    process.terminate()
    process.wait(timeout=30)
    log.close()


class Base(str):
    """The server's address (a str), with the path of its log."""


def client(base, api_key="none", **options):
    from openai import OpenAI
    return OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=options.pop("timeout", 120),
                  **options)


def ask(base, query, api_key="none", **extra):
    extra.setdefault("temperature", 0)
    reply = client(base, api_key).chat.completions.create(model="tiny",
                                                          messages=[{"role": "user", "content": query}], **extra)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def streamed(base, query, **extra):
    stream = client(base).chat.completions.create(model="tiny", messages=[{"role": "user", "content": query}],
                                                  temperature=0, stream=True, **extra)
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    return "".join(pieces), reasons[-1], len(pieces)


def metric(base, name, api_key=None):
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for line in httpx.get(f"{base}/metrics", headers=headers).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until_idle(base, api_key=None, seconds=20):
    deadline = time.time() + seconds
    while metric(base, "vllm:num_requests_running", api_key) and time.time() < deadline:
        time.sleep(0.1)
    return metric(base, "vllm:num_requests_running", api_key)


def post(base, body, content_type="application/json", headers=None):
    import httpx
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{base}/v1/chat/completions", content=raw,
                      headers={"Content-Type": content_type, **(headers or {})}, timeout=60)


# ---- answers ------------------------------------------------------------------------------------------------------

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
    """On the continuous batch's rows as THUDM's layout; the prompt is the tokenizer's chat template."""
    assert_greedy_answer_equals_chat_py(native_server, family_model_dirs["glm4-0414"], tmp_path)
    reply = client(native_server).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "汽修助手"}, {"role": "user", "content": QUERIES[1]}],
        temperature=0.8, top_p=0.8)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_chunks_add_up_to_the_answer(server):
    whole, _ = ask(server, QUERIES[1])
    text, reason, pieces = streamed(server, QUERIES[1])
    assert text == whole and pieces > 3 and reason in ("stop", "length")


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


# ---- 1. isolation: bad values are refused at the door; a neighbour's answer never changes -------------------------

POISON = [({"temperature": 1, "top_p": -1}, "top_p"), ({"temperature": float("nan")}, "temperature"),
          ({"top_k": -3}, "top_k"), ({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"),
          ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "10"}, "max_tokens"),
          ({"max_tokens": [1]}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
          ({"temperature": "hot"}, "temperature"), ({"n": 2}, "n"), ({"stream": "yes"}, "stream"),
          ({"stop": ["\n"]}, "stop"), ({"messages": [{"role": "user", "content": 5}]}, "messages"),
          ({"messages": [{"role": "tool", "content": "x"}]}, "messages")]


def test_poison_requests_are_refused_and_greedy_and_streaming_neighbours_get_their_alone_answers(server):
    """Before: `top_p: -1` raised inside the shared sampling step and ended every request in the rows (a streaming
    neighbour saw a normal-looking `stop`)."""
    alone, stream_alone = ask(server, QUERIES[2], max_tokens=24), streamed(server, QUERIES[3], max_tokens=24)[0]
    results = {}

    def neighbour():
        results["greedy"] = ask(server, QUERIES[2], max_tokens=24)

    def stream_neighbour():
        results["stream"] = streamed(server, QUERIES[3], max_tokens=24)
    threads = [threading.Thread(target=neighbour), threading.Thread(target=stream_neighbour)]
    for t in threads:
        t.start()
    statuses = []
    for poison, param in POISON:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], **poison}
        reply = post(server, json.dumps(body, allow_nan=True))
        statuses.append(reply.status_code)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], (poison, error)
        assert error["param"] == param, (poison, error)  # the field is named
    for t in threads:
        t.join()
    assert statuses == [400] * len(POISON)
    assert results["greedy"] == alone and results["stream"][:2] == (stream_alone, results["stream"][1])
    assert results["stream"][1] in ("stop", "length")


def test_a_vanishing_temperature_is_greedy_not_an_overflow(server):
    """1e-45 is a valid temperature; dividing by it used to overflow into NaN probabilities (a 500)."""
    assert ask(server, QUERIES[2], temperature=1e-45) == ask(server, QUERIES[2])


def test_a_row_whose_sampling_fails_ends_alone():
    """In the engine: one row's logits cannot be sampled (NaN); its request ends with an error, the others get
    their tokens (unit level: nothing a client sends gets this far any more)."""
    import torch

    from serving_engine import Request, deliver
    ended, tokens = {}, {}

    def request(name, temperature):
        return Request([1], 5, temperature, 0.9, 0, [], lambda t: tokens.setdefault(name, []).append(t),
                       lambda reason, error: ended.setdefault(name, (reason, error)))
    requests = [request("greedy", 0.0), request("poisoned", 0.9), request("sampled", 0.9)]
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan")] * 3, [0.0, 0.0, 9.0]])
    going_on = deliver(requests, lambda: logits, [1, 0, 0])
    assert going_on == [True, False, True]
    assert ended["poisoned"][0] == "error" and "sampling failed" in ended["poisoned"][1]
    assert tokens == {"greedy": [1], "sampled": [2]} and "greedy" not in ended and "sampled" not in ended


def test_wrong_types_and_malformed_bodies_get_openai_json_400s(server):
    assert post(server, '{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_p": null}'
                ).status_code == 200  # null means the default, as in OpenAI's API
    deep = '{"messages": ' + "[" * 200_000 + "]" * 200_000 + "}"
    for raw, words in [(deep, "nests JSON too deeply"), ('{"messages": [', "not valid JSON"), ("[1, 2]", "object")]:
        reply = post(server, raw)
        assert reply.status_code == 400 and words in reply.json()["error"]["message"]


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}', 404, "does not exist"),
    ('{"model": "tiny", "messages": []}', 400, "non-empty list"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 5000}', 400, "context length"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": -1}', 400, "temperature"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, status, words):
    reply = post(server, body)
    assert reply.status_code == status and words in reply.json()["error"]["message"]
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert ask(server, QUERIES[2])[0]


def test_the_openai_client_sees_an_unknown_model_as_not_found(server):
    import openai
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "a"}])


def test_a_failed_prompt_forward_ends_its_requests_and_the_engine_goes_on():
    """The engine thread survives a failing prompt forward (out of memory, say): the requests it held end with the
    error, once each, and a later request is served."""
    import queue

    import serving_engine

    class Slots:
        requests, fail = [None, None], True

        def free_rows(self):
            return [r for r, x in enumerate(self.requests) if x is None]

        def fits(self, request):
            return True

        def live(self):
            return 0

        def admit(self, requests):
            if Slots.fail:
                Slots.fail = False
                raise RuntimeError("CUDA out of memory")
            for request in requests:
                request.take(7)
                request.finish("length")
    engine = serving_engine.Engine.__new__(serving_engine.Engine)  # no model: only the loop's bookkeeping
    engine.max_batch, engine.max_queue, engine.gather_s, engine.cohorts_started, engine.queued = 2, 4, 0.0, 0, 0
    engine.slots, engine.cohorts, engine.pending, engine.waiting = Slots(), [], [], queue.Queue()
    engine.queue_lock = threading.Lock()
    outcomes, done = [], threading.Semaphore(0)

    def request():
        return serving_engine.Request([1, 2], 4, 0.0, 0.7, 0, [], lambda token: None,
                                      lambda reason, error: (outcomes.append((reason, error)), done.release()))
    engine.submit(request())
    threading.Thread(target=engine.run, daemon=True).start()
    assert done.acquire(timeout=10)
    engine.submit(request())
    assert done.acquire(timeout=10)
    assert outcomes[0][0] == "error" and "CUDA out of memory" in outcomes[0][1] and outcomes[1] == ("length", None)
    assert engine.queue_length() == 0


# ---- 2. hang-ups -----------------------------------------------------------------------------------------------------

def test_non_streaming_clients_that_hang_up_free_their_rows(server):
    """Before: only streams freed their row; three clients timing out kept three rows busy to the end."""
    import openai
    slow = client(server, timeout=0.4)
    threads = []
    for query in QUERIES[:3]:
        def hang_up(q=query):
            with pytest.raises(openai.APITimeoutError):
                slow.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                             temperature=0, max_tokens=1900, extra_body={"ignore_eos": True})
        threads.append(threading.Thread(target=hang_up))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_until_idle(server, seconds=5) == 0  # 1,900 tokens each would take far longer
    assert ask(server, QUERIES[4])[0]


def test_a_client_that_hangs_up_mid_stream_frees_its_row(server):
    import httpx
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUERIES[3]}], "temperature": 0, "stream": True,
            "max_tokens": 1900, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in seen)
        assert metric(server, "vllm:num_requests_running") >= 1
    assert wait_until_idle(server, seconds=5) == 0


# ---- 3. limits -------------------------------------------------------------------------------------------------------

def test_past_the_queue_the_server_answers_429_with_retry_after(guarded_server):
    """--max_batch 1 --max_queue 1: one request generating, one waiting, the third refused at once."""
    import httpx
    import openai
    long_body = {"model": "tiny", "messages": [{"role": "user", "content": QUERIES[0]}], "max_tokens": 1500,
                 "ignore_eos": True}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    threads = [threading.Thread(target=lambda: post(guarded_server, long_body, headers=auth)) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    reply = post(guarded_server, long_body, headers=auth)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        client(guarded_server, API_KEY).chat.completions.create(model="tiny", messages=long_body["messages"],
                                                                max_tokens=4)
    assert metric(guarded_server, "vllm:num_requests_running", API_KEY) <= 1  # never more than --max_batch
    for t in threads:
        t.join()
    assert httpx.get(f"{guarded_server}/health").json()["waiting"] == 0


def test_a_request_past_its_timeout_gets_504_and_frees_its_row(guarded_server):
    import openai
    start = time.time()
    with pytest.raises(openai.APIStatusError) as caught:
        client(guarded_server, API_KEY).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUERIES[1]}], max_tokens=2000,
            extra_body={"ignore_eos": True})  # 2,000 tokens: several seconds on a CPU
    assert caught.value.status_code == 504 and "request_timeout" in caught.value.message
    assert time.time() - start < 10 and wait_until_idle(guarded_server, API_KEY, seconds=3) == 0


def test_a_body_over_the_limit_gets_413(guarded_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "发" * 3000}]}
    reply = post(guarded_server, body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 413 and "max_body_bytes" in reply.json()["error"]["message"]


# ---- 4. access ---------------------------------------------------------------------------------------------------------

def test_the_api_key_is_required_where_set_and_health_stays_open(guarded_server):
    import httpx
    import openai
    with pytest.raises(openai.AuthenticationError):
        client(guarded_server, "wrong").models.list()
    assert httpx.get(f"{guarded_server}/v1/models").status_code == 401
    assert httpx.get(f"{guarded_server}/health").json()["api_key_required"] is True
    assert [m.id for m in client(guarded_server, API_KEY).models.list()] == ["tiny"]


def test_only_json_bodies_from_allowed_origins_to_this_host_are_served(guarded_server):
    """A page the user visits could POST text/plain without a CORS preflight, or reach 127.0.0.1 through a
    rebinding DNS name: both are refused before anything runs."""
    import httpx
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = json.dumps({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2})
    assert post(guarded_server, body, "text/plain", auth).status_code == 415
    evil = post(guarded_server, body, headers={**auth, "Origin": "http://evil.example"})
    assert evil.status_code == 403 and "not allowed" in evil.json()["error"]["message"]
    good = post(guarded_server, body, headers={**auth, "Origin": "http://good.example"})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "http://good.example"
    preflight = httpx.options(f"{guarded_server}/v1/chat/completions", headers={"Origin": "http://good.example"})
    assert preflight.status_code == 204 and "authorization" in preflight.headers["access-control-allow-headers"]
    rebound = httpx.get(f"{guarded_server}/v1/models", headers={**auth, "Host": "evil.example"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"


def test_error_bodies_carry_no_internal_text(guarded_server):
    import openai
    with pytest.raises(openai.APIStatusError) as caught:
        client(guarded_server, API_KEY).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUERIES[1]}], max_tokens=2000,
            extra_body={"ignore_eos": True})  # 2,000 tokens: several seconds on a CPU
    message = caught.value.message
    assert "Traceback" not in message and "File " not in message and ".py" not in message


# ---- 5. honest options and answers -------------------------------------------------------------------------------------

def test_help_lists_only_what_serve_takes():
    result = subprocess.run([sys.executable, "serve.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--greedy", "--seed", "--input", "--output", "--repetition_penalty"):
        assert option not in result.stdout
    for option in ("--temperature", "--api_key", "--max_queue", "--request_timeout", "--allowed_origins"):
        assert option in result.stdout


def test_server_sampling_defaults_apply_and_a_requests_own_values_win(guarded_server):
    """--temperature 0: without a temperature of its own a request is greedy (before: it sampled anyway)."""
    messages = [{"role": "user", "content": QUERIES[5]}]
    answers = {client(guarded_server, API_KEY).chat.completions.create(model="tiny", messages=messages,
                                                                      max_tokens=12).choices[0].message.content
               for _ in range(3)}
    assert len(answers) == 1
    assert answers == {ask(guarded_server, QUERIES[5], API_KEY, max_tokens=12)[0]}


def test_the_task_format_refuses_what_it_would_drop_or_cut(task_server):
    import openai
    reply = client(task_server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "异响"}],
                                                        temperature=0)
    assert reply.choices[0].message.content is not None
    for messages, words in [
        ([{"role": "system", "content": "你是助手"}, {"role": "user", "content": "异响"}], "task format"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "task format"),
        ([{"role": "user", "content": "发动机异响" * 400}], "max_src_len")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client(task_server).chat.completions.create(model="tiny", messages=messages)
        assert words in caught.value.message


def test_a_port_in_use_is_one_line_before_anything_loads(server, family_model_dirs):
    port = server.rsplit(":", 1)[1]
    start = time.time()
    result = subprocess.run([sys.executable, "serve.py", "--model_dir", family_model_dirs["chatglm2"], "--port", port],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "serving" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Address already in use" in errors[0] and "Loading" not in result.stderr
    assert time.time() - start < 60


# ---- 6. observability --------------------------------------------------------------------------------------------------

def test_metrics_count_requests_tokens_and_latencies_and_each_request_is_logged_once(server):
    before = metric(server, "vllm:generation_tokens_total")
    ask(server, QUERIES[6], max_tokens=8)
    post(server, '{"messages": []}')
    assert metric(server, "vllm:generation_tokens_total") >= before + 1
    assert metric(server, "vllm:time_to_first_token_seconds_count") >= 1
    assert metric(server, "vllm:num_requests_waiting") == 0
    import httpx
    text = httpx.get(f"{server}/metrics").text
    assert 'http_requests_total{handler="/v1/chat/completions",status="400"}' in text
    assert "vllm:time_per_output_token_seconds_bucket" in text and "vllm:e2e_request_latency_seconds_sum" in text
    with open(server.log_path) as f:
        logged = [line for line in f if '"POST /v1/chat/completions"' in line]
    assert any(" 400 " in line and "non-empty list" in line for line in logged)
    assert any(" 200 " in line and "completion=" in line for line in logged)
    assert not math.isnan(metric(server, "vllm:e2e_request_latency_seconds_sum"))
