"""serve.py under load and faults: many clients at once mixing well-formed requests with poison, hang-ups and
over-long prompts, for a fixed time, on the loopback only.

First every prompt is asked alone, greedily (its "alone answer"). Then `--clients` threads run for `--seconds`,
each picking, request after request, one of:
- greedy (non-streamed or streamed, half each): its answer must equal the prompt's alone answer;
- sampled (temperature 0.8, top_p 0.9; streamed or not): must end with stop or length;
- poison (a value out of range or of the wrong type): must get 400 with `param` named;
- hang-up (a non-streamed request whose client gives up after 0.2 s, or a stream closed after 3 chunks);
- over-long (a prompt longer than the context): must get 400 context_length_exceeded.
Afterwards the server must have no row in use (`vllm:num_requests_running` 0 once the last requests end): a leaked
row would serve nobody for ever. Printed: requests by kind and outcome, errors by kind, rows leaked, p50 / p99 time
to the first streamed token (greedy streams), and how many greedy answers differed from their alone answers.

    python bench/serve_load_faults.py --model_dir FOLDER [--clients 16 --seconds 60] [--base http://127.0.0.1:PORT]

Without --base it starts serve.py on --model_dir itself (a free loopback port; extra options after --serve_args).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["发动机异响", "大灯不亮", "刹车软", "油耗高", "怠速抖动", "空调不制冷", "方向盘抖", "变速箱打滑", "水温过高",
           "启动困难", "排气冒黑烟", "转向沉重"]
POISON = [{"top_p": -1}, {"temperature": float("nan")}, {"top_k": -3}, {"max_tokens": "10"}, {"max_tokens": -5},
          {"n": 2}, {"temperature": 9}, {"stop": ["x"]}]
MOST_CLIENTS, MOST_SECONDS = 256, 900


class Tally:
    def __init__(self):
        self.lock, self.counts, self.errors, self.first_tokens, self.mismatches = threading.Lock(), {}, {}, [], 0

    def count(self, kind, outcome):
        with self.lock:
            self.counts[(kind, outcome)] = self.counts.get((kind, outcome), 0) + 1

    def error(self, kind, detail):
        with self.lock:
            self.errors[(kind, detail)] = self.errors.get((kind, detail), 0) + 1


def body(prompt, **extra):
    return {"model": "load", "messages": [{"role": "user", "content": prompt}], **extra}


def ask(http, base, payload, timeout=None):
    return http.post(f"{base}/v1/chat/completions", content=json.dumps(payload, allow_nan=True),
                     headers={"Content-Type": "application/json"}, timeout=timeout or 600)


def stream(http, base, payload, stop_after=None):
    """(text, finish reason, seconds to the first content chunk); stops reading after `stop_after` chunks."""
    start, first, text, reason, chunks = time.perf_counter(), None, "", None, 0
    with http.stream("POST", f"{base}/v1/chat/completions", json={**payload, "stream": True}, timeout=600) as reply:
        if reply.status_code != 200:
            return None, f"http {reply.status_code}", None
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return text, f"error event: {data['error'].get('type')}", first
            delta = data["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta
            reason = data["choices"][0]["finish_reason"] or reason
            chunks += 1
            if stop_after and chunks >= stop_after:
                return text, "hung up", first
    return text, reason, first


def one_request(http, base, kind, alone, tally, rng, context, max_tokens):
    prompt = rng.choice(PROMPTS)
    if kind == "greedy":
        payload = body(prompt, temperature=0, max_tokens=max_tokens)
        if rng.random() < 0.5:
            text, reason, first = stream(http, base, payload)
            if first is not None:
                tally.first_tokens.append(first)
        else:
            reply = ask(http, base, payload)
            text, reason = (reply.json()["choices"][0]["message"]["content"], reply.json()["choices"][0][
                "finish_reason"]) if reply.status_code == 200 else (None, f"http {reply.status_code}")
        if reason not in ("stop", "length"):
            return tally.error(kind, reason)
        if text != alone[prompt]:
            with tally.lock:
                tally.mismatches += 1
        return tally.count(kind, reason)
    if kind == "sampled":
        payload = body(prompt, temperature=0.8, top_p=0.9, max_tokens=max_tokens)
        if rng.random() < 0.5:
            _, reason, _ = stream(http, base, payload)
        else:
            reply = ask(http, base, payload)
            reason = reply.json()["choices"][0]["finish_reason"] if reply.status_code == 200 else \
                f"http {reply.status_code}"
        return tally.count(kind, reason) if reason in ("stop", "length") else tally.error(kind, reason)
    if kind == "poison":
        poison = rng.choice(POISON)
        reply = ask(http, base, body(prompt, **poison))
        named = reply.status_code == 400 and reply.json()["error"]["param"] == next(iter(poison))
        return tally.count(kind, "400") if named else tally.error(kind, f"http {reply.status_code}")
    if kind == "over-long":
        reply = ask(http, base, body(prompt * (context // len(prompt) + 1)))
        refused = reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
        return tally.count(kind, "400") if refused else tally.error(kind, f"http {reply.status_code}")
    import httpx
    if rng.random() < 0.5:  # a non-streamed client that gives up
        try:
            ask(http, base, body(prompt, temperature=0, max_tokens=max_tokens, ignore_eos=True), timeout=0.2)
            return tally.count(kind, "finished before the hang-up")
        except httpx.TimeoutException:
            return tally.count(kind, "hung up")
    _, reason, _ = stream(http, base, body(prompt, temperature=0, max_tokens=max_tokens, ignore_eos=True), 3)
    return tally.count(kind, reason)


KINDS = ["greedy"] * 4 + ["sampled"] * 2 + ["poison", "hang-up", "over-long"]


def client_loop(base, until, alone, tally, seed, context, max_tokens):
    import httpx
    rng = random.Random(seed)
    with httpx.Client() as http:
        while time.time() < until:
            kind = rng.choice(KINDS)
            try:
                one_request(http, base, kind, alone, tally, rng, context, max_tokens)
            except Exception as err:  # noqa: BLE001 (a client's failure is a finding, not the end of the run)
                tally.error(kind, f"{type(err).__name__}")


def running_rows(base):
    import httpx
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise SystemExit("no vllm:num_requests_running in /metrics")


def start_server(model_dir, extra):
    import httpx
    sys.path.insert(0, ROOT)
    from tests.conftest import free_port
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", model_dir, "--port",
                                str(port), "--model_name", "load", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=open(os.path.join("/tmp", f"serve_load_{port}.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return base, process
        except httpx.TransportError:
            if process.poll() is not None:
                raise SystemExit(f"serve.py ended ({process.returncode}); see /tmp/serve_load_{port}.log")
            time.sleep(0.5)
    raise SystemExit("serve.py did not come up in 10 minutes")


def report(tally, leaked, seconds, clients):
    served = sum(n for (kind, outcome), n in tally.counts.items())
    lines = ["| what | count |", "| --- | --- |",
             f"| clients, seconds | {clients}, {seconds:.0f} |", f"| requests that behaved as they should | {served} |"]
    lines += [f"| {kind}: {outcome} | {n} |" for (kind, outcome), n in sorted(tally.counts.items())]
    errors = sum(tally.errors.values())
    lines += [f"| errors (unexpected outcomes) | {errors} |"]
    lines += [f"| error: {kind}: {detail} | {n} |" for (kind, detail), n in sorted(tally.errors.items())]
    ttft = sorted(tally.first_tokens)
    if ttft:
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        lines += [f"| time to first token, greedy streams: p50 / p99 | {statistics.median(ttft):.3f} s / {p99:.3f} s |"]
    lines += [f"| greedy answers that differ from their alone answer | {tally.mismatches} |",
              f"| rows leaked (in use once the load ended) | {leaked} |"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="the folder to serve (unless --base names a running server)")
    parser.add_argument("--base", default=None, help="a serve.py already running on this machine")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max_tokens", type=int, default=64, help="per well-formed request")
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--serve_args", nargs=argparse.REMAINDER, default=[], help="options for serve.py")
    args = parser.parse_args()
    if not 1 <= args.clients <= MOST_CLIENTS or not 0 < args.seconds <= MOST_SECONDS:
        raise SystemExit(f"error: --clients 1..{MOST_CLIENTS}, --seconds up to {MOST_SECONDS}")
    process = None
    if args.base:
        if not args.base.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
            raise SystemExit("error: --base must be a loopback address: this script sends poison on purpose")
        base = args.base
    else:
        if not args.model_dir:
            raise SystemExit("error: --model_dir or --base")
        base, process = start_server(args.model_dir, args.serve_args)
    try:
        import httpx
        context = 2048 * 16  # over-long prompts: more characters than any row holds
        with httpx.Client() as http:
            alone = {p: ask(http, base, body(p, temperature=0, max_tokens=args.max_tokens)).json()["choices"][0]
                     ["message"]["content"] for p in PROMPTS}
        tally, start = Tally(), time.time()
        threads = [threading.Thread(target=client_loop, args=(base, start + args.seconds, alone, tally, seed,
                                                              context, args.max_tokens))
                   for seed in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.time() + 30  # hung-up requests end before their next step; running ones finish
        while running_rows(base) and time.time() < deadline:
            time.sleep(0.2)
        table = report(tally, running_rows(base), time.time() - start, args.clients)
        print(table, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table + "\n")
        bad = sum(tally.errors.values()) or tally.mismatches or running_rows(base)
        raise SystemExit(1 if bad else 0)
    finally:
        if process:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
