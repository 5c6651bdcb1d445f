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
