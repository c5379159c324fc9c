"""Uncertainty measures against hand-computed values, and the bad inputs they must refuse."""
import math

import numpy as np
import pandas as pd
import pytest

from usermirror_nb.uncertainty import entropy_bits, scene_metrics, uncertainty


def h(*p):  # entropy in bits, written out by hand
    return -sum(x * math.log2(x) for x in p if x > 0)


def test_entropy_hand_values():
    assert entropy_bits([1.0, 0.0, 0.0]) == 0.0
    assert entropy_bits([0.5, 0.5]) == pytest.approx(1.0)
    assert entropy_bits([0.25] * 4) == pytest.approx(2.0)
    assert entropy_bits([0.7, 0.2, 0.1]) == pytest.approx(0.7 * 0.514573 + 0.2 * 2.321928 + 0.1 * 3.321928, abs=1e-5)


def test_decomposition_three_rationales():
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.4, 0.4, 0.2]])
    u = uncertainty(P)
    E = (h(0.7, 0.2, 0.1) + h(0.1, 0.8, 0.1) + h(0.4, 0.4, 0.2)) / 3
    U = h(0.4, 1.4 / 3, 0.4 / 3)
    assert u["expected_entropy"] == pytest.approx(E, abs=1e-9)
    assert u["total_uncertainty"] == pytest.approx(U, abs=1e-9)
    assert u["mutual_information"] == pytest.approx(U - E, abs=1e-9)
    assert u["mutual_information"] >= 0
    assert np.allclose(u["entropies"], [h(0.7, 0.2, 0.1), h(0.1, 0.8, 0.1), h(0.4, 0.4, 0.2)])


def test_agreeing_rationales_have_no_mutual_information():
    P = np.tile([0.6, 0.3, 0.1], (4, 1))
    u = uncertainty(P)
    assert u["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert u["expected_entropy"] == pytest.approx(u["total_uncertainty"])


@pytest.mark.parametrize("bad,msg", [([0.5, float("nan")], "NaN"), ([0.0, 0.0], "sum to 1"), ([1.2, -0.2], "negative"),
                                     ([0.5, float("inf")], "NaN or inf")])
def test_bad_probabilities_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        entropy_bits(bad)


def test_empty_matrix_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        uncertainty(np.zeros((0, 5)))


def test_scene_metrics_differences():
    rows = []
    for role, probs, stated in (("teacher", [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]], ["A", "A"]),
                                ("student", [[1 / 3] * 3, [0.2, 0.5, 0.3]], ["B", ""])):
        for j, (p, s) in enumerate(zip(probs, stated)):
            rows.append(dict(scene_id="s", domain="d", role=role, sample=j, gt_pos=0, choice_cnt=3, probs=p, stated=s, letter_mass=0.5))
    m = scene_metrics(pd.DataFrame(rows)).iloc[0]
    Et = (h(0.9, 0.05, 0.05) + h(0.8, 0.1, 0.1)) / 2
    Es = (math.log2(3) + h(0.2, 0.5, 0.3)) / 2
    assert m.teacher_expected_entropy == pytest.approx(Et)
    assert m.student_expected_entropy == pytest.approx(Es)
    assert m.diff_model_uncertainty == pytest.approx(Es - Et)
    assert (m.teacher_stated_hit, m.student_stated_hit) == (1.0, 0.0)
    assert m.teacher_argmax_hit == 1.0 and m.student_argmax_hit == 0.5   # [1/3]*3 argmax is A
    assert m.teacher_prob_gt == pytest.approx(0.85)
    assert m.diff_prob_gt == pytest.approx(0.85 - (1 / 3 + 0.2) / 2)


def test_scene_metrics_missing_role_is_nan():
    rows = [dict(scene_id="s", domain="d", role="teacher", sample=0, gt_pos=1, choice_cnt=2, probs=[0.5, 0.5], stated="B", letter_mass=1.0)]
    m = scene_metrics(pd.DataFrame(rows)).iloc[0]
    assert math.isnan(m.student_expected_entropy) and math.isnan(m.diff_model_uncertainty)
    assert m.teacher_expected_entropy == pytest.approx(1.0)
