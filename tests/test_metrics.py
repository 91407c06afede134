"""The task metrics on cases computed by hand."""
import pytest

from metrics import classification_scores, corpus_bleu4, generation_scores, parse_triples, rouge_l, triple_scores


def test_parse_triples_keeps_lines_of_exactly_three_fields():
    text = "发动机_部件故障_异响\n坏行\na_b\na_b_c_d\n发动机_部件故障_异响\n_x_y\n 水泵_部件故障_漏水 "
    assert parse_triples(text) == {("发动机", "部件故障", "异响"), ("水泵", "部件故障", "漏水")}


def test_triple_f1_by_hand():
    gold = ["a_r_b\nc_r_d", "e_r_f", "g_r_h\ni_r_j"]
    generated = [
        "a_r_b\nc_r_d\na_r_b",  # exact, with a duplicate: F1 1
        "",  # empty prediction: F1 0
        "g_r_h\nx_r_y\nbroken line",  # 1 of 2 predicted right, 1 of 2 found: P = R = 0.5, F1 0.5
    ]
    rows, summary = triple_scores(generated, [[g] for g in gold])
    assert rows == [1.0, 0.0, 0.5]
    assert summary["f1"] == pytest.approx(0.5)
    # micro: 3 correct of 4 predicted, of 5 gold
    assert summary["micro_precision"] == pytest.approx(3 / 4)
    assert summary["micro_recall"] == pytest.approx(3 / 5)
    assert summary["micro_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)


def test_triple_f1_averages_over_every_row_not_a_fixed_50():
    rows, summary = triple_scores(["a_r_b"] * 3, [["a_r_b"], ["a_r_b"], ["c_r_d"]])
    assert summary["f1"] == pytest.approx(2 / 3)


def test_classification_accuracy_and_macro_f1():
    rows, summary = classification_scores(["1", "0 ", "1", "x"], [["1"], ["0"], ["0"], ["1"]])
    assert rows == [1.0, 1.0, 0.0, 0.0]
    assert summary["accuracy"] == 0.5
    # label 0: P 1/1, R 1/2 -> 2/3; label 1: P 1/2, R 1/2 -> 1/2
    assert summary["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_rouge_l_by_hand():
    assert rouge_l("发动机异响", "发动机异响") == 1.0
    # LCS of abcd / acbd is 3: P = R = 3/4
    assert rouge_l("abcd", "acbd") == pytest.approx(0.75)
    assert rouge_l("", "abc") == 0.0


def test_bleu4_identical_is_one_and_disjoint_is_zero():
    assert corpus_bleu4(["汽车发动机异响怎么办"], [["汽车发动机异响怎么办"]]) == pytest.approx(1.0)
    assert corpus_bleu4(["完全不同的句子"], [["汽车发动机异响"]]) == 0.0


def test_bleu4_uses_the_best_of_several_references_and_the_brevity_penalty():
    refs = [["发动机异响怎么办啊", "为什么发动机会异响"]]
    # hypothesis equals the second reference: all n-grams match, same length as that reference
    assert corpus_bleu4(["为什么发动机会异响"], refs) == pytest.approx(1.0)
    short = corpus_bleu4(["为什么发动机会"], refs)  # precision 1 but shorter: penalised
    assert short == pytest.approx(__import__("math").exp(1 - 9 / 7))


def test_generation_scores_take_the_best_reference_per_row():
    rows, summary = generation_scores(["abcd"], [["zzzz", "abcd"]])
    assert rows == [1.0] and summary["rouge_l"] == 1.0
