"""The recommender's evaluation protocols: leave-one-out with full ranking and its baselines, early stopping,
validation/test users and per-group views of the continual runs, and the prototype-leakage scores.

Synthetic logs and tiny models, so the file takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.recsys import simulation as sim
from coordinator.recsys.analysis import Cases, cases, group_mask, hr_ndcg, summarise, user_roles
from coordinator.recsys.baselines import ItemKNNConfig, MFConfig, fit_item_knn, fit_mf, fit_most_popular
from coordinator.recsys.leakage import _scores, genre_counts, top_k
from coordinator.recsys.loo import LeaveOneOut, evaluate, rank_targets, ranking_metrics, sampled_metrics
from edge_client.recsys.data import interactions_from_array
from tests.test_recommender import N_ITEMS


@pytest.fixture(scope="module")
def loo(rec_log) -> LeaveOneOut:
    return LeaveOneOut.from_interactions(interactions_from_array(rec_log))


def test_leave_one_out_keeps_the_last_two_items_apart(loo):
    seq = loo.sequences[0]
    assert np.array_equal(loo.history("train")[0], seq[:-2])
    assert np.array_equal(loo.history("valid")[0], seq[:-2]) and loo.targets("valid")[0] == seq[-2]
    assert np.array_equal(loo.history("test")[0], seq[:-1]) and loo.targets("test")[0] == seq[-1]
    m = loo.train_matrix()
    assert m.shape == (len(loo.users), N_ITEMS + 1) and m[0, seq[-1]] == 0 and m[0, seq[0]] == 1


def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([1, 2, 11, 4]))
    assert m["hr"] == 0.75
    assert m["ndcg"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(5)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 4) / 4)


def test_full_ranking_filters_history_and_counts_ties_against_the_target():
    hist = [np.array([3, 4])]
    scores = np.zeros((1, 6))
    scores[0, [3, 4]] = 10.0  # seen items score highest but are filtered
    scores[0, 5] = 1.0
    r = rank_targets(lambda idx, h: scores, hist, np.array([1]))
    assert r[0] == 3  # item 5 beats it, item 2 ties with it (a tie counts against the target)


def test_oracle_and_sampled_protocol(loo):
    def oracle(idx, hist):
        s = np.zeros((len(hist), N_ITEMS + 1))
        s[np.arange(len(hist)), loo.targets("test")[idx]] = 1.0
        return s

    assert evaluate(oracle, loo, "test")[0]["hr"] == 1.0
    rng = np.random.default_rng(0)
    noise = sampled_metrics(lambda idx, hist: rng.normal(size=(len(hist), N_ITEMS + 1)), loo, n_negatives=20)
    full = evaluate(lambda idx, hist: rng.normal(size=(len(hist), N_ITEMS + 1)), loo, "test")[0]
    assert noise["hr"] > full["hr"]  # 100 sampled negatives are easier than the whole catalogue


def test_baselines_score_every_item(loo):
    for scorer in (fit_most_popular(loo), fit_item_knn(loo, ItemKNNConfig(20, 5.0)),
                   fit_mf(loo, MFConfig("als", factors=8, iterations=5)),
                   fit_mf(loo, MFConfig("bpr", factors=8, iterations=20))):
        s = scorer(np.arange(3), loo.history("test")[:3])
        assert s.shape == (3, N_ITEMS + 1) and np.isfinite(s[:, 1:]).all()


def test_item_knn_scores_by_co_occurrence():
    """Two items always rated together are each other's nearest neighbour; an item never rated with them
    gets nothing from them."""
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([1, 2, 6, 7, 8]), np.array([3, 9, 10, 11, 12])]
    toy = LeaveOneOut(np.arange(3), seqs, 12)
    s = fit_item_knn(toy, ItemKNNConfig(5, 0.0))(np.arange(1), [np.array([1])])[0]
    assert s[2] == s.max() > 0 and s[9] == 0

def test_early_stopping_keeps_the_best_epoch():
    import torch

    from coordinator.models.recommender import SASRec, SASRecConfig
    from coordinator.recsys.training import RecTrainSettings, train_sasrec

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=N_ITEMS, d=8, blocks=1, max_len=5, dropout=0.0))
    x = np.random.default_rng(0).integers(1, N_ITEMS + 1, (16, 5))
    y = np.roll(x, -1, axis=1)
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.1, 0.05, 0.5])
    snapshots = []

    def validate(m):
        snapshots.append(m.item_emb.weight.detach().clone())
        return next(scores)

    hist = train_sasrec(model, x, y, RecTrainSettings(epochs=20, patience=3, threads=1), validate=validate)
    assert hist.best_epoch == 2 and hist.stopped_early and len(hist.losses) == 5
    assert torch.equal(model.item_emb.weight, snapshots[1])  # the weights of epoch 2, not of the last epoch


def test_user_roles_are_seeded_and_split_by_fraction():
    users = [str(u) for u in range(1, 101)]
    a, b = user_roles(users, 0.25), user_roles(list(reversed(users)), 0.25)
    assert a == b and sum(r == "valid" for r in a.values()) == 25


def _result(ranks: dict[int, dict[int, list[int]]]) -> sim.MethodResult:
    res = sim.MethodResult("m")
    for t, by_s in ranks.items():
        st = sim.StageLog(t)
        for s, r in by_s.items():
            st.score(s, np.array(r))
        res.stages.append(st)
    return res


def test_views_pool_the_right_stages_and_groups_split_cases():
    tests = {s: sim.TestSet(["1", "2"], np.zeros((2, 4)), np.array([1, 2]), [np.array([3]), np.array([4])],
                        np.array([5 * s, 50]), np.array([s > 1, True])) for s in (1, 2)}
    res = _result({1: {1: [1, 20], 2: [3, 30]}, 2: {1: [2, 40], 2: [1, 1]}})
    res.stages[0].preq = sim.Prequential.of(["1"], [np.array([1, 2])], [np.array([5, 6])], [False])
    res.stages[1].preq = sim.Prequential.of(["1", "2"], [np.array([3]), np.array([7, 8])],
                                            [np.array([1]), np.array([2, 30])], [True, False])
    cur = cases(res, tests, "current")
    assert cur.ranks.tolist() == [1, 20, 1, 1] and cur.period.tolist() == [1, 1, 2, 2]
    nxt = cases(res, tests, "next")  # prequential, period 1 left out (no device has trained yet)
    assert nxt.ranks.tolist() == [1, 2, 30] and nxt.users.tolist() == ["1", "2", "2"]
    assert nxt.history_len.tolist() == [3, 7, 8] and nxt.returning.tolist() == [True, False, False]
    assert res.stages[1].preq.n == 3 and res.stages[1].preq.hits == 2
    assert cases(res, tests, "final").ranks.tolist() == [2, 40, 1, 1]
    assert group_mask(cur, "new", (10, 40)).tolist() == [True, False, False, False]
    assert group_mask(cur, "heavy", (10, 40)).tolist() == [False, True, False, True]
    roles = {"1": "test", "2": "valid"}
    out = summarise(res, tests, roles, "test", (10, 40))
    assert out["current"]["all"] == hr_ndcg(np.array([1, 1]))
    assert out["forgetting"]["all"]["ndcg"] == pytest.approx(1.0 - 1 / np.log2(3))  # user 1: rank 1 -> 2
    assert isinstance(cur, Cases) and len(cur) == 4


def test_leakage_scores_by_hand():
    genres = np.zeros((4, 18), bool)
    genres[1, 7] = genres[2, 7] = genres[2, 4] = genres[3, 0] = True
    c = genre_counts(np.array([1, 2, 2, 3]), genres)
    assert c[7] == 3 and c[4] == 2 and c[0] == 1 and top_k(c, 3).tolist() == [7, 4, 0]
    s = _scores(np.array([[7, 0, 4], [1, 2, 3]]), np.stack([c, c]))
    assert s["top1_accuracy"] == 0.5 and s["true_top1_in_guessed_top3"] == 0.5
    assert s["top3_overlap"] == pytest.approx(0.5)
