"""Training and test data: reading rows, laying them out in tokens, batching.

Rows come from a JSONL file (one object per line) or a JSON file holding one array of objects, in either form:
- `{"text": ..., "answer": ...}`: the source is `--prompt_text` followed by the text (the reference layout);
- `{"instruction": ..., "input": ..., "output": ...}`: the row's instruction is the prompt; `output` may be a list
  of references (test sets); training uses the first;
- `{"conversations": [{"role": "system"|"user"|"assistant"|"observation", "content": ...}, ...]}`: a multi-turn
  chat (ChatGLM3, GLM-4). Training learns every assistant turn; prediction continues the turns before the last
  assistant turn, which is the reference. `--prompt_text` does not apply (a system turn can hold one).

The token layout is the model family's (ChatGLM-6B: `prompt+text [gMASK] <sop> answer <eop>`; ChatGLM2:
`[gMASK] sop prompt+text answer eos`; ChatGLM3, GLM-4: their chat layout, see model_family.py). As in the reference, the
text is cut so that prompt + text fit `max_src_len` and the answer fits what is left of `max_len`; a conversation
is cut at `max_len`. Labels are -100 on the context. Batches are padded to their own longest row only.
"""
import json
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset, Sampler


def round_up(n, multiple):
    """`n` rounded up to a multiple of `multiple` (unchanged when `multiple` is 0 or None)."""
    return -(-n // multiple) * multiple if multiple else n


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


class SkippedRows:
    """Rows --skip_bad_rows left out, counted by reason, for one line that says why and where."""

    def __init__(self, path):
        self.path, self.lines_by_reason = path, {}

    def add(self, line, reason):
        self.lines_by_reason.setdefault(reason, []).append(line)

    def __len__(self):
        return sum(map(len, self.lines_by_reason.values()))

    def report(self, log, what):
        if not self:
            return
        reasons = sorted(self.lines_by_reason.items(), key=lambda item: -len(item[1]))
        parts = [f"{len(lines)} x {reason} (line{'s' if len(lines) > 1 else ''} "
                 f"{', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''})" for reason, lines in reasons[:4]]
        more = f"; {len(reasons) - 4} other reasons" if len(reasons) > 4 else ""
        log(f"{self.path}: skipped {len(self)} {what}: {'; '.join(parts)}{more}")


@dataclass
class Row:
    prompt: str
    text: str
    answers: list  # one or more reference answers
    line: int  # 1-based line (JSONL) or element index + 1 (JSON array)
    raw: dict = field(repr=False, default=None)
    turns: list = None  # conversation rows: [(role, content), ...]; None for single-turn rows
    suffix: str = ""  # what follows the text (a --prompt_text with a {text} placeholder)


TEXT_PLACEHOLDER = "{text}"


def text_row(prompt_text, text, answers, line, raw=None):
    """A text/answer row: `prompt_text` before the text, or around it where it holds the {text} placeholder (the
    rest of the prompt is kept as it is: no other braces are read)."""
    prompt, placeholder, suffix = prompt_text.partition(TEXT_PLACEHOLDER)
    return Row(prompt, text, answers, line, raw, suffix=suffix if placeholder else "")


CHAT_ROLES = ("system", "user", "assistant", "observation")


def parse_conversation(turns, allow_empty_answer):
    """[(role, content)] of a `conversations` list, or raise ValueError saying what is wrong."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of {\"role\", \"content\"} objects")
    parsed = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or turn.get("role") not in CHAT_ROLES:
            raise ValueError(f"conversation turn {i}: expected {{\"role\": one of {', '.join(CHAT_ROLES)}, "
                             f"\"content\": a string}}, got {json.dumps(turn, ensure_ascii=False)[:80]}")
        parsed.append((turn["role"], turn["content"]))
    answers = [content for role, content in parsed if role == "assistant"]
    if not answers:
        raise ValueError("conversation without an assistant turn (nothing to learn or to predict)")
    if not (allow_empty_answer or any(a.strip() for a in answers)):
        raise ValueError("empty answer")
    return parsed


def parse_row(obj, prompt_text, allow_empty_answer=False):
    """(prompt, text, answers) of one row object, or raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "instruction" in obj or "output" in obj:
        missing = [k for k in ("instruction", "output") if k not in obj]
        if missing:
            raise ValueError(f"instruction row without {', '.join(repr(k) for k in missing)}")
        prompt, text, answers = obj["instruction"], obj.get("input", ""), obj["output"]
    elif "text" in obj or "answer" in obj:
        missing = [k for k in ("text", "answer") if k not in obj]
        if missing:
            raise ValueError(f"row without {', '.join(repr(k) for k in missing)}")
        prompt, text, answers = prompt_text, obj["text"], obj["answer"]
    else:
        raise ValueError(f"row has neither text/answer nor instruction/input/output fields (keys: {sorted(obj)})")
    answers = answers if isinstance(answers, list) else [answers]
    if not all(isinstance(x, str) for x in [prompt, text] + answers):
        raise ValueError("text, prompt and answer fields must be strings")
    if not answers or not (allow_empty_answer or any(a.strip() for a in answers)):
        raise ValueError("empty answer")
    return prompt, text, answers


def make_row(obj, line, prompt_text, allow_empty_answer):
    if isinstance(obj, dict) and "conversations" in obj:
        turns = parse_conversation(obj["conversations"], allow_empty_answer)
        last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
        asked = [content for role, content in turns[:last] if role == "user"]
        return Row("", asked[-1] if asked else "", [turns[last][1]], line, obj, turns)
    prompt, text, answers = parse_row(obj, prompt_text, allow_empty_answer)
    if "instruction" in obj:
        return Row(prompt, text, answers, line, obj)
    return text_row(prompt_text, text, answers, line, obj)


def row_place(path, number, in_array):
    """Where a row is, as an error names it: `file:line` in JSONL, `file: element N` in a JSON array."""
    return f"{path}: element {number}" if in_array else f"{path}:{number}"


def read_rows(path, prompt_text="", skip_bad=False, log=print, allow_empty_answer=False):
    """Rows of a .jsonl or .json file. Bad rows raise DataError naming file and line, or are skipped and counted.

    An empty answer is bad in training data; a test set may have rows whose reference is empty (no triples)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        content = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark (Windows Notepad) is not a row
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as "
                        "UTF-8") from None
    if not content.strip():
        raise DataError(f"{path}: empty file, no rows")
    in_array = content.lstrip().startswith("[")
    if in_array:
        try:
            items = [(i + 1, obj, None) for i, obj in enumerate(json.loads(content))]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to be rows") from None
    else:
        items = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    items.append((number, json.loads(line), None))
                except json.JSONDecodeError as err:
                    items.append((number, None, f"not valid JSON ({err.msg})"))
                except RecursionError:
                    items.append((number, None, "JSON nested too deeply to be a row"))
    rows, skipped = [], SkippedRows(path)
    for number, obj, error in items:
        if error is None:
            try:
                rows.append(make_row(obj, number, prompt_text, allow_empty_answer))
            except ValueError as err:
                error = str(err)
        if error is not None:
            if not skip_bad:
                raise DataError(f"{row_place(path, number, in_array)}: {error} (use --skip_bad_rows to skip such rows)")
            skipped.add(number, error)
    skipped.report(log, "bad row(s)")
    if not rows:
        raise DataError(f"{path}: no usable rows")
    return rows


def encode_source(tokenizer, row, max_src_len, path="data"):
    """Prompt tokens + text tokens (+ the prompt's part after a {text} placeholder), the text cut so that all fit
    max_src_len. Returns (ids, was_truncated)."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
    prompt_ids, suffix_ids = encode(row.prompt), encode(row.suffix)
    if len(prompt_ids) + len(suffix_ids) >= max_src_len:
        raise DataError(f"{path}:{row.line}: the prompt alone is {len(prompt_ids) + len(suffix_ids)} tokens, leaving "
                        f"no room for the text within --max_src_len {max_src_len}; raise --max_src_len or shorten "
                        "the prompt")
    text_ids = encode(row.text)
    room = max(max_src_len - len(prompt_ids) - len(suffix_ids), 0)
    return prompt_ids + text_ids[:room] + suffix_ids, len(text_ids) > room


def encode_turns(tokenizer, turns):
    return [(role, tokenizer.encode(content, add_special_tokens=False) if content else []) for role, content in turns]


def chat_family_or_error(family, row, path):
    if family.build_conversation_ids is None:
        raise DataError(f"{path}:{row.line}: a conversation row needs a chat model (ChatGLM3, GLM-4); the "
                        f"{family.name} family has no chat layout; use text/answer or instruction/output rows")


def encode_training_row(tokenizer, family, row, max_len, max_src_len, path="data"):
    """(input_ids, labels, was_truncated) of one training row in the family's layout."""
    if row.turns is not None:
        chat_family_or_error(family, row, path)
        input_ids, labels = family.build_conversation_ids(tokenizer, encode_turns(tokenizer, row.turns))
        if all(label == -100 for label in labels[:max_len]):
            raise DataError(f"{path}:{row.line}: no assistant token within --max_len {max_len}; raise --max_len or "
                            "shorten the turns before the first answer")
        return input_ids[:max_len], labels[:max_len], len(input_ids) > max_len
    source_ids, cut = encode_source(tokenizer, row, max_src_len, path)
    max_answer_len = max_len - max_src_len - family.layout_overhead(tokenizer)
    answer_ids = tokenizer.encode(row.answers[0], add_special_tokens=False)
    input_ids, labels = family.build_training_ids(tokenizer, source_ids, answer_ids[:max_answer_len])
    return input_ids, labels, cut or len(answer_ids) > max_answer_len


def encode_prompt(tokenizer, family, row, max_src_len, path="data"):
    """The token ids generation continues: the source in the family's layout, or a conversation up to the last
    assistant turn. A conversation too long for `max_src_len` loses its oldest turns (a first system turn stays),
    then the last turn is cut short."""
    if row.turns is None:
        return family.build_prompt_ids(tokenizer, encode_source(tokenizer, row, max_src_len, path)[0])
    chat_family_or_error(family, row, path)
    last = max(i for i, (role, _) in enumerate(row.turns) if role == "assistant")
    turns = encode_turns(tokenizer, row.turns[:last])
    kept = 1 if turns and turns[0][0] == "system" else 0
    prompt = family.build_conversation_prompt(tokenizer, turns)
    while len(prompt) > max_src_len and len(turns) > kept + 1:
        del turns[kept]
        prompt = family.build_conversation_prompt(tokenizer, turns)
    if len(prompt) > max_src_len and turns:
        role, content = turns[-1]
        turns[-1] = (role, content[:max(len(content) - (len(prompt) - max_src_len), 0)])
        prompt = family.build_conversation_prompt(tokenizer, turns)
    return prompt


class Seq2SeqDataset(Dataset):
    """Tokenised training rows: each item is {"input_ids", "labels"} as lists of ints."""

    def __init__(self, path, tokenizer, family, max_len, max_src_len, prompt_text="", skip_bad=False, log=print):
        overhead = family.layout_overhead(tokenizer)
        if max_src_len >= max_len - overhead:
            raise DataError(f"--max_src_len {max_src_len} leaves no room for the answer within --max_len {max_len} "
                            f"(the layout adds {overhead} tokens): lower --max_src_len or raise --max_len")
        self.rows = read_rows(path, prompt_text, skip_bad, log)
        self.examples, self.truncated = [], 0
        skipped = SkippedRows(path)
        for row in self.rows:
            try:
                input_ids, labels, cut = encode_training_row(tokenizer, family, row, max_len, max_src_len, path)
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.add(row.line, str(err).split(": ", 1)[1])  # the reason without "path:line: "
                continue
            self.examples.append({"input_ids": input_ids, "labels": labels})
            self.truncated += cut
        skipped.report(log, "row(s) that do not fit the layout")
        if not self.examples:
            raise DataError(f"{path}: no usable rows")
        log(f"{path}: {len(self.examples)} rows, {self.truncated} truncated to max_src_len {max_src_len} / "
            f"max_len {max_len}; longest {max(self.lengths)} tokens")

    @property
    def lengths(self):
        return [len(e["input_ids"]) for e in self.examples]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


@dataclass
class PadToLongest:
    """Collate rows into tensors padded (on the right) to the longest row of the batch, rounded up to a multiple
    of `multiple` when given (fewer distinct shapes for compiled kernels). With `with_label_positions`, also
    `label_positions` (see `labelled_positions`), padded to a multiple of `label_multiple` (default: `multiple`)."""
    pad_token_id: int
    multiple: int = 0
    with_label_positions: bool = False
    label_multiple: int = 0

    def __call__(self, batch):
        width = round_up(max(len(e["input_ids"]) for e in batch), self.multiple)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, e in enumerate(batch):
            input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
        collated = {"input_ids": input_ids, "labels": labels}
        if self.with_label_positions:
            collated["label_positions"] = labelled_positions(labels, self.label_multiple or self.multiple)
        return collated


@dataclass
class PackRows:
    """Collate a batch into one sequence: its rows one after another, then padding up to a multiple of `multiple`.

    Padding a random pair of rows to the longer one computes 722 tokens per 514 real ones on the spo lengths;
    packed, a step computes about 546. Each row attends only to itself, as it would alone: `packed_rows` [rows, 2]
    holds each row's (length, bidirectional length), from which the model attends over each row's own blocks, and
    each row's `position_ids` are its own (`row_inputs(input_ids, config)` -> (soft prompt slots, positions
    [..., slots + n], bidirectional length): the model file's `packed_row_inputs`; embedding-only prompt tuning
    gets slots before each row, which the model fills with its soft prompt). The padding at the end counts as part
    of the last row, after its tokens, where no real token sees it. The loss is the same (the mean over the
    batch's labelled tokens; a row's last token predicts nothing, since the next row starts with context). One
    difference in randomness: P-Tuning v2's prefix dropout draws one mask for the sequence, so the rows share it."""
    pad_token_id: int
    row_inputs: Callable
    config: object
    multiple: int = 0
    with_label_positions: bool = False
    label_multiple: int = 0  # label_positions padded to a multiple of this (default: `multiple`)

    def __call__(self, batch):
        ids = [torch.tensor(e["input_ids"]) for e in batch]
        row_inputs = [self.row_inputs(row_ids, self.config) for row_ids in ids]
        width = round_up(sum(soft + len(row_ids) for (soft, _, _), row_ids in zip(row_inputs, ids)), self.multiple)
        input_ids = torch.full((1, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, width), -100, dtype=torch.long)
        positions = torch.zeros(1, *row_inputs[0][1].shape[:-1], width, dtype=torch.long)
        rows = torch.zeros(len(batch), 2, dtype=torch.long)
        start = 0
        for i, (e, row_ids, (soft, row_positions, both_ways)) in enumerate(zip(batch, ids, row_inputs)):
            first, end = start + soft, start + soft + len(row_ids)  # [soft prompt slots | the row]
            input_ids[0, first:end] = row_ids
            labels[0, first:first + len(e["labels"])] = torch.tensor(e["labels"])
            positions[0, ..., start:end] = row_positions
            rows[i] = torch.tensor([end - start, both_ways])
            start = end
        rows[-1, 0] += width - start
        collated = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "packed_rows": rows}
        if self.with_label_positions:
            collated["label_positions"] = labelled_positions(labels, self.label_multiple or self.multiple)
        return collated


def labelled_positions(labels, multiple=0):
    """Flat indices into [batch, seq - 1] of the positions whose next token has a label, padded with -1 up to a
    multiple of `multiple`: the model's loss selects these without asking the GPU how many there are."""
    flat = (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)
    padded = torch.full((round_up(len(flat), multiple),), -1, dtype=torch.long)
    padded[:len(flat)] = flat
    return padded


class EpochSampler(Sampler):
    """This rank's share of a seeded shuffle that depends only on (seed, epoch), so a resumed run sees the same order.

    With `group_by_length`, rows are sorted by length within windows of 50 batches and the batches shuffled, so
    each batch holds rows of similar length (less padding) while the order stays random.
    """

    def __init__(self, lengths, batch_size, seed, rank=0, world_size=1, group_by_length=False, shuffle=True):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.group_by_length, self.shuffle = group_by_length, shuffle
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def global_order(self):
        rng = random.Random(self.seed * 1000003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            global_batch = self.batch_size * self.world_size
            window = global_batch * 50
            chunks = [sorted(order[i:i + window], key=lambda j: -self.lengths[j]) for i in range(0, len(order), window)]
            order = [j for chunk in chunks for j in chunk]
            batches = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
            if self.shuffle:
                rng.shuffle(batches)
            order = [j for b in batches for j in b]
        return order

    def balanced_across_ranks(self, order):
        """Within each global batch (batch_size rows per rank), the rows dealt to the ranks so that their token
        totals are close, longest row first to the rank with the fewest tokens so far. Every rank waits for the
        slowest at each step; which rank computes which row of a global batch changes nothing else (each rank's
        loss is its share of the global batch's mean)."""
        size = self.batch_size * self.world_size
        balanced = []
        for start in range(0, len(order) - size + 1, size):
            ranks, totals = [[] for _ in range(self.world_size)], [0] * self.world_size
            for j in sorted(order[start:start + size], key=lambda j: -self.lengths[j]):
                r = min((r for r in range(self.world_size) if len(ranks[r]) < self.batch_size),
                        key=lambda r: totals[r])
                ranks[r].append(j)
                totals[r] += self.lengths[j]
            balanced += [ranks[r][k] for k in range(self.batch_size) for r in range(self.world_size)]
        return balanced + order[len(balanced):]

    def __iter__(self):
        order = self.global_order()
        if self.world_size > 1:
            order = self.balanced_across_ranks(order)
        usable = len(order) - len(order) % self.world_size
        return iter(order[self.rank:usable:self.world_size])

    def __len__(self):
        return len(self.lengths) // self.world_size
