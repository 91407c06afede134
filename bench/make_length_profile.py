"""Token lengths of the reference data set, for the GPU benchmark (which cannot read ../shared).

Trains a SentencePiece tokenizer on the spo texts themselves (the real ChatGLM-6B tokenizer cannot be fetched
here; this one has the same special pieces and layout handling), lays every row out as the training scripts do
(prompt + text cut to max_src_len 450, answer to 768 - 450 - 3 = 315 tokens, [gMASK] <sop> ... <eop>) and writes
per-row lengths to bench/spo_lengths.json.

    python bench/make_length_profile.py [--data ../shared/data/spo] [--vocab_pieces 20000]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data_set import Seq2SeqDataset, encode_source, read_rows  # noqa: E402
from model_family import CHATGLM6B  # noqa: E402
from tokenization_chatglm import ChatGLMTokenizer, train_sentencepiece_model  # noqa: E402
from training_options import DEFAULT_PROMPT  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "spo"))
    parser.add_argument("--vocab_pieces", type=int, default=2200,
                        help="about as many pieces as the data has characters: rows come out about as long as with "
                             "ChatGLM-6B's tokenizer (the reference saw ~290 real tokens per row; this gives ~257)")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "spo_lengths.json"))
    args = parser.parse_args()
    train_path, test_path = os.path.join(args.data, "train.jsonl"), os.path.join(args.data, "test.jsonl")
    quiet = lambda *a: None  # noqa: E731
    texts = [s for p in (train_path, test_path) for r in read_rows(p, DEFAULT_PROMPT, skip_bad=True, log=quiet) for s in [r.text] + r.answers]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = train_sentencepiece_model(texts + [DEFAULT_PROMPT], os.path.join(tmp, "ice_text.model"),
                                               args.vocab_pieces)
        tokenizer = ChatGLMTokenizer(model_path)
        # the 22 rows with an empty answer are skipped, as --skip_bad_rows does in training
        train = Seq2SeqDataset(train_path, tokenizer, CHATGLM6B, 768, 450, DEFAULT_PROMPT, skip_bad=True, log=quiet)
        test_prompts = [len(encode_source(tokenizer, r, 450)[0]) + 2 for r in read_rows(test_path, DEFAULT_PROMPT)]
        profile = {
            "source": "spo train/test (1,441 / 50 rows; 22 train rows with an empty answer skipped), SentencePiece unigram tokenizer trained on those texts, "
                      f"{tokenizer.sp.GetPieceSize()} pieces; max_len 768, max_src_len 450",
            "train_lengths": train.lengths,
            "train_label_tokens": [sum(1 for x in e["labels"] if x != -100) for e in train.examples],
            "test_prompt_lengths": test_prompts,
        }
    with open(args.output, "w") as f:
        json.dump(profile, f)
    print(f"train rows {len(train)}: mean {statistics.mean(train.lengths):.0f} tokens, median "
          f"{statistics.median(train.lengths):.0f}, max {max(train.lengths)}, truncated {train.truncated}; "
          f"test prompts mean {statistics.mean(test_prompts):.0f}, max {max(test_prompts)} -> {args.output}")


if __name__ == "__main__":
    main()
