"""Task metrics of the predict scripts (`--task`): triple F1, classification accuracy / macro F1, BLEU-4 and ROUGE-L.

Each task function takes the generated texts and the references (a list of reference strings per row) and
returns (per-row scores, summary dict).
"""
import math
from collections import Counter


# ---- triple extraction -----------------------------------------------------------------------------------------

def parse_triples(text):
    """The set of triples in a text: lines with exactly three non-empty `_`-separated fields."""
    triples = set()
    for line in text.split("\n"):
        fields = line.strip().split("_")
        if len(fields) == 3 and all(f.strip() for f in fields):
            triples.add(tuple(f.strip() for f in fields))
    return triples


def f1(correct, predicted, gold):
    if correct == 0:
        return 0.0
    precision, recall = correct / predicted, correct / gold
    return 2 * precision * recall / (precision + recall)


def triple_scores(generated, references):
    """Per row F1 of predicted vs reference triple sets (both empty: 1), averaged over all rows; and micro P/R/F1."""
    rows, correct, predicted, gold = [], 0, 0, 0
    for text, refs in zip(generated, references):
        pred, ref = parse_triples(text), parse_triples(refs[0])
        hit = len(pred & ref)
        rows.append(1.0 if not pred and not ref else f1(hit, len(pred), len(ref)))
        correct, predicted, gold = correct + hit, predicted + len(pred), gold + len(ref)
    summary = {
        "f1": sum(rows) / len(rows),
        "micro_precision": correct / predicted if predicted else 0.0,
        "micro_recall": correct / gold if gold else 0.0,
        "micro_f1": f1(correct, predicted, gold) if predicted and gold else 0.0,
    }
    return rows, summary


# ---- classification --------------------------------------------------------------------------------------------

def classification_scores(generated, references):
    """Accuracy of the generated label (stripped) and macro F1 over the reference labels."""
    pred = [g.strip() for g in generated]
    gold = [r[0].strip() for r in references]
    rows = [float(p == g) for p, g in zip(pred, gold)]
    per_label = []
    for label in sorted(set(gold)):
        tp = sum(p == label and g == label for p, g in zip(pred, gold))
        per_label.append(f1(tp, sum(p == label for p in pred), sum(g == label for g in gold)))
    return rows, {"accuracy": sum(rows) / len(rows), "macro_f1": sum(per_label) / len(per_label)}


# ---- generation ------------------------------------------------------------------------------------------------

def char_ngrams(chars, n):
    return Counter(tuple(chars[i:i + n]) for i in range(len(chars) - n + 1))


def corpus_bleu4(generated, references):
    """Character-level corpus BLEU-4 with several references per row (clipped counts, closest-length brevity)."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for text, refs in zip(generated, references):
        hyp = list(text.strip())
        refs = [list(r.strip()) for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            counts = char_ngrams(hyp, n)
            best = Counter()
            for r in refs:
                best |= char_ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return brevity * math.exp(log_precision)


def lcs_length(a, b):
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hyp, ref):
    """Character-level ROUGE-L F1."""
    hyp, ref = hyp.strip(), ref.strip()
    lcs = lcs_length(hyp, ref)
    return f1(lcs, len(hyp), len(ref)) if hyp and ref else 0.0


def generation_scores(generated, references):
    """Per row the best ROUGE-L over its references; summary ROUGE-L mean and corpus BLEU-4 (characters)."""
    rows = [max(rouge_l(g, r) for r in refs) for g, refs in zip(generated, references)]
    return rows, {"bleu4": corpus_bleu4(generated, references), "rouge_l": sum(rows) / len(rows)}


TASKS = {"triple": triple_scores, "classification": classification_scores, "generation": generation_scores}
