"""Task metrics: hand-checked cases, agreement with the rouge-score package, multi-reference, errors."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from torchmetrics.functional.text import squad as tm_squad

from eetrain.errors import ConfigError
from eetrain.task_metrics import (
    LABEL_METRICS,
    TEXT_METRICS,
    _sentences,
    check_metrics,
    corpus_scores,
    label_scores,
    sentence_scores,
)

# News-style pairs (prediction, reference) and the reference split one sentence per line by hand, which
# is what our splitter must produce for rougeLsum.
NEWS = [
    (
        "The city council approved a new budget on Tuesday. It raises spending on schools by 4 percent.",
        "City council passes budget with a 4% boost for schools. Vote came late on Tuesday night.",
    ),
    (
        "Heavy rain flooded parts of the coast. Thousands were evacuated! Officials expect more storms.",
        (
            "Floods hit the coast after days of heavy rain. "
            "Thousands of residents evacuated. More storms expected."
        ),
    ),
    (
        'The striker scored twice as United won 3-1. "We deserved it," the manager said. Fans celebrated.',
        "United beat City 3-1 with two goals from their striker. The manager said the win was deserved.",
    ),
    (
        "Shares of the chipmaker jumped 12% after earnings beat forecasts. Analysts raised their targets?",
        (
            "Chipmaker's stock rises 12 percent on strong quarterly earnings. "
            "Several analysts lift price targets."
        ),
    ),
    (
        "Scientists found water ice near the moon's south pole. The discovery could help future missions.",
        (
            "Water ice discovered at lunar south pole. "
            "Finding may support crewed missions. Study published today."
        ),
    ),
]
NEWS_LINES = [
    (
        "The city council approved a new budget on Tuesday.\nIt raises spending on schools by 4 percent.",
        "City council passes budget with a 4% boost for schools.\nVote came late on Tuesday night.",
    ),
    (
        "Heavy rain flooded parts of the coast.\nThousands were evacuated!\nOfficials expect more storms.",
        (
            "Floods hit the coast after days of heavy rain.\n"
            "Thousands of residents evacuated.\nMore storms expected."
        ),
    ),
    (
        'The striker scored twice as United won 3-1.\n"We deserved it," the manager said.\nFans celebrated.',
        "United beat City 3-1 with two goals from their striker.\nThe manager said the win was deserved.",
    ),
    (
        "Shares of the chipmaker jumped 12% after earnings beat forecasts.\nAnalysts raised their targets?",
        (
            "Chipmaker's stock rises 12 percent on strong quarterly earnings.\n"
            "Several analysts lift price targets."
        ),
    ),
    (
        "Scientists found water ice near the moon's south pole.\nThe discovery could help future missions.",
        (
            "Water ice discovered at lunar south pole.\n"
            "Finding may support crewed missions.\nStudy published today."
        ),
    ),
]
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _package_rouge(pairs: list[tuple[str, str]], rouge_type: str) -> list[float]:
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
    return [100 * scorer.score(ref, pred)[rouge_type].fmeasure for pred, ref in pairs]


# --- ROUGE ---------------------------------------------------------------------------------------------


def test_rouge_hand_checked():
    # "the cat sat" vs "the cat ran": unigrams the, cat shared -> P = R = 2/3 -> 66.67;
    # bigrams {the cat, cat sat} vs {the cat, cat ran}: 1 of 2 -> 50; LCS "the cat" = 2 of 3 -> 66.67.
    s = corpus_scores(["rouge1", "rouge2", "rougeL"], ["the cat sat"], ["the cat ran"])
    assert s["rouge1"] == pytest.approx(200 / 3)
    assert s["rouge2"] == pytest.approx(50.0)
    assert s["rougeL"] == pytest.approx(200 / 3)


def test_rouge_stemming_and_lcs_order():
    # Porter stemming: killed -> kill, police -> polic on both sides, so all 4 unigrams match -> 100;
    # in "the gunman kill police" vs "police killed the gunman" the LCS is "the gunman" = 2 of 4 -> 50.
    s = corpus_scores(["rouge1", "rougeL"], ["the gunman kill police"], ["police killed the gunman"])
    assert s == pytest.approx({"rouge1": 100.0, "rougeL": 50.0})


def test_rouge_lsum_splits_sentences():
    # Swapped sentences. rougeL over the whole text: LCS "the dog ran" = 3 of 6 -> 50. rougeLsum per
    # reference sentence: union LCS with the prediction's sentences covers all 3 tokens, 6 of 6 -> 100.
    pred, ref = "the dog ran. the cat sat.", "the cat sat. the dog ran."
    s = corpus_scores(["rougeL", "rougeLsum"], [pred], [ref])
    assert s == pytest.approx({"rougeL": 50.0, "rougeLsum": 100.0})
    # Text with a newline is taken as already split: one line each, so rougeLsum = rougeL = 50.
    s = corpus_scores(["rougeLsum"], [pred + "\n"], [ref + "\n"])
    assert s["rougeLsum"] == pytest.approx(50.0)


def test_sentence_splitter():
    # After . ! ? (or one followed by a closing quote / bracket) and whitespace; not inside "3.5"; a
    # text that has a newline is left alone. Abbreviations ("U.S. troops") do split: no punkt model.
    text = 'He said "stop." Then (he left.) Fine?  Yes! It rose 3.5 percent. U.S. troops'
    assert (
        _sentences(text)
        == 'He said "stop."\nThen (he left.)\nFine?\nYes!\nIt rose 3.5 percent.\nU.S.\ntroops'
    )
    assert _sentences("One. Two\nThree. Four") == "One. Two\nThree. Four"


@pytest.mark.parametrize("rouge_type", ROUGE)
def test_rouge_matches_package_on_news(rouge_type):
    # The package on the hand-split texts: checks the mean of F-measures and, for rougeLsum, our splitter.
    expected = _package_rouge(NEWS_LINES, rouge_type)
    preds, refs = [p for p, _ in NEWS], [r for _, r in NEWS]
    ours = sentence_scores(rouge_type, preds, refs)
    assert ours == pytest.approx(expected, abs=1e-9)
    corpus = corpus_scores([rouge_type], preds, refs)[rouge_type]
    assert corpus == pytest.approx(sum(expected) / len(expected), abs=1e-9)
    # Already-split input is scored as given.
    lines = corpus_scores([rouge_type], [p for p, _ in NEWS_LINES], [r for _, r in NEWS_LINES])[rouge_type]
    assert lines == pytest.approx(corpus, abs=1e-9)


def test_rouge_all_types_together_equal_one_at_a_time():
    preds, refs = [p for p, _ in NEWS], [r for _, r in NEWS]
    together = corpus_scores(ROUGE, preds, refs)
    for t in ROUGE:
        assert together[t] == pytest.approx(corpus_scores([t], preds, refs)[t], abs=1e-12)


def test_rouge_multi_reference_takes_best_per_example_and_type():
    # Example i is scored against its own reference and the next pair's; example 1 lists three, the true
    # one second. Expected: the package's max over the hand-split references.
    choice = [[0, 1], [2, 1, 5], [2, 3]]
    extra = ("Coast floods.", "Coast floods.")
    pairs, lines = NEWS + [extra], NEWS_LINES + [extra]
    preds = [NEWS[i][0] for i in range(3)]
    refs = [[pairs[j][1] for j in js] for js in choice]
    for t in ROUGE:
        scorer = rouge_scorer.RougeScorer([t], use_stemmer=True)
        expected = [
            max(100 * scorer.score(lines[j][1], lines[i][0])[t].fmeasure for j in js)
            for i, js in enumerate(choice)
        ]
        assert sentence_scores(t, preds, refs) == pytest.approx(expected, abs=1e-9)
    # The true reference among others scores at least as high as alone.
    single = sentence_scores("rouge1", preds, [r for _, r in NEWS[:3]])
    multi = sentence_scores("rouge1", preds, refs)
    assert all(m >= s for m, s in zip(multi, single, strict=True))


# --- BLEU ----------------------------------------------------------------------------------------------


def test_bleu_identical_is_100():
    text = "The quick brown fox jumps over the lazy dog ."
    assert corpus_scores(["bleu"], [text], [text])["bleu"] == pytest.approx(100.0)
    assert sentence_scores("bleu", [text], [text]) == pytest.approx([100.0])


def test_bleu_hand_checked():
    # "the cat sat on the mat" vs "the cat sat on a mat": clipped precisions 1-gram 5/6, 2-gram 3/5,
    # 3-gram 2/4, 4-gram 1/3; equal lengths so BP = 1; BLEU = (5/6*3/5*1/2*1/3)^(1/4) = (1/12)^(1/4).
    s = corpus_scores(["bleu"], ["the cat sat on the mat"], ["the cat sat on a mat"])
    assert s["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25)  # 53.73


def test_bleu_multi_reference_hand_checked():
    # Refs "the cat sat on a mat" and "a cat is on the mat": 2-grams "on the", "the mat" now match (5/5),
    # 3-grams the cat sat, cat sat on, on the mat (3/4), 4-gram the cat sat on (1/3); 1-grams 5/6.
    # BLEU = (5/6 * 1 * 3/4 * 1/3)^(1/4) = (5/24)^(1/4) -> 67.56.
    refs = [["the cat sat on a mat", "a cat is on the mat"]]
    assert corpus_scores(["bleu"], ["the cat sat on the mat"], refs)["bleu"] == pytest.approx(
        100 * (5 / 24) ** 0.25
    )


def test_bleu_sentence_effective_order_hand_checked():
    # "the cat sat" vs "the cat sat on the mat": 1-, 2-, 3-gram precisions 1, no 4-grams (effective order
    # 3), brevity penalty exp(1 - 6/3) = e^-1 -> 36.79.
    assert sentence_scores("bleu", ["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(
        [100 * math.exp(-1)]
    )


def test_bleu_uneven_references_match_sacrebleu_streams():
    preds = ["the cat sat on the mat", "a dog barked at the mailman", "rain fell all day"]
    refs = [["the cat sat on a mat", "a cat is on the mat"], "the dog barked at a mailman", ["rain all day"]]
    padded = [
        ["the cat sat on a mat", "the dog barked at a mailman", "rain all day"],
        ["a cat is on the mat", "the dog barked at a mailman", "rain all day"],
    ]
    assert corpus_scores(["bleu"], preds, refs)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(preds, padded).score, abs=1e-9
    )
    expected = [
        sacrebleu.sentence_bleu(p, [r] if isinstance(r, str) else r).score
        for p, r in zip(preds, refs, strict=True)
    ]
    assert sentence_scores("bleu", preds, refs) == pytest.approx(expected, abs=1e-9)


# --- SQuAD ---------------------------------------------------------------------------------------------


def test_squad_hand_checked():
    # 1: "The Eiffel Tower!" normalises to "eiffel tower" -> EM 1, F1 1.
    # 2: "in the Eiffel Tower" -> "in eiffel tower" (3 tokens); vs "eiffel tower": P 2/3, R 1, F1 0.8;
    #    vs "the tower" -> "tower": P 1/3, R 1, F1 0.5; max 0.8, EM 0.
    # 3: "A cat." vs "an cat" -> "cat" == "cat" -> EM 1.  4: "dog" vs "cat" -> 0, 0.
    preds = ["The Eiffel Tower!", "in the Eiffel Tower", "A cat.", "dog"]
    refs = ["eiffel tower", ["Eiffel Tower", "the tower"], ["an cat"], "cat"]
    assert sentence_scores("squad_em", preds, refs) == pytest.approx([100, 0, 100, 0])
    assert sentence_scores("squad_f1", preds, refs) == pytest.approx([100, 80, 100, 0])
    s = corpus_scores(["squad_em", "squad_f1"], preds, refs)
    assert s == pytest.approx({"squad_em": 50.0, "squad_f1": 70.0})


def test_squad_matches_torchmetrics():
    preds = ["Denver Broncos", "the 1990s, mostly", "Saint Bernadette Soubirous", "", "gold-colored"]
    refs = [
        ["Denver Broncos", "The Denver Broncos"],
        ["1990s"],
        ["Saint Bernadette Soubirous"],
        ["yes"],
        ["golden", "gold colored"],
    ]
    tm = tm_squad(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
        [{"answers": {"answer_start": [0] * len(r), "text": r}, "id": str(i)} for i, r in enumerate(refs)],
    )
    ours = corpus_scores(["squad_em", "squad_f1"], preds, refs)
    assert ours["squad_em"] == pytest.approx(float(tm["exact_match"]), abs=1e-4)
    assert ours["squad_f1"] == pytest.approx(float(tm["f1"]), abs=1e-4)


def test_sentence_scores_average_to_corpus_scores():
    preds, refs = [p for p, _ in NEWS], [r for _, r in NEWS]
    corpus = corpus_scores(TEXT_METRICS, preds, refs)
    assert list(corpus) == list(TEXT_METRICS)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum", "squad_em", "squad_f1"):
        per = sentence_scores(name, preds, refs)
        assert sum(per) / len(per) == pytest.approx(corpus[name], abs=1e-9)
    assert all(0.0 <= v <= 100.0 for v in corpus.values())


# --- label metrics -------------------------------------------------------------------------------------


def test_label_metrics_hand_checked():
    # preds 1 1 1 0 0 0 1 0 / labels 1 1 0 0 0 1 1 0: TP 3, FP 1, FN 1, TN 3.
    # accuracy 6/8 = 75; F1 = 2*3 / (2*3 + 1 + 1) = 75; Matthews = (3*3 - 1*1) / sqrt(4*4*4*4) = 8/16 = 50.
    preds = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    labels = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0])
    s = label_scores(["accuracy", "f1", "matthews"], preds, labels)
    assert s == pytest.approx({"accuracy": 75.0, "f1": 75.0, "matthews": 50.0})


def test_matthews_is_sklearns_in_degenerate_cases():
    # an exit that always says the majority class, or one class only on either side: 0 (sklearn, GLUE);
    # torchmetrics gave 8.2 / -8.2 / 100 / -100 here
    labels = torch.tensor([1] * 69 + [0] * 31)
    assert label_scores(["matthews"], torch.ones(100, dtype=torch.long), labels)["matthews"] == 0.0
    assert label_scores(["matthews"], torch.zeros(100, dtype=torch.long), labels)["matthews"] == 0.0
    assert label_scores(["matthews"], torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]))["matthews"] == 0.0
    assert label_scores(["matthews"], torch.tensor([0]), torch.tensor([1]))["matthews"] == 0.0
    # 3 classes, hand-checked with the K-class formula: labels 0 0 1 1 2 2, preds 0 1 1 1 2 0
    # t = (2, 2, 2), p = (2, 3, 1), c = 4, s = 6: (4*6 - 12) / sqrt((36 - 14)(36 - 12)) = 12 / sqrt(528)
    s = label_scores(["matthews"], torch.tensor([0, 1, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert s["matthews"] == pytest.approx(100 * 12 / 528**0.5)


def test_label_metrics_multiclass_accuracy():
    # 3 of 4 right -> 75, whatever num_classes is (inferred 3 here, or given).
    preds, labels = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2])
    assert label_scores(["accuracy"], preds, labels)["accuracy"] == pytest.approx(75.0)
    assert label_scores(["accuracy"], preds, labels, num_classes=5)["accuracy"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="class ids in"):
        label_scores(["f1"], preds, labels)


def test_label_metrics_correlations():
    x = torch.tensor([0.5, 1.0, 2.5, 4.0, 4.5])
    assert label_scores(["pearson"], x, 2 * x + 1)["pearson"] == pytest.approx(100.0)
    assert label_scores(["pearson"], x, -x)["pearson"] == pytest.approx(-100.0)
    # Ranks 1 2 3 4 vs 1 2 4 3: sum d^2 = 2, rho = 1 - 6*2 / (4*(16-1)) = 0.8 -> 80
    s = label_scores(["spearman"], torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 40.0, 30.0]))
    assert s["spearman"] == pytest.approx(80.0, abs=1e-9)
    # a perfect ranking is exactly 100 (torchmetrics' 1e-6 in the denominator gave 99.99992)
    s = label_scores(["spearman"], torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([2.0, 4.0, 6.0, 7.0]))
    assert s["spearman"] == 100.0
    # ties share their mean rank: x ranks 1 2.5 2.5 4, y ranks 1 2 3 4; d = 0 .5 -.5 0;
    # rho = cov / (sd sd) = (sum dx dy) / sqrt(sum dx^2 sum dy^2) = 4.5 / sqrt(4.5 * 5) = 0.948683
    s = label_scores(["spearman"], torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s["spearman"] == pytest.approx(100 * 4.5 / (4.5 * 5) ** 0.5)
    # undefined cases are NaN (scipy's), not a number: a constant side, a NaN score, one example
    for preds, labels in ((torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])),
                          (torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([1.0, 2.0, 3.0])),
                          (torch.tensor([1.0]), torch.tensor([2.0]))):
        s = label_scores(["pearson", "spearman"], preds, labels)
        assert math.isnan(s["pearson"]) and math.isnan(s["spearman"]), (preds, labels)
    assert list(label_scores(LABEL_METRICS[3:], x, x**2)) == ["pearson", "spearman"]


def test_label_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="integer class ids"):
        label_scores(["accuracy"], torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no predictions"):
        label_scores(["accuracy"], torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        label_scores(["accuracy"], torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D"):
        label_scores(["accuracy"], torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


# --- validation ----------------------------------------------------------------------------------------


def test_check_metrics_errors():
    check_metrics(list(TEXT_METRICS), "text")
    check_metrics(list(LABEL_METRICS), "label")
    with pytest.raises(ConfigError) as err:
        check_metrics(["rouge1", "rougeX"], "text")
    msg = str(err.value)
    assert msg == (
        "data.metrics: unknown metric 'rougeX' for a text task; allowed: rouge1, rouge2, rougeL, "
        "rougeLsum, bleu, squad_em, squad_f1"
    )
    assert "\n" not in msg
    with pytest.raises(
        ConfigError, match=r"^eval.metrics: unknown metric 'rouge1' for a label task; allowed: acc"
    ):
        check_metrics(["rouge1"], "label", key="eval.metrics")
    with pytest.raises(ConfigError, match="a list of metric names"):
        check_metrics("accuracy", "label")
    with pytest.raises(ValueError, match="kind"):
        check_metrics(["accuracy"], "regression")
    with pytest.raises(ConfigError, match="unknown metric 'accuracy'"):
        sentence_scores("accuracy", ["a"], ["a"])
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        label_scores(["bleu"], torch.tensor([0]), torch.tensor([0]))


def test_text_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="no predictions"):
        corpus_scores(["bleu"], [], [])
    with pytest.raises(ValueError, match="no predictions"):
        sentence_scores("rouge1", [], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_scores(["rouge1"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="example 1 has no reference"):
        corpus_scores(["squad_em"], ["a", "b"], ["a", []])
