"""Training and test data: reading rows, laying them out in tokens, batching.

Rows come from a JSONL file (one object per line) or a JSON file holding one array of objects, in either form:
- `{"text": ..., "answer": ...}`: the source is `--prompt_text` followed by the text (the reference layout);
- `{"instruction": ..., "input": ..., "output": ...}`: the row's instruction is the prompt; `output` may be a list
  of references (test sets); training uses the first.

The token layout is the model family's (ChatGLM-6B: `prompt+text [gMASK] <sop> answer <eop>`). As in the reference,
the text is cut so that prompt + text fit `max_src_len`, the answer to `max_len - max_src_len - 3`, and labels
are -100 on the context. Batches are padded to their own longest row only.
"""
import json
import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Sampler


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Row:
    prompt: str
    text: str
    answers: list  # one or more reference answers
    line: int  # 1-based line (JSONL) or element index + 1 (JSON array)
    raw: dict = field(repr=False, default=None)


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


def read_rows(path, prompt_text="", skip_bad=False, log=print, allow_empty_answer=False):
    """Rows of a .jsonl or .json file. Bad rows raise DataError naming file and line, or are skipped and counted.

    An empty answer is bad in training data; a test set may have rows whose reference is empty (no triples)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not content.strip():
        raise DataError(f"{path}: empty file, no rows")
    if content.lstrip().startswith("["):
        try:
            items = [(i + 1, obj, None) for i, obj in enumerate(json.loads(content))]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        items = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    items.append((number, json.loads(line), None))
                except json.JSONDecodeError as err:
                    items.append((number, None, f"not valid JSON ({err.msg})"))
    rows, skipped = [], 0
    for number, obj, error in items:
        if error is None:
            try:
                prompt, text, answers = parse_row(obj, prompt_text, allow_empty_answer)
            except ValueError as err:
                error = str(err)
        if error is not None:
            if not skip_bad:
                raise DataError(f"{path}:{number}: {error} (use --skip_bad_rows to skip such rows)")
            skipped += 1
            continue
        rows.append(Row(prompt, text, answers, number, obj))
    if skipped:
        log(f"{path}: skipped {skipped} bad row(s)")
    if not rows:
        raise DataError(f"{path}: no usable rows")
    return rows


def encode_source(tokenizer, row, max_src_len, path="data"):
    """Prompt tokens + text tokens, the text cut so that both fit max_src_len. Returns (ids, was_truncated)."""
    prompt_ids = tokenizer.encode(row.prompt, add_special_tokens=False) if row.prompt else []
    if len(prompt_ids) >= max_src_len:
        raise DataError(f"{path}:{row.line}: the prompt alone is {len(prompt_ids)} tokens, leaving no room for the "
                        f"text within --max_src_len {max_src_len}; raise --max_src_len or shorten the prompt")
    text_ids = tokenizer.encode(row.text, add_special_tokens=False) if row.text else []
    room = max(max_src_len - len(prompt_ids), 0)
    return prompt_ids + text_ids[:room], len(text_ids) > room


class Seq2SeqDataset(Dataset):
    """Tokenised training rows: each item is {"input_ids", "labels"} as lists of ints."""

    def __init__(self, path, tokenizer, family, max_len, max_src_len, prompt_text="", skip_bad=False, log=print):
        if max_src_len >= max_len - family.special_tokens:
            raise ValueError(f"--max_src_len {max_src_len} leaves no room for the answer within --max_len {max_len}")
        self.rows = read_rows(path, prompt_text, skip_bad, log)
        max_answer_len = max_len - max_src_len - family.special_tokens
        self.examples, self.truncated = [], 0
        for row in self.rows:
            source_ids, cut = encode_source(tokenizer, row, max_src_len, path)
            answer_ids = tokenizer.encode(row.answers[0], add_special_tokens=False)
            cut = cut or len(answer_ids) > max_answer_len
            input_ids, labels = family.build_training_ids(tokenizer, source_ids, answer_ids[:max_answer_len])
            self.examples.append({"input_ids": input_ids, "labels": labels})
            self.truncated += cut
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
    """Collate rows into tensors padded (on the right) to the longest row of the batch."""
    pad_token_id: int

    def __call__(self, batch):
        width = max(len(e["input_ids"]) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, e in enumerate(batch):
            input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
        return {"input_ids": input_ids, "labels": labels}


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

    def __iter__(self):
        order = self.global_order()
        usable = len(order) - len(order) % self.world_size
        return iter(order[self.rank:usable:self.world_size])

    def __len__(self):
        return len(self.lengths) // self.world_size
