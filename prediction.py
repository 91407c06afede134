"""What the three predict scripts share: arguments, defaults read from the training run, batched generation, scoring.

A predict script supplies a `PredictMethod` (how the trained part is loaded onto the base model) and calls
`main(method)`: it loads the base model and the checkpoint, generates greedily for every row of `--test_path`
in left-padded batches (each row stops at its end token; the tokens equal one-row-at-a-time generation), scores
the task and writes `predictions.jsonl` and `metrics.json`.
"""
import argparse
import json
import os
import time

import torch

from checkpoints import CheckpointError, OutputFolderLock, checked_checkpoint, latest_checkpoint, saved_training_args, \
    trained_base
from training_options import DEFAULT_PROMPT

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARTIAL_FILE = "predictions.partial.jsonl"  # each batch's tokens as soon as they exist; removed when all are written


class PredictMethod:
    name = "method"
    title = "a method"
    checkpoint_is_model = False  # True: the checkpoint is a whole model folder, also the tokenizer's and family's
    takes_model_folders = False  # True: a model folder without training_args.json (a base, an export) is taken too

    def add_arguments(self, parser):
        pass

    def load(self, base_dir, checkpoint_dir, args, family, dtype):
        """The base model with the trained part applied, ready to generate."""
        raise NotImplementedError


def build_parser(method):
    parser = argparse.ArgumentParser(
        description=f"Predict with a ChatGLM checkpoint trained by finetuning_{method.name}.py ({method.title}) and "
                    "score it. Settings the training run saved (prompt, lengths, base model) are the defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--test_path", default="data/spo_test.jsonl", help="JSONL or JSON rows with references")
    parser.add_argument("--model_dir", default=f"output_dir_{method.name}",
                        help="the checkpoint folder, or a training output folder (its latest checkpoint is used)")
    parser.add_argument("--ori_model_dir", default=None, help="the base model folder (default: the one trained on)")
    parser.add_argument("--device", default=None, help="GPU index, or cpu (default: GPU 0 if there is one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on a GPU that has it, fp16 on other GPUs, fp32 on the CPU")
    parser.add_argument("--quantization_bit", type=int, choices=[8, 4], default=None,
                        help="quantize the base's block linears to INT8/INT4 (THUDM's format) before generating; "
                             "default: as the training run did (a pre-quantized base folder loads as it is)")
    parser.add_argument("--quantization", choices=["nf4", "int8"], default=None,
                        help="bitsandbytes NF4 / LLM.int8() base (default: as the training run did)")
    parser.add_argument("--max_len", type=int, default=None, help="default: the training run's (768)")
    parser.add_argument("--max_src_len", type=int, default=None, help="default: the training run's (450)")
    parser.add_argument("--prompt_text", default=None, help="default: the training run's prompt")
    parser.add_argument("--batch_size", type=int, default=None, help="rows generated together (default: on a GPU as "
                        "many as the free memory holds the cache of, all 50 spo rows on a 24 GB card with ChatGLM-6B "
                        "in bf16; 16 on the CPU)")
    parser.add_argument("--decoder", choices=["static", "generate"], default="static",
                        help="static: preallocated cache, each step one CUDA graph on a GPU; generate: transformers' "
                             "generate() (slower, same tokens)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: max_len - max_src_len - 3")
    parser.add_argument("--ignore_eos", action="store_true", help="for benchmarks: every row generates "
                        "--max_new_tokens tokens, stop tokens or not (the scores then mean nothing)")
    parser.add_argument("--task", choices=["triple", "classification", "generation"], default=None,
                        help="the score: default the training run's --task, else triple")
    parser.add_argument("--output_dir", default=None, help="for predictions.jsonl and metrics.json "
                        "(default: the checkpoint folder)")
    parser.add_argument("--mode", default=None, help="model family, if not the one read from the model folder")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip and count bad rows instead of stopping")
    parser.add_argument("--resume", action="store_true", help=f"keep the rows an interrupted run left in "
                        f"{PARTIAL_FILE} (in the output folder) and generate only the others")
    method.add_arguments(parser)
    return parser


def resolve_checkpoint(path, method_name, takes_model_folders=False):
    """The checkpoint folder a --model_dir names (a training output folder means its latest checkpoint), refused in
    one line when it is a base model folder (unless the method takes those) or another method's checkpoint."""
    if not os.path.isdir(path):
        raise SystemExit(f"error: {path}: checkpoint folder not found (train first, or pass --model_dir)")
    folder = latest_checkpoint(path) or path
    try:
        trained_by = saved_training_args(checked_checkpoint(folder)).get("method")
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if trained_by and trained_by != method_name:
        raise SystemExit(f"error: {folder} is a checkpoint of finetuning_{trained_by}.py; predict with it through "
                         f"predict_{trained_by}.py")
    if not trained_by and not takes_model_folders and looks_like_base_model(folder):
        raise SystemExit(f"error: {folder} is a base model folder, not a checkpoint: pass the checkpoint (or the "
                         f"training --output_dir) as --model_dir, and this folder as --ori_model_dir if the "
                         "checkpoint does not name it")
    return folder


def looks_like_base_model(folder):
    """A model folder (config.json of a known family and weights) without a trace of fine-tuning in it."""
    from model_family import ModelFolderError, check_weight_files, family_for
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return False
    try:
        family_for(folder)
        check_weight_files(folder)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return not json.load(f).get("pre_seq_len")
    except (ModelFolderError, OSError, ValueError):
        return False


def fill_defaults(args, saved, checkpoint):
    """Unset arguments take the training run's values, then the reference defaults."""
    fallback = {"max_len": 768, "max_src_len": 450, "prompt_text": DEFAULT_PROMPT, "mode": None, "task": "triple",
                "quantization_bit": None, "quantization": None}
    for key, value in fallback.items():
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, value))
    try:
        args.ori_model_dir = trained_base(checkpoint, saved, args.ori_model_dir)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if args.max_new_tokens is None:
        args.max_new_tokens = args.max_len - args.max_src_len - 3
        if args.max_new_tokens < 1:
            raise SystemExit(f"error: --max_len {args.max_len} - --max_src_len {args.max_src_len} leaves no room for "
                             "new tokens; set --max_new_tokens, or a --max_len above --max_src_len + 3")
    elif args.max_new_tokens < 1:
        raise SystemExit(f"error: --max_new_tokens {args.max_new_tokens}: must be at least 1")


def pick_device(device_arg):
    if device_arg is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device_arg == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device_arg}: no GPU here; use --device cpu")
    return torch.device(f"cuda:{int(device_arg)}")


def pick_dtype(dtype_arg, device):
    if dtype_arg:
        return DTYPES[dtype_arg]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, stop_ids, progress=None,
             decoder="static", on_batch=None):
    """Greedy continuation of each prompt (token lists); returns (new token ids up to the stop token) per prompt.

    Rows are batched longest first, so that a batch holds rows of similar length, and returned in input order.
    `decoder`: "static" (decoding.py: preallocated cache, the step a CUDA graph on a GPU) or "generate"
    (transformers' generate); both give the same tokens. `on_batch(indices, tokens)` sees each batch when done.
    """
    from decoding import greedy_decode, left_pad
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in chosen], tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if decoder == "static":
            new = greedy_decode(model, input_ids, attention_mask, max_new_tokens, stop_ids,
                                text_ids=text_ids(tokenizer))
        else:
            # no stop tokens (--ignore_eos): every row runs to max_new_tokens
            new = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=0 if stop_ids else max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids or None, pad_token_id=tokenizer.pad_token_id,
                                 suppress_tokens=ids_without_token(model, tokenizer))[:, input_ids.shape[1]:]
        for row, i in zip(new.tolist(), chosen):
            ends = [k for k, t in enumerate(row) if t in stop_ids]
            results[i] = row[:ends[0]] if ends else row
        if on_batch is not None:
            on_batch(chosen, [results[i] for i in chosen])
        if progress is not None:
            progress.update(len(chosen))
    return results


def token_count(tokenizer):
    """Ids that stand for a token: a tokenizer.json's vocab_size leaves out its added (special) tokens."""
    return max(tokenizer.vocab_size, len(tokenizer))


def text_ids(tokenizer):
    """The ids generation may choose: the tokenizer's, without ChatGLM-6B's image tokens (ids 0 .. 19,999, which
    decode to nothing: a real ChatGLM-6B never writes them in a text answer, an undertrained one can write nothing
    else) and without a padded output layer's extra ids (decoding.text_logits)."""
    return range(getattr(tokenizer, "num_image_tokens", 0), token_count(tokenizer))


def ids_without_token(model, tokenizer):
    """Output ids generate() must never choose: those outside text_ids (image tokens, a padded vocabulary's rest)."""
    outputs, allowed = model.get_output_embeddings().weight.shape[0], text_ids(tokenizer)
    return list(range(allowed.start)) + list(range(allowed.stop, outputs)) or None


def auto_batch_size(model, prompts, max_new_tokens, device, rows_on_cpu=16):
    """Rows per batch: on a GPU as many as the free memory holds the KV cache and the prefill's activations of (with
    a 25% margin), at most all rows; on the CPU `rows_on_cpu`."""
    from decoding import cache_bytes_per_token
    if device.type != "cuda":
        return rows_on_cpu
    config = model.config
    element = model.get_input_embeddings().weight.element_size()
    longest = max(map(len, prompts)) + max_new_tokens + 64
    cache_per_row = cache_bytes_per_token(config, element) * longest
    # the prefill of one row: the MLP's widest activation and the logits of one token, a few times over
    width = getattr(config, "ffn_hidden_size", None) or getattr(config, "inner_hidden_size", 4 * config.hidden_size)
    prefill_per_row = 4 * longest * width * element
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(0.75 * free // (cache_per_row + prefill_per_row))
    return max(1, min(len(prompts), fit))


def warn_if_task_looks_wrong(task, rows):
    """Triple F1 over references that hold no triple is 1.0 for empty answers and 0 elsewhere: say so."""
    from metrics import parse_triples
    if task == "triple" and not any(parse_triples(a) for row in rows for a in row.answers if a):
        print(f"warning: --task triple, but none of the {len(rows)} references holds a triple (a line "
              "subject_relation_object); use --task classification or generation for other data")


def warn_if_mostly_empty(generated, new_tokens):
    """Half the answers or more empty: said, since the score alone (0) does not say why."""
    empty = [i for i, text in enumerate(generated) if not text.strip()]
    if len(empty) * 2 >= len(generated) > 0:
        produced = sum(len(new_tokens[i]) for i in empty)
        print(f"warning: {len(empty)} of {len(generated)} predictions are empty ({produced:,} tokens generated for "
              "them decode to no text): the model has not learned the answers' form yet (train longer, check "
              "--prompt_text and the data), or a stop token comes first", flush=True)


def write_outputs(output_dir, rows, generated, scores, summary):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for row, text, score in zip(rows, generated, scores):
            reference = row.answers if len(row.answers) > 1 else row.answers[0]
            record = {"text": row.text, "reference": reference, "generated": text, "score": round(score, 6)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)


def main(method, argv=None):
    import signal
    args = build_parser(method).parse_args(argv)
    # Ctrl-C and `kill -INT` stop a prediction (started in the background, it inherits SIGINT ignored), and so does
    # SIGTERM: the rows generated so far stay in the partial file
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))
    try:
        return predict(method, args)
    except KeyboardInterrupt:
        output_dir = args.output_dir or (resolve_checkpoint(args.model_dir, method.name) if args.model_dir else ".")
        print(f"\ninterrupted: the rows generated so far are in {os.path.join(output_dir, PARTIAL_FILE)}; run the "
              "same command with --resume to generate only the others", flush=True)
        raise SystemExit(130)


def load_for_prediction(method, args, checkpoint, device, dtype):
    """Family, tokenizer, test rows, their prompts, and the model; bad input stops with one line."""
    from data_set import DataError, encode_prompt, read_rows
    from model_family import ModelFolderError, family_for, load_tokenizer
    try:
        family = family_for(args.ori_model_dir, args.mode)
        tokenizer = load_tokenizer(args.ori_model_dir, family)
        rows = read_rows(args.test_path, args.prompt_text, args.skip_bad_rows, allow_empty_answer=True)
        prompts = [encode_prompt(tokenizer, family, row, args.max_src_len, args.test_path) for row in rows]
        model = method.load(args.ori_model_dir, checkpoint, args, family, dtype).to(device).eval()
    except (ModelFolderError, DataError) as err:
        raise SystemExit(f"error: {err}")
    return family, tokenizer, rows, prompts, model


def predict(method, args):
    from tqdm import tqdm

    from metrics import TASKS
    checkpoint = resolve_checkpoint(args.model_dir, method.name, method.takes_model_folders)
    if method.checkpoint_is_model and args.ori_model_dir is None:
        args.ori_model_dir = checkpoint
    fill_defaults(args, saved_training_args(checkpoint), checkpoint)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    family, tokenizer, rows, prompts, model = load_for_prediction(method, args, checkpoint, device, dtype)
    warn_if_task_looks_wrong(args.task, rows)
    batch_size = args.batch_size or auto_batch_size(model, prompts, args.max_new_tokens, device)
    output_dir = args.output_dir or checkpoint
    lock = OutputFolderLock(output_dir, "a prediction", "--output_dir")  # noqa: F841 (held until the end)
    partial_path = os.path.join(output_dir, PARTIAL_FILE)
    start = time.time()
    with tqdm(total=len(rows), desc=f"predict (batches of {batch_size})", unit="row") as bar:
        def generate_rows(indices, on_batch):
            stop_ids = [] if args.ignore_eos else family.stop_token_ids(tokenizer)
            return generate(model, tokenizer, [prompts[i] for i in indices], args.max_new_tokens, batch_size,
                            device, stop_ids, bar, args.decoder, on_batch)
        new_tokens, todo, fresh = generate_keeping_partial(partial_path, rows, args.resume, generate_rows, bar)
    seconds = max(time.time() - start, 1e-9)
    generated = [family.answer_text(tokenizer.decode(t, skip_special_tokens=True)) for t in new_tokens]
    warn_if_mostly_empty(generated, new_tokens)
    scores, summary = TASKS[args.task](generated, [row.answers for row in rows])
    summary = {"task": args.task, **{k: round(v, 6) for k, v in summary.items()}, "rows": len(rows),
               "generated_rows": len(todo), "seconds": round(seconds, 3), "rows_per_s": round(len(todo) / seconds, 3),
               "generated_tokens_per_s": round(sum(map(len, fresh)) / seconds, 1), "batch_size": batch_size,
               "checkpoint": checkpoint, "base_model": args.ori_model_dir}
    write_outputs(output_dir, rows, generated, scores, summary)
    os.remove(partial_path)
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return summary


def generate_keeping_partial(partial_path, rows, resume, generate_rows, bar):
    """Tokens of every row, each batch appended to `partial_path` as soon as it exists; with `resume`, the rows an
    interrupted run left there are kept and not generated again. `generate_rows(indices, on_batch)` generates the
    given rows. Returns (tokens per row, the indices generated now, their tokens)."""
    from data_set import DataError
    try:
        kept = read_partial(partial_path, rows) if resume else {}
    except DataError as err:
        raise SystemExit(f"error: {err}")
    todo = [i for i in range(len(rows)) if i not in kept]
    if not resume and os.path.isfile(partial_path):
        print(f"starting over: {partial_path} (rows of an interrupted run) is replaced; --resume would keep them")
    if kept:
        print(f"--resume: {len(kept)} rows from {partial_path}, {len(todo)} to generate")
        bar.update(len(kept))
    with open(partial_path, "w", encoding="utf-8") as partial:
        def keep(indices, tokens):
            for i, t in zip(indices, tokens):
                partial.write(json.dumps({"index": i, "text": rows[i].text, "tokens": t}, ensure_ascii=False) + "\n")
            partial.flush()
        keep(list(kept), list(kept.values()))  # what is kept is written again, whole lines only
        fresh = generate_rows(todo, lambda chosen, tokens: keep([todo[c] for c in chosen], tokens))
    kept.update(zip(todo, fresh))
    return [kept[i] for i in range(len(rows))], todo, fresh


def read_partial(path, rows):
    """{row index: tokens} that an interrupted run wrote; each line must still match its test row."""
    from data_set import DataError
    done = {}
    if not os.path.isfile(path):
        return done
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                index, tokens = record["index"], record["tokens"]
            except (ValueError, KeyError, TypeError):
                if not line.endswith("\n"):  # the run was killed while writing this line: generate the row again
                    break
                raise DataError(f"{path}:{number}: not a line this script wrote; delete the file or drop --resume")
            if not (0 <= index < len(rows)) or rows[index].text != record.get("text"):
                raise DataError(f"{path}:{number}: row {index} does not match the test file; it was written for "
                                "other test rows: delete it or drop --resume")
            done[index] = tokens
    return done


def load_partial_state(model, folder, required_prefix=""):
    """Put the parameters saved in `folder` (model.safetensors or an official pytorch_model.bin) into `model`.

    Every saved name must exist in the model with the same shape and start with `required_prefix`."""
    from safetensors.torch import load_file
    path = next((os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(folder, n))), None)
    if path is None:
        raise SystemExit(f"error: {folder}: no model.safetensors or pytorch_model.bin with trained weights")
    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                             weights_only=True)
    own = model.state_dict()
    foreign = [k for k in state if k not in own or not k.startswith(required_prefix)]
    if foreign or not state:
        raise SystemExit(f"error: {path}: holds {len(state)} tensors, of which these are not "
                         f"{required_prefix or 'model'} parameters: {foreign[:6]}")
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise SystemExit(f"error: {path}: shapes differ from the model's: {'; '.join(wrong[:4])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return sorted(state)
