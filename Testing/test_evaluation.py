"""Retrieval metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from CBIRSlicerLib.evaluation import average_precision_at_k, micro_macro, modified_precision_at_k


def test_modified_precision_caps_k_at_the_class_size():
    ranked = [True, False, True, True, False]
    assert modified_precision_at_k(ranked, 1, 3) == 1.0
    assert modified_precision_at_k(ranked, 3, 3) == pytest.approx(2 / 3)  # k capped at 3 relevant items
    assert modified_precision_at_k(ranked, 5, 3) == pytest.approx(2 / 3)  # still capped at 3
    assert modified_precision_at_k(ranked, 5, 10) == pytest.approx(3 / 5)  # plain P@5 when the class is large
    assert modified_precision_at_k(ranked, 3, 0) is None


def test_average_precision_at_k_by_hand():
    ranked = [True, False, True, True, False]
    # Relevant at ranks 1, 3, 4: precisions 1/1, 2/3, 3/4; over min(k, relevant) = 3.
    assert average_precision_at_k(ranked, 5, 3) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision_at_k(ranked, 2, 3) == pytest.approx(1 / 2)  # only rank 1 counts, over min(2, 3)
    assert average_precision_at_k([False, False], 2, 1) == 0.0


def test_micro_and_macro_differ_when_classes_are_unbalanced():
    values = [1.0, 1.0, 1.0, 0.0, None]
    classes = ["a", "a", "a", "b", "b"]
    micro, macro = micro_macro(values, classes)
    assert micro == pytest.approx(0.75) and macro == pytest.approx(0.5)
    assert all(math.isnan(v) for v in micro_macro([None], ["a"]))
