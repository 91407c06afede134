"""Talk to a base model or a fine-tuned checkpoint: streamed answers, multi-turn history.

    python chat.py --model_dir output_dir_lora            # a checkpoint (or a training output folder): task format
    python chat.py --model_dir ChatGLM-6B --device 0      # a base folder: the family's official chat template
    python chat.py --model_dir output_dir_lora --input turns.jsonl --greedy > answers.jsonl

Type a message and press Enter. `clear` (清空) empties the history, `stop` (退出) or Ctrl-D leaves, Ctrl-C stops the
answer being written and keeps what was said. Prompt formats (`--format`):
- chat: each family's official chat template, token for token what THUDM's chat()/stream_chat() builds (ChatGLM-6B
  `[Round N]\\n问：...\\n答：`, ChatGLM2 `[Round N]\\n\\n问：...\\n\\n答：`, ChatGLM3 and GLM-4 role tokens, `--system`);
- task: the layout the suite trained on: `--prompt_text` + the message, then the family's markers (the default for a
  checkpoint, so a task model answers as in predict; with --greedy the answer equals predict's for the same row).
  Task models learned single turns, so only the message goes in; a ChatGLM3 checkpoint trained on conversations gets
  the conversation so far in its training layout.
`--input FILE`: one {"query": ...} per line, one conversation in order ({"clear": true} empties the history); one
{"query": ..., "response": ...} line per query goes to stdout (or --output).
"""
import argparse
import json
import os
import sys

import torch

from checkpoints import latest_checkpoint, saved_training_args
from prediction import DTYPES, pick_device, pick_dtype

# the official chat() defaults: ChatGLM-6B top_p 0.7, temperature 0.95; ChatGLM2/3 0.8 and 0.8
SAMPLING_DEFAULTS = {"chatglm": (0.7, 0.95), "chatglm2": (0.8, 0.8), "chatglm3": (0.8, 0.8), "glm4": (0.8, 0.8),
                     "glm4-hf": (0.8, 0.8), "glm4-0414": (0.8, 0.8)}
CLEAR, STOP = ("clear", "清空"), ("stop", "退出", "exit", "quit")


# ---- prompts ----------------------------------------------------------------------------------------------------

def chat_prompt_ids(tokenizer, family, history, query, system=None):
    """Token ids of the family's official chat template for `history` [(query, response), ...] and `query`."""
    if family.tokenizer_chat_template:  # transformers' GLM folders: the template their tokenizer carries
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": role, "content": text} for q, r in history for role, text in (("user", q), ("assistant", r))] + \
            [{"role": "user", "content": query}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if family.name == "chatglm":  # chat(): the query alone, or rounds counted from 0; [gMASK] <sop> after
        if not history:
            text = query
        else:
            text = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
            text += f"[Round {len(history)}]\n问：{query}\n答："
        return tokenizer.encode(text, add_special_tokens=True)
    if family.name == "chatglm2":  # build_prompt(): rounds counted from 1; [gMASK] sop before
        text = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
        text += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return tokenizer.encode(text, add_special_tokens=True)
    # ChatGLM3 build_chat_input() and GLM-4's chat template: [gMASK] sop, each message as <|role|> metadata\n content,
    # then <|assistant|>
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    if system:
        ids += tokenizer.build_single_message("system", "", system)
    for q, r in history:
        ids += tokenizer.build_single_message("user", "", q) + tokenizer.build_single_message("assistant", "", r)
    return ids + tokenizer.build_single_message("user", "", query) + [tokenizer.get_command("<|assistant|>")]


def has_roles(family):
    """A chat family with role tokens (ChatGLM3, the GLM-4 families): system prompts and conversation rows."""
    return family.build_conversation_prompt is not None


def task_prompt_ids(tokenizer, family, history, query, prompt_text, max_src_len, conversations=False):
    """The layout the suite trained on: prediction's prompt for a row with this text (or, for a model trained on
    ChatGLM3 conversations, the conversation so far)."""
    from data_set import Row, encode_prompt, text_row
    if conversations:
        turns = [turn for q, r in history for turn in (("user", q), ("assistant", r))]
        row = Row("", query, [""], 0, turns=turns + [("user", query), ("assistant", "")])
    else:
        row = text_row(prompt_text, query, [""], 0)
    return encode_prompt(tokenizer, family, row, max_src_len)


# ---- generation -------------------------------------------------------------------------------------------------

class Printer:
    """A transformers streamer: after each new token, the answer's new text goes to `write`."""

    def __init__(self, tokenizer, family, prompt_length, write):
        self.tokenizer, self.family, self.write = tokenizer, family, write
        self.skip, self.ids, self.shown = prompt_length, [], ""

    def put(self, value):
        value = value.reshape(-1).tolist()
        if self.skip:  # the first call carries the prompt
            self.skip = 0
            return
        self.ids += value
        # a byte-level BPE (GLM-4) can end on part of a character, decoded as U+FFFD until its other bytes come
        self.show(self.text().rstrip("\ufffd"))

    def show(self, text):
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text

    def text(self):
        return self.family.answer_text(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self):
        self.show(self.text())


@torch.no_grad()
def answer(model, tokenizer, family, prompt_ids, sampling, max_new_tokens, write=None):
    """Generate an answer to `prompt_ids`, streaming its text to `write`; Ctrl-C ends it early. Returns
    (answer text, whether it was interrupted)."""
    from prediction import ids_without_token
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    printer = Printer(tokenizer, family, len(prompt_ids), write or (lambda text: None))
    interrupted = False
    try:
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                       eos_token_id=family.stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       suppress_tokens=ids_without_token(model, tokenizer), streamer=printer, **sampling)
    except KeyboardInterrupt:
        interrupted = True
    stops = set(family.stop_token_ids(tokenizer))
    ids = printer.ids[:next((i for i, t in enumerate(printer.ids) if t in stops), len(printer.ids))]
    return family.answer_text(tokenizer.decode(ids, skip_special_tokens=True)), interrupted


def sampling_settings(args, family):
    if args.greedy or args.temperature == 0:
        return {"do_sample": False, "repetition_penalty": args.repetition_penalty}
    top_p, temperature = SAMPLING_DEFAULTS[family.name]
    return {"do_sample": True, "top_p": args.top_p if args.top_p is not None else top_p,
            "temperature": args.temperature if args.temperature is not None else temperature,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}


# ---- loading ----------------------------------------------------------------------------------------------------

def load_for_chat(args):
    """(model, tokenizer, family, training args or {}) for --model_dir: a base folder or any of our checkpoints."""
    from checkpoints import CheckpointError, checked_checkpoint, trained_base
    from model_family import ModelFolderError, family_for, load_model, load_tokenizer
    if not os.path.isdir(args.model_dir):
        raise SystemExit(f"error: {args.model_dir}: folder not found")
    folder = latest_checkpoint(args.model_dir) or args.model_dir
    try:
        saved = saved_training_args(checked_checkpoint(folder))
        base = None if not saved or checkpoint_loader(saved["method"]).checkpoint_is_model else \
            trained_base(folder, saved, args.ori_model_dir)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.quantization_bit is None:
        args.quantization_bit = saved.get("quantization_bit")
    if args.quantization is None:
        args.quantization = saved.get("quantization")
    try:
        if not saved:  # a base model folder
            family = family_for(folder, args.mode)
            model = load_model(folder, family, dtype=dtype, quantization_bit=args.quantization_bit or 0,
                               bnb_quantization=args.quantization)
            base = folder
        else:
            loader = checkpoint_loader(saved["method"])
            base = folder if loader.checkpoint_is_model else base
            family = family_for(base, args.mode or saved.get("mode"))
            model = loader.load(base, folder, argparse.Namespace(
                no_merge=False, quantization_bit=args.quantization_bit, quantization=args.quantization,
                pre_seq_len=None, prefix_projection=None),
                family, dtype)
        tokenizer = load_tokenizer(base, family)
    except ModelFolderError as err:
        raise SystemExit(f"error: {err}")
    return model.to(device).eval(), tokenizer, family, saved


def checkpoint_loader(method):
    if method == "lora":
        from predict_lora import LoRAPredict
        return LoRAPredict()
    if method == "pt":
        from predict_pt import PTuningPredict
        return PTuningPredict()
    if method == "full":
        from predict_full import FullPredict
        return FullPredict()
    from predict_freeze import FreezePredict
    return FreezePredict()


class Conversation:
    """The history and how a query becomes prompt ids, by --format."""

    def __init__(self, tokenizer, family, args, saved):
        self.tokenizer, self.family, self.args = tokenizer, family, args
        self.prompt_text = args.prompt_text if args.prompt_text is not None else saved.get("prompt_text", "")
        self.max_src_len = saved.get("max_src_len", 10 ** 6) if args.max_src_len is None else args.max_src_len
        self.conversations = family.build_conversation_prompt is not None and trained_on_conversations(saved)
        self.history = []

    def prompt_ids(self, query, history=None, system=None):
        """`history` and `system` default to this conversation's (serve.py passes each request's own)."""
        history = self.history if history is None else history
        if self.args.format == "chat":
            return chat_prompt_ids(self.tokenizer, self.family, history, query, system or self.args.system)
        return task_prompt_ids(self.tokenizer, self.family, history if self.conversations else [], query,
                               self.prompt_text, self.max_src_len, self.conversations)

    def whole_prompt_ids(self, query, history, system=None):
        """(the prompt's ids with nothing cut, whether they fit the trained --max_src_len): serve.py refuses a
        prompt that the task format would cut, where chat.py cuts it as prediction does."""
        if self.args.format == "chat":
            return chat_prompt_ids(self.tokenizer, self.family, history, query, system or self.args.system), True
        history = history if self.conversations else []
        whole = task_prompt_ids(self.tokenizer, self.family, history, query, self.prompt_text, 10 ** 9,
                                self.conversations)
        return whole, whole == self.prompt_ids(query, history)


def trained_on_conversations(saved):
    """Whether the training file held conversation rows (its first row says)."""
    path = saved.get("train_path")
    if not path or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    return '"conversations"' in first


# ---- the two ways of talking ------------------------------------------------------------------------------------

def run_file(conversation, model, args, sampling):
    """--input: each {"query"} line answered in order, {"clear": true} empties the history."""
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    with open(args.input, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                turn = json.loads(line)
                if not isinstance(turn, dict) or not (turn.get("clear") or isinstance(turn.get("query"), str)):
                    raise ValueError('expected {"query": "..."} or {"clear": true}')
            except ValueError as err:
                raise SystemExit(f"error: {args.input}:{number}: {err}") from None
            if turn.get("clear"):
                conversation.history = []
                continue
            text, _ = answer(model, conversation.tokenizer, conversation.family, conversation.prompt_ids(turn["query"]),
                             sampling, args.max_new_tokens)
            conversation.history.append((turn["query"], text))
            out.write(json.dumps({"query": turn["query"], "response": text}, ensure_ascii=False) + "\n")
            out.flush()
    if args.output:
        out.close()


def run_interactive(conversation, model, args, sampling):
    print(f"{conversation.family.name}, {args.format} format. 输入内容即可对话，clear 清空对话历史，stop 或 Ctrl-D 退出，"
          "Ctrl-C 停止当前回答。\nType a message; clear empties the history, stop or Ctrl-D leaves, Ctrl-C stops an "
          "answer.", flush=True)
    while True:
        try:
            query = input("\n用户 / User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if query.strip() in STOP:
            return
        if query.strip() in CLEAR:
            conversation.history = []
            print("(history cleared / 对话历史已清空)", flush=True)
            continue
        if not query.strip():
            continue
        print("\nChatGLM: ", end="", flush=True)
        text, interrupted = answer(model, conversation.tokenizer, conversation.family, conversation.prompt_ids(query),
                                   sampling, args.max_new_tokens, write=lambda t: print(t, end="", flush=True))
        print(" [stopped / 已停止]" if interrupted else "", flush=True)
        conversation.history.append((query, text))


def add_model_arguments(parser):
    """What chat.py and serve.py load and how a message becomes a prompt."""
    parser.add_argument("--model_dir", required=True, help="a base model folder, a checkpoint, or a training "
                        "output folder (its latest checkpoint)")
    parser.add_argument("--ori_model_dir", default=None, help="the base of a checkpoint (default: the one it names)")
    parser.add_argument("--device", default=None, help="GPU index, or cpu (default: GPU 0 if there is one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--quantization_bit", type=int, choices=[8, 4], default=None,
                        help="INT8/INT4 base (default: as the checkpoint was trained)")
    parser.add_argument("--quantization", choices=["nf4", "int8"], default=None,
                        help="bitsandbytes NF4 / LLM.int8() base (default: as the checkpoint was trained)")
    parser.add_argument("--mode", default=None, help="model family, if not the one read from the folder")
    parser.add_argument("--format", choices=["chat", "task"], default=None,
                        help="chat: the official chat template; task: the trained layout (default: task for a "
                             "checkpoint, chat for a base folder)")
    parser.add_argument("--system", default=None, help="a system message (ChatGLM3, GLM-4; chat format)")
    parser.add_argument("--prompt_text", default=None, help="task format: put before each message (default: the "
                        "training run's)")
    parser.add_argument("--max_src_len", type=int, default=None, help="task format: default the training run's")


def add_sampling_arguments(parser):
    parser.add_argument("--top_p", type=float, default=None, help="default: the family's official (0.7 / 0.8)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the family's official "
                        "(0.95 / 0.8); 0 means greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--max_new_tokens", type=int, default=1024)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (as predict)")
    add_sampling_arguments(parser)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="for repeatable sampling")
    parser.add_argument("--input", default=None, help="a JSONL file of turns: answer them and exit")
    parser.add_argument("--output", default=None, help="with --input: write the answers here, not to stdout")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.input and not os.path.isfile(args.input):
        raise SystemExit(f"error: {args.input}: file not found")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer, family, saved = load_for_chat(args)
    if args.format is None:
        args.format = "task" if saved else "chat"
    if args.system and (args.format != "chat" or not has_roles(family)):
        raise SystemExit("error: --system needs a model with chat roles (ChatGLM3, GLM-4) and --format chat")
    conversation = Conversation(tokenizer, family, args, saved)
    sampling = sampling_settings(args, family)
    if args.input:
        run_file(conversation, model, args, sampling)
    else:
        run_interactive(conversation, model, args, sampling)


if __name__ == "__main__":
    main()
