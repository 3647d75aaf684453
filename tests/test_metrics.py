"Metrics on small hand-made arrays: accuracy, per-class accuracy, HM and the average row, confusions, CAPT's bank."
import math
import numpy as np
import pytest, torch
from cocoamix.metrics import (accuracy, per_class_accuracy, harmonic_mean, confusion_matrix, confusion_bank,
                              confusable_pairs_resolved, most_confused_pairs, base_new_summary, average_row)


def test_accuracy_from_logits_preds_and_tensors():
    logits = [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.3, 0.3, 0.4]]
    labels = [1, 0, 2, 0]
    assert accuracy(logits, labels) == 75.0
    assert accuracy(np.array([1, 0, 2, 2]), np.array(labels)) == 75.0
    assert accuracy(torch.tensor(logits), torch.tensor(labels)) == 75.0
    assert accuracy([0, 0, 0], [1, 1, 1]) == 0.0
    assert isinstance(accuracy([1], [1]), float)
    assert math.isnan(accuracy(np.array([], dtype=int), np.array([], dtype=int)))
    with pytest.raises(ValueError): accuracy([0, 1], [0, 1, 2])


def test_per_class_accuracy():
    preds, labels = [0, 0, 1, 2, 2, 1], [0, 0, 0, 2, 2, 2]
    pca = per_class_accuracy(preds, labels, 4)
    assert pca.shape == (4,)
    np.testing.assert_allclose(pca[[0, 2]], [200 / 3, 200 / 3])
    assert np.isnan(pca[1]) and np.isnan(pca[3])
    # the mean over present classes is the class-balanced accuracy
    assert np.nanmean(per_class_accuracy([0, 1, 1, 1], [0, 1, 1, 0], 2)) == pytest.approx((50 + 100) / 2)


def test_harmonic_mean_and_rows():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.5714285714)
    assert harmonic_mean(0, 0) == 0 and harmonic_mean(0, 70) == 0 and harmonic_mean(70, 70) == 70
    row = base_new_summary(82.69, 63.22)
    assert row == {'base': 82.69, 'new': 63.22, 'hm': pytest.approx(71.66, abs=0.01)}  # CoOp's published average


def test_average_row_is_hm_of_averages():
    rows = [base_new_summary(95.0, 40.0), base_new_summary(65.0, 80.0), base_new_summary(80.0, 60.0)]
    avg = average_row(rows)
    assert avg['base'] == pytest.approx(80.0) and avg['new'] == pytest.approx(60.0)
    assert avg['hm'] == pytest.approx(harmonic_mean(80.0, 60.0))
    assert avg['hm'] != pytest.approx(np.mean([r['hm'] for r in rows]))
    # extra keys (dataset names and so on) are ignored
    assert average_row([dict(dataset='dtd', base=50, new=50, hm=50)]) == {'base': 50, 'new': 50, 'hm': 50}
    with pytest.raises(ValueError): average_row([])


def test_confusion_matrix_and_most_confused():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 1, 1, 1, 0, 2, 0, 1, 1]
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[1, 2, 0], [1, 1, 0], [1, 2, 1]]
    assert cm.sum() == 9 and np.trace(cm) == 3
    assert most_confused_pairs(cm, k=3) == [(0, 1, 2), (2, 1, 2), (1, 0, 1)]  # ties broken by (true, pred)
    assert most_confused_pairs(cm, k=10) == [(0, 1, 2), (2, 1, 2), (1, 0, 1), (2, 0, 1)]  # zeros left out
    assert most_confused_pairs(np.eye(3, dtype=int)) == []
    assert confusion_matrix(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([1, 1]), 2).tolist() == [[0, 0], [1, 1]]


def test_confusion_bank_and_pairs_resolved():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    zs = np.array([0, 2, 2, 0, 1, 2, 2, 3])       # zero-shot errors: idx 1 (1->2), 3 (3->0), 4 (0->1), 5 (1->2)
    bank = confusion_bank(zs, labels)
    assert list(bank) == [(1, 2), (0, 1), (3, 0)]  # most frequent first
    assert bank[(1, 2)].tolist() == [1, 5] and bank[(0, 1)].tolist() == [4] and bank[(3, 0)].tolist() == [3]
    assert sum(len(v) for v in bank.values()) == int((zs != labels).sum())
    method = np.array([0, 1, 2, 0, 0, 2, 1, 3])   # fixes 1 and 4, not 3 or 5; breaks 6 (not counted)
    assert confusable_pairs_resolved(zs, method, labels) == 50.0


def test_pairs_resolved_three_errors_two_fixed():
    labels = [0, 1, 2, 0, 1]
    zs = [1, 1, 0, 2, 1]        # 3 zero-shot errors: idx 0, 2, 3
    method = [0, 0, 2, 1, 1]    # fixes 0 and 2, not 3 (and breaks 1: irrelevant here)
    assert confusable_pairs_resolved(zs, method, labels) == pytest.approx(200 / 3, abs=1e-9)
    assert round(confusable_pairs_resolved(zs, method, labels), 2) == 66.67
    assert math.isnan(confusable_pairs_resolved(labels, method, labels))  # zero-shot perfect
    assert confusion_bank(labels, labels) == {}
    # logits are accepted too
    zs_logits = np.eye(3)[zs]
    assert confusable_pairs_resolved(zs_logits, torch.tensor(method), labels) == pytest.approx(200 / 3)


def test_out_of_range_classes_are_rejected():
    with pytest.raises(ValueError, match='labels'): per_class_accuracy([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match='predictions'): confusion_matrix([0, 5], [0, 1], 3)
