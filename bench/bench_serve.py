"""serve.py under 1, 8 and 32 concurrent greedy clients beside prediction's batched rate, on one GPU.

A ChatGLM2/3-6B-sized model with random weights is built on the GPU (bench_gpu.build_model) and served by serve.py's
own app (uvicorn in a thread, task format with the reference prompt, the tokenizer of a tiny ChatGLM2 folder trained
on data/, whose every id below the padded vocabulary is text; with ChatGLM-6B's layout most ids a random model picks
are image tokens that decode to nothing, so no text would stream). Each client streams one spo test row's answer over HTTP; every answer is exactly `--new_tokens` long (the
stop tokens are switched off, as in bench_gpu's prediction). Reported: generated tokens/s over all clients, the
median time to the first streamed token, and predict's rate for the same 50 prompts in one batch (decoding.py).

    python bench/bench_serve.py --clients 1,8,32,64 [--tiny]

The lent GPU machine has no FastAPI or uvicorn: put their wheels beside the carried DeepSpeed ones first
(`pip download --no-deps -d .whl fastapi==0.115.12 starlette==0.46.2 uvicorn`; newer FastAPI needs opentelemetry).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def stream_one(base, text, new_tokens, results, index, ready):
    """One client: its HTTP client is made before the common start (making one takes milliseconds of this process's
    interpreter, which 32 threads share), then it streams one answer."""
    import httpx
    body = {"model": "bench", "messages": [{"role": "user", "content": text}], "temperature": 0, "stream": True,
            "max_tokens": new_tokens}
    with httpx.Client(timeout=600) as http:
        ready.wait()
        start, first = time.perf_counter(), None
        with http.stream("POST", f"{base}/v1/chat/completions", json=body) as reply:
            for line in reply.iter_lines():
                if first is None and '"content": "' in line and '"content": ""' not in line:
                    first = time.perf_counter() - start
    results[index] = (first, time.perf_counter() - start)


def run_clients(base, texts, clients, new_tokens):
    """The clients in a process of their own (threads there), so that they do not share the server's interpreter."""
    import subprocess
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--client_mode", base, "--clients", str(clients),
                           "--new_tokens", str(new_tokens)], input=json.dumps(texts), capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def client_threads(base, texts, clients, new_tokens):
    import httpx  # noqa: F401  (imported before the clock starts)
    results = [None] * clients
    ready = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=stream_one, args=(base, texts[i % len(texts)], new_tokens, results, i, ready))
               for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "seconds": round(wall, 2), "tokens_per_s": round(clients * new_tokens / wall, 1),
            "first_token_s_median": round(statistics.median(r[0] for r in results if r[0] is not None), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--new_tokens", type=int, default=315)
    parser.add_argument("--tiny", action="store_true", help="a 6-layer model: checks the script, measures nothing")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--gather_s", type=float, default=None, help="serving_engine.Engine's gathering window")
    parser.add_argument("--client_mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_mode:
        print(json.dumps(client_threads(args.client_mode, json.loads(sys.stdin.read()), int(args.clients),
                                        args.new_tokens)))
        return
    import torch
    import uvicorn

    import bench_gpu
    import serve
    from data_set import encode_prompt, read_rows
    from decoding import greedy_decode
    from model_family import CHATGLM2, load_tokenizer
    from decoding import left_pad
    from tools.make_tiny_model import build_tiny_model
    from training_options import DEFAULT_PROMPT
    bench_gpu.TINY, bench_gpu.FAMILY = args.tiny, "chatglm2"
    folder = build_tiny_model(tempfile.mkdtemp(), num_layers=1, hidden_size=64, num_attention_heads=4,
                              inner_hidden_size=128, family="chatglm2")
    tokenizer = load_tokenizer(folder, CHATGLM2)
    config = bench_gpu.official_config()
    model = bench_gpu.build_model(config, torch.bfloat16 if torch.cuda.is_available() else torch.float32).eval()
    rows = read_rows(os.path.join(ROOT, "data", "spo_test.jsonl"), DEFAULT_PROMPT)
    options = argparse.Namespace(format="task", prompt_text=None, max_src_len=None, system=None,
                                 max_new_tokens=args.new_tokens, max_batch=64, slot_tokens=1024, max_queue=256,
                                 host="127.0.0.1", api_key=None, allowed_origins=[], max_body_bytes=1 << 22,
                                 request_timeout=0, temperature=None, top_p=None, top_k=0)
    server = serve.Server(model, tokenizer, CHATGLM2, options, {"prompt_text": DEFAULT_PROMPT, "max_src_len": 450},
                          "bench")
    server.stop_ids = []  # every answer exactly --new_tokens long
    if args.gather_s is not None:
        server.engine.gather_s = args.gather_s
    threading.Thread(target=uvicorn.run, args=(serve.create_app(server),),
                     kwargs=dict(host="127.0.0.1", port=args.port, log_level="warning"), daemon=True).start()
    base = f"http://127.0.0.1:{args.port}"
    time.sleep(3)
    texts = [r.text for r in rows]
    run_clients(base, texts, 2, 8)  # warm-up: first kernels, first graph
    report = []
    for n in args.clients.split(","):
        before, server.engine.slots.most_live = server.engine.cohorts_started, 0
        report.append(run_clients(base, texts, int(n), args.new_tokens))
        report[-1]["cohorts"] = server.engine.cohorts_started - before
        report[-1]["most_rows_at_once"] = server.engine.slots.most_live
    prompts = [encode_prompt(tokenizer, CHATGLM2, r, 450) for r in rows][:50]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    greedy_decode(model, ids[:2].to(device), mask[:2].to(device), 8, stop_ids=[])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    greedy_decode(model, ids.to(device), mask.to(device), args.new_tokens, stop_ids=[])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    batched = len(prompts) * args.new_tokens / (time.perf_counter() - start)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"serve.py, ChatGLM2/3-6B-sized random model on {gpu}, {args.new_tokens} new tokens per request "
          f"({len(prompts)} spo test prompts, task format); predict's batched rate: {batched:.0f} tokens/s")
    print("| concurrent clients | seconds | tokens/s | share of predict's batched rate | first token (median) | "
          "most rows decoded at once |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in report:
        r["share_of_batched"] = round(r["tokens_per_s"] / batched, 3)
        print(f"| {r['clients']} | {r['seconds']} | {r['tokens_per_s']} | {100 * r['share_of_batched']:.0f}% | "
              f"{r['first_token_s_median']} s | {r['most_rows_at_once']} |")
    print(json.dumps({"gpu": gpu, "predict_batched_tokens_per_s": round(batched, 1), "serve": report}))


if __name__ == "__main__":
    main()
