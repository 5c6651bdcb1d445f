import torch

from eetrain.layer_metrics import LayerStats, format_table


def test_layer_stats_hand_checked():
    stats = LayerStats((1, 2, 3))
    labels = torch.tensor([4, 5, 6, 7])
    preds = torch.tensor([[4, 0, 0, 1], [4, 5, 0, 9], [4, 5, 6, 9]])
    ce = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 4.0]])
    stats.update(preds[:, :2], ce[:, :2], labels[:2])
    stats.update(preds[:, 2:], ce[:, 2:], labels[2:])
    rows = stats.compute()
    assert [r["acc"] for r in rows] == [0.25, 0.5, 0.75]
    # agreement with the last row: layer 1 matches on token 0 only; layer 2 on 0, 1, 3
    assert [r["agree"] for r in rows] == [0.25, 0.75, 1.0]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 1.0]
    assert "agree_last" in format_table(rows)


def test_layer_stats_of_regression_scores_hand_checked():
    # scores (L = 2, N = 3) against labels 1, 2, 3: squared errors layer 1: 1, 0, 4; layer 2: 0, 0.25, 0
    stats = LayerStats((1, 2))
    labels = torch.tensor([1.0, 2.0, 3.0])
    scores = torch.tensor([[2.0, 2.0, 1.0], [1.0, 2.5, 3.0]])
    stats.update(scores, (scores - labels) ** 2, labels)
    assert stats.compute() == [{"layer": 1, "loss": 5 / 3}, {"layer": 2, "loss": 0.25 / 3}]
    assert format_table(stats.compute()).splitlines()[0].split() == ["layer", "mse"]
