"""How many batch shapes a training run meets, and when: each new one is a CUDA graph capture (training_graphs.py).

Runs the training scripts' sampler and collator (GPU defaults: rows packed, padded to a multiple of 64, label
positions to a multiple of 4 x 64) over the epochs, on the CPU, without a model:

    python bench/count_batch_shapes.py --model_dir /tmp/chatglm6b-random --train_path spo/train.jsonl
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def batch_shapes(args, rank, world_size):
    """[(step, shape key)] for this rank over the run."""
    from data_set import EpochSampler, Seq2SeqDataset
    from model_family import family_for, load_tokenizer
    from training import DEFAULT_PROMPT, train_loader_collate
    family = family_for(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir, family)
    rows = Seq2SeqDataset(args.train_path, tokenizer, family, 768, 450, DEFAULT_PROMPT, True, lambda *a, **k: None)
    config = family.config_class.from_pretrained(args.model_dir)
    collate = train_loader_collate(tokenizer, args.multiple, True, (family.packed_row_inputs, config))
    sampler = EpochSampler(rows.lengths, args.batch_size, 1234, rank, world_size)
    shapes, step = [], 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = collate([rows[j] for j in order[i:i + args.batch_size]])
            shapes.append((step, (batch["input_ids"].shape[1], batch["label_positions"].shape[0])))
            step += 1
    return shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="for the tokenizer and config")
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--world_size", type=int, default=1)
    args = parser.parse_args()
    for rank in range(args.world_size):
        shapes = batch_shapes(args, rank, args.world_size)
        first_seen = {}
        for step, key in shapes:
            first_seen.setdefault(key, step)
        firsts = sorted(first_seen.values())
        counts = collections.Counter(key for _, key in shapes)
        seen = collections.Counter(counts.values())
        print(f"rank {rank} of {args.world_size}: {len(shapes)} steps, {len(first_seen)} shapes "
              f"({len({w for w, _ in first_seen})} lengths x {len({n for _, n in first_seen})} label counts); "
              f"half of them first met after step {firsts[len(firsts) // 2]}, a tenth after step "
              f"{firsts[int(len(firsts) * 0.9)]}, the last at step {firsts[-1]}; met only once: {seen[1]}, twice: "
              f"{seen[2]}")


if __name__ == "__main__":
    main()
