"""Case ranking from image hits: candidates by votes, MaxSim / votes / pooled scores, the best match and its focus."""

from __future__ import annotations

import numpy as np
import pytest

from CBIRSlicerLib.retrieval import ranking


def test_candidate_cases_count_votes_and_break_ties_by_best_score():
    ids = np.array([[10, 11, 20, -1], [21, 30, 12, -1]])
    scores = np.array([[0.9, 0.8, 0.95, 0.0], [0.7, 0.99, 0.6, 0.0]])
    case_of = {10: 1, 11: 1, 12: 1, 20: 2, 21: 2, 30: 3}
    assert ranking.candidate_cases(ids, scores, case_of, limit=5) == {1: 3, 2: 2, 3: 1}
    # Cases 2 and 3 tie on one vote each; the better single score (0.99 against 0.7) goes first.
    assert list(ranking.candidate_cases(np.array([[20], [30]]), np.array([[0.7], [0.99]]), case_of, limit=5)) == [3, 2]
    as_array = np.full(31, -1)
    for item, case in case_of.items():
        as_array[item] = case
    assert ranking.candidate_cases(ids, scores, as_array, limit=2) == {1: 3, 2: 2}
    assert ranking.candidate_cases(np.array([[-1]]), np.array([[0.0]]), case_of, limit=3) == {}


def test_similarities_match_one_product_split_per_case():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    blocks = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 1, 6)]
    parts = ranking.similarities(queries, blocks)
    assert [p.shape for p in parts] == [(5, 3), (5, 1), (5, 6)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), queries @ np.concatenate(blocks).T, rtol=1e-5, atol=1e-6)
    assert ranking.similarities(queries, []) == []


def test_scores_by_method():
    similarity = np.array([[0.2, 0.9, 0.1], [0.6, 0.3, 0.5]])  # 2 query images x 3 items
    maxsim = ranking.score_case(similarity, "maxsim", votes=4)
    assert maxsim.score == pytest.approx((0.9 + 0.6) / 2)
    assert maxsim.per_image == [0.9, 0.6]
    assert ranking.score_case(similarity, "votes", votes=4).score == 4.0
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    items = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # Pooled: cosine of the mean query (0.5, 0.5) and the mean item (1, 0).
    pooled = ranking.score_case(similarity, "pooled", votes=1, queries=queries, item_vectors=items)
    assert pooled.score == pytest.approx(1 / np.sqrt(2))
    with pytest.raises(ValueError, match="unknown ranking method"):
        ranking.score_case(similarity, "borda", votes=1)


def test_rank_orders_by_score_then_votes_then_best_image():
    a = ranking.CaseScore(0, 0.8, 2, [0.8, 0.8], -1)
    b = ranking.CaseScore(1, 0.8, 3, [0.7, 0.9], -1)
    c = ranking.CaseScore(2, 0.8, 3, [0.95, 0.65], -1)
    d = ranking.CaseScore(3, 0.9, 1, [0.9, 0.9], -1)
    assert [s.case_row for s in ranking.rank([a, b, c, d])] == [3, 2, 1, 0]


def test_locate_picks_the_best_mean_item_and_centres_the_focus_between_equal_neighbours():
    # Five tiles of 20 mm in a row, 10 mm apart, one slice; a sixth item is a whole slice (other size).
    centres = np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0], [40, 0, 0], [20, 0, 0]])
    sizes = np.array([20.0, 20, 20, 20, 20, 200])
    axes = np.array(["axial"] * 6, dtype=object)
    similarity = np.array([[0.50, 0.80, 0.90, 0.80, 0.50, 0.85],
                           [0.50, 0.80, 0.90, 0.80, 0.50, 0.85]])
    best, focus = ranking.locate(similarity, centres, sizes, axes)
    assert best == 2
    # The tiles at 10 and 30 mm overlap the best one and score alike: the focus stays on 20 mm; the whole slice
    # (another size) and the tiles 20 mm away (not overlapping) do not pull it.
    np.testing.assert_allclose(focus, [20.0, 0, 0], atol=1e-9)
    # A better neighbour on one side pulls the focus towards it by its weight exp((s - s_best) / T).
    similarity[:, 3] = 0.89
    _, focus = ranking.locate(similarity, centres, sizes, axes)
    w_left, w_right = np.exp((0.80 - 0.90) / ranking.FOCUS_TEMPERATURE), np.exp((0.89 - 0.90) / ranking.FOCUS_TEMPERATURE)
    expected = (10 * w_left + 20 + 30 * w_right) / (w_left + 1 + w_right)
    assert focus[0] == pytest.approx(expected)
    assert 22.5 < focus[0] < 23.0  # e^-1 weight for the 0.89 neighbour, e^-10 for the 0.80 one


def test_centre_weights_follow_likeness_to_the_central_image():
    # Five region images in slice order: tissue, object, object, object, tissue. Tissue and object are 2-d unit
    # vectors with a cosine of 0.6, so a tissue image weighs exp((0.6 - 1) / T) = exp(-8) of an object image.
    tissue, lesion = [1.0, 0.0], [0.6, 0.8]
    queries = np.array([tissue, lesion, lesion, lesion, tissue])
    weights = ranking.centre_weights(queries)
    small = np.exp((0.6 - 1.0) / ranking.CENTRE_TEMPERATURE)
    np.testing.assert_allclose(weights, np.array([small, 1, 1, 1, small]) / (3 + 2 * small), rtol=1e-9)
    # With an even count the centre is the mean of the two central images; one image weighs 1.
    np.testing.assert_allclose(ranking.centre_weights(np.array([tissue, lesion, lesion, tissue])),
                               np.array([small, 1, 1, small]) / (2 + 2 * small), rtol=1e-9)
    assert ranking.centre_weights(np.array([lesion])).tolist() == [1.0]


def test_maxsim_with_weights_is_the_weighted_mean_of_each_image_best():
    similarity = np.array([[0.9, 0.2, 0.1], [0.3, 0.6, 0.5], [0.4, 0.4, 0.8]])  # best per image: 0.9, 0.6, 0.8
    weights = np.array([0.5, 0.25, 0.25])
    scored = ranking.score_case(similarity, "maxsim", votes=2, weights=weights)
    assert scored.score == pytest.approx(0.5 * 0.9 + 0.25 * 0.6 + 0.25 * 0.8)
    assert ranking.score_case(similarity, "maxsim", votes=2).score == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    assert scored.per_image == [0.9, 0.6, 0.8]  # per-image scores are the images' own, unweighted


def test_locate_with_centre_weights_follows_the_object_where_the_mean_follows_the_tissue():
    # The tissue-only first and last images like item 0 (tissue elsewhere) far better than item 1 (the object);
    # the three object images prefer item 1 by less. The plain mean picks item 0 ((0.95 * 2 + 0.80 * 3) / 5 = 0.860
    # against (0.70 * 2 + 0.90 * 3) / 5 = 0.820); weighted by likeness to the central image, item 1 wins.
    similarity = np.array([[0.95, 0.70], [0.80, 0.90], [0.80, 0.90], [0.80, 0.90], [0.95, 0.70]])
    centres, sizes, axes = np.array([[-60.0, 0, 0], [0.0, 0, 0]]), np.array([32.0, 32.0]), np.array(["axial"] * 2, dtype=object)
    assert ranking.locate(similarity, centres, sizes, axes)[0] == 0
    weights = ranking.centre_weights(np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [1.0, 0.0]]))
    best, focus = ranking.locate(similarity, centres, sizes, axes, weights)
    assert best == 1
    np.testing.assert_allclose(focus, [0.0, 0, 0])


def test_one_blas_thread_limits_numpy_blas_inside_and_restores_it_after():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from CBIRSlicerLib.threads import one_blas_thread

    def blas_threads():
        return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy is linked to a BLAS that threadpoolctl can see"
    with one_blas_thread():
        assert blas_threads() == [1] * len(before)
        product = np.ones((4, 3), np.float32) @ np.ones((3, 2), np.float32)
    assert blas_threads() == before
    assert product.tolist() == [[3.0, 3.0]] * 4
