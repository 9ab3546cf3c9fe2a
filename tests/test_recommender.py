"""Recommender (SASRec + FCUCR): data split, metrics, exact gradients, ONNX parity, a torch-free
device, what a device uploads, the user's export/delete, and a tiny end-to-end continual run.

Everything runs on a synthetic interaction log (seeded) and a tiny SASRec so the file takes
seconds; one test reads the real MovieLens-100K when the data directory has it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_client.recsys.adapter import RecAdapterConfig, Teacher, adapter_loss_and_grad, init_adapter, represent
from edge_client.recsys.data import (
    PAD,
    continual_split,
    hit_ndcg,
    interactions_from_array,
    prefix_batch,
    ranks,
    training_windows,
)
from edge_client.recsys.device import RecDevice
from edge_client.recsys.encoder import load_encoder

ROOT = Path(__file__).resolve().parent.parent
N_ITEMS = 60


@pytest.fixture(scope="module")
def split(rec_log):
    return continual_split(interactions_from_array(rec_log), n_periods=3, pretrain_frac=0.4)


# ------------------------------------------------------------------------------ data + metrics


def test_metrics_on_a_hand_made_example():
    scores = np.array([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # PAD column is ignored
                       [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],
                       [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    targets = np.array([3, 3, 2])
    r = ranks(scores, targets, [np.array([], np.int64), np.array([1, 2]), np.array([], np.int64)])
    assert r.tolist() == [3, 1, 5]  # excluded history moves item 3 to the top; ties count against
    hr, ndcg = hit_ndcg(r, k=2)
    assert hr == pytest.approx(1 / 3)
    assert ndcg == pytest.approx((1.0 / np.log2(2)) / 3)
    hr10, ndcg10 = hit_ndcg(r, k=10)
    assert hr10 == 1.0
    assert ndcg10 == pytest.approx(np.mean([1 / np.log2(4), 1.0, 1 / np.log2(6)]))


def test_continual_split_holds_out_one_item_per_user_and_period(split):
    assert split.n_periods == 3 and len(split.logs) == 40
    for log in split.logs.values():
        assert np.all(np.diff(log.ts) >= 0) and np.all(np.diff(log.period) >= 0)
        for p in range(1, 4):
            train = log.train_positions(p)
            test = log.test_position(p)
            assert 0 not in train
            if test is not None:
                assert test not in train and test == np.flatnonzero(log.period == p)[-1]
                assert np.all(train < test)
        assert not log.is_test[log.period == 0].any()


def test_prefix_batch_and_training_windows():
    items = np.array([5, 6, 7, 8, 9])
    x = prefix_batch(items, np.array([0, 2, 5]), 3)
    assert x.tolist() == [[PAD, PAD, PAD], [PAD, 5, 6], [7, 8, 9]]
    xs, ys = training_windows(items, np.array([False, True, False, True, True]), 3)
    assert xs.tolist() == [[6, 7, 8], [PAD, PAD, 5]]
    assert ys.tolist() == [[PAD, 8, 9], [PAD, PAD, 6]]


def test_real_movielens_loads_when_present():
    from edge_client.data.datasets import DatasetNotFound
    from edge_client.recsys.data import load_ml100k

    try:
        data = load_ml100k()
    except DatasetNotFound:
        pytest.skip("MovieLens-100K is not in the data directory")
    assert len(data) == 100_000 and data.n_items == 1682 and len(np.unique(data.user)) == 943


# ------------------------------------------------------------------------------ gradients


def _fd_check(params, h, targets, items, p_tilde, teacher, eps=1e-6):
    _, grads = adapter_loss_and_grad(params, h, targets, items, p_tilde, teacher, 2.0)
    rng = np.random.default_rng(1)
    for key, g in grads.items():
        flat = params[key].reshape(-1)
        for idx in rng.choice(flat.size, min(6, flat.size), replace=False):
            old = flat[idx]
            flat[idx] = old + eps
            lp, _ = adapter_loss_and_grad(params, h, targets, items, p_tilde, teacher, 2.0)
            flat[idx] = old - eps
            lm, _ = adapter_loss_and_grad(params, h, targets, items, p_tilde, teacher, 2.0)
            flat[idx] = old
            num = (lp - lm) / (2 * eps)
            assert abs(num - g.reshape(-1)[idx]) < 1e-6 + 1e-4 * abs(num), (key, idx, num, g.reshape(-1)[idx])
    return grads


def test_every_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    d, n = 8, 7
    items = rng.normal(0, 0.5, (N_ITEMS + 1, d))  # float64 table: FD needs the exact loss
    params = init_adapter(d, RecAdapterConfig(rank=3, item_rank=2), rng, n_items=N_ITEMS)
    params = {k: v + rng.normal(0, 0.3, v.shape) for k, v in params.items()}  # away from the init's zeros
    h = rng.normal(size=(n, d))
    targets = rng.integers(1, N_ITEMS + 1, n)
    p_tilde = rng.normal(size=d)
    cand = np.unique(rng.integers(1, N_ITEMS + 1, 15))
    teacher = Teacher(cand, rng.normal(size=(n, len(cand))), weight=0.4)
    grads = _fd_check(params, h, targets, items, p_tilde, teacher)
    assert set(grads) == {"U", "V", "u", "Wg", "bg", "item_b", "item_A", "item_B"}
    assert not grads["item_b"][PAD].any() and not grads["item_A"][PAD].any()  # padding is never a candidate
    # the same with parts switched off: no gate (no p̃), no teacher, adapter only
    grads = _fd_check({k: params[k] for k in ("U", "V")}, h, targets, items, None, None)
    assert set(grads) == {"U", "V"}
    grads = _fd_check({k: params[k] for k in ("u", "item_b")}, h, targets, items, None, teacher)  # bias only
    assert set(grads) == {"u", "item_b"}


def test_item_adapter_scores_what_it_trains():
    """full_scores and the distillation candidates add the item adapter exactly as the loss does."""
    from edge_client.recsys.adapter import candidate_scores, full_scores

    rng = np.random.default_rng(3)
    d = 6
    items = rng.normal(0, 0.5, (N_ITEMS + 1, d))
    params = init_adapter(d, RecAdapterConfig(rank=2, item_rank=3), rng, n_items=N_ITEMS)
    params = {k: v + rng.normal(0, 0.3, v.shape) for k, v in params.items()}
    z = rng.normal(size=(4, d))
    s = full_scores(z, items, params)
    want = z @ (items + params["item_A"] @ params["item_B"]).T + params["item_b"]
    np.testing.assert_allclose(s[:, 1:], want[:, 1:], rtol=1e-10)
    assert np.all(s[:, PAD] == -np.inf)
    cand = np.array([5, 1, 17])
    np.testing.assert_allclose(candidate_scores(params, z, items, cand), want[:, cand], rtol=1e-10)
    np.testing.assert_array_equal(full_scores(z, items)[:, 1:], z @ items[1:].T)  # no adapter: the plain table


def test_distillation_keeps_the_new_model_near_the_snapshot(split, bundle):
    encoder, items = load_encoder(bundle["dir"])
    log = max(split.logs.values(), key=lambda lg: len(lg.train_positions(2)) + len(lg.train_positions(1)))
    cfg = RecAdapterConfig(rank=4, steps=40, lr=2e-2, tau_days=1e6, lambda_sd=5.0)

    def drift(distill: bool) -> float:
        dev = RecDevice("u", encoder, items, cfg, shared_keys=(), use_gate=False, seed=3)
        dev.receive(log.items, log.ts)
        dev.train(log.train_positions(1))
        probe = np.arange(1, len(log.items) + 1)
        before = represent(dev.params(), dev.reprs(probe))
        dev.train(log.train_positions(2), distill=distill)
        return float(np.abs(represent(dev.params(), dev.reprs(probe)) - before).mean())

    assert drift(True) < drift(False)


# ------------------------------------------------------------------------------ export + device


def test_onnx_encoder_matches_torch(bundle):
    parity = bundle["export"].parity
    assert parity.ok(1e-4), parity
    assert parity.batch_sizes == [1, 8]
    assert bundle["losses"][-1] < bundle["losses"][0]


BLOCK_TORCH = """
import sys
from hardware.device_guard import block_imports
block_imports()
import numpy as np
from edge_client.recsys.device import RecDevice
from edge_client.recsys.adapter import RecAdapterConfig
from edge_client.recsys.encoder import load_encoder
encoder, items = load_encoder(sys.argv[1])
dev = RecDevice('me', encoder, items, RecAdapterConfig(rank=4, steps=5), shared_keys=('U', 'V'), seed=0)
dev.receive(np.arange(1, 21), np.arange(20) * 3600)
dev.p_tilde = np.ones(items.shape[1])
dev.train(np.arange(1, 15))
dev.receive(np.arange(21, 31), 30 * 86400 + np.arange(10) * 3600)
stats = dev.train(np.arange(21, 30), distill=True)
top = dev.recommend(10)
assert len(top) == 10 and not set(top.tolist()) & set(dev.history.tolist()), top
assert 0 < stats.distill_weight < 0.5
assert 'torch' not in sys.modules, 'torch was imported'
print('NO_TORCH_OK', top.tolist())
"""


def test_device_trains_and_ranks_without_torch(bundle):
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(bundle["dir"])], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "NO_TORCH_OK" in out.stdout


def test_device_scores_match_the_torch_model(split, bundle):
    import torch

    encoder, items = load_encoder(bundle["dir"])
    log = next(iter(split.logs.values()))
    dev = RecDevice("u", encoder, items, RecAdapterConfig(rank=4), shared_keys=(), use_gate=False)
    dev.receive(log.items, log.ts)
    pos = np.arange(1, len(log.items))
    with torch.no_grad():
        ref = bundle["model"].scores(bundle["model"].encode(torch.from_numpy(prefix_batch(log.items, pos, 10))))
    s = dev.scores(pos)  # untrained adapter = identity (U = 0, u = 0)
    assert np.abs(s[:, 1:] - ref.numpy()[:, 1:]).max() < 1e-4


def test_upload_contains_no_item_ids_and_fixed_shapes(split, bundle):
    encoder, items = load_encoder(bundle["dir"])
    shapes = []
    for log in list(split.logs.values())[:2]:
        dev = RecDevice("u", encoder, items, RecAdapterConfig(rank=4, steps=3), shared_keys=("U", "V"))
        dev.set_shared({k: v for k, v in init_adapter(16, RecAdapterConfig(rank=4), np.random.default_rng(0)).items()
                        if k in ("U", "V")})
        dev.receive(log.items, log.ts)
        dev.train(np.arange(1, len(log.items)))
        msg = dev.upload()
        assert set(msg) == {"n_samples", "delta", "prototype"}
        assert set(msg["delta"]) == {"U", "V"}  # the user vector and the gate never leave
        arrays = [*msg["delta"].values(), msg["prototype"]]
        assert all(a.dtype == np.float32 for a in arrays)
        shapes.append([a.shape for a in arrays])
        assert msg["prototype"].shape == (16,)
    assert shapes[0] == shapes[1]  # nothing in the message grows with (or reveals) the history length


def test_export_import_and_forget_me(split, bundle, tmp_path):
    encoder, items = load_encoder(bundle["dir"])
    log = next(iter(split.logs.values()))
    dev = RecDevice("alice", encoder, items, RecAdapterConfig(rank=4, steps=5), shared_keys=("U", "V"))
    dev.set_shared(init_adapter(16, RecAdapterConfig(rank=4), np.random.default_rng(0)))
    dev.receive(log.items, log.ts)
    dev.p_tilde = np.full(16, 0.1)
    dev.train(np.arange(1, len(log.items)), distill=False)
    path = dev.export_state(tmp_path / "alice.npz")
    with np.load(path) as z:
        assert z["history_items"].tolist() == log.items.tolist()
        assert {"personal/u", "personal/Wg", "personal/bg"} <= set(z.files)
    moved = RecDevice("alice", encoder, items, RecAdapterConfig(rank=4), shared_keys=("U", "V"))
    moved.import_state(path)
    np.testing.assert_allclose(moved.scores(np.array([3])), dev.scores(np.array([3])), rtol=1e-6)
    deleted = dev.forget_me(exported=path)
    assert deleted["interactions"] == len(log.items) and deleted["file"] == 1 and deleted["snapshot"] == 1
    assert len(dev.history) == 0 and dev.snapshot is None and dev.p_tilde is None and not path.exists()
    assert np.all(dev.personal["u"] == 0)


# ------------------------------------------------------------------------------ coordinator


def test_prototype_server_mixes_similar_users_only():
    from coordinator.recsys.simulation import PrototypeServer

    server = PrototypeServer(top_m=2, temperature=0.1)
    server.submit("a", np.array([1.0, 0.0]))
    server.submit("b", np.array([0.9, 0.1]))
    server.submit("c", np.array([1.0, 0.05]))
    server.submit("d", np.array([-1.0, 0.0]))
    mixed = server.neighbours(["a", "d"])
    assert mixed["a"][0] > 0.9  # b and c, never itself, never the opposite user d
    assert mixed["d"][0] > 0.8  # d's two nearest are still the closest of what exists
    assert PrototypeServer().neighbours(["x"]) == {}


def test_tiny_continual_run_has_every_method(split, bundle):
    from coordinator.recsys.simulation import RecSimConfig, run_all

    encoder, items = load_encoder(bundle["dir"])
    cfg = RecSimConfig(adapter=RecAdapterConfig(rank=4, steps=5), top_m=3)
    cfg = replace(cfg, finetune=replace(cfg.finetune, epochs=1, threads=1))
    results = run_all(split, bundle["model"], encoder, items, cfg)
    assert set(results) == {"most-popular", "central-sasrec", "central-finetune", "local-only", "fedavg",
                            "fedavg+items", "fcucr", "fcucr-no-distill", "fcucr-no-proto", "fcucr-no-items"}
    for name, res in results.items():
        summary = res.summary()
        assert [st.period for st in res.stages] == [1, 2, 3], name
        assert 0 <= summary["next_hr"] <= 1 and 0 <= summary["final_ndcg"] <= summary["final_hr"] + 1e-12, name
        assert np.isfinite(summary["forget_ndcg"]), name
    fcucr = results["fcucr"].summary()
    assert 0 < fcucr["bytes_up_per_device"] < 32 * 1024  # DESIGN §8 upload budget
    assert results["fcucr"].stages[-1].mean_distill_weight > 0
    assert results["central-sasrec"].summary()["forget_hr"] == 0.0  # a frozen model cannot forget
    for name, res in results.items():  # every period's interactions scored before training on them
        for st in res.stages:
            n = sum(len(lg.period_positions(st.period)) for lg in split.logs.values())
            assert st.preq is not None and st.preq.n == n and 0 <= st.preq.hr <= 1, name
    first = results["fedavg"].stages[0].preq  # period 1: no device has trained yet, so it equals the frozen model
    frozen = results["central-sasrec"].stages[0].preq
    assert first is not None and frozen is not None and np.array_equal(first.ranks, frozen.ranks)


def test_a_noised_fleets_neighbour_mix_is_bounded_on_arrival(bundle):
    """With prototype DP a device clips p̃ to the public bound C (a mix of noised prototypes keeps their noise and
    would otherwise swamp the scores); exact fleets take p̃ as it comes. Its upload is clipped (σ = 0) or noised."""
    encoder, items = load_encoder(bundle["dir"])
    d = items.shape[1]
    big = np.full(d, 3.0, np.float32)
    for proto_dp, want in ((None, big), ((1.0, 0.0), big / np.linalg.norm(big))):
        dev = RecDevice("u", encoder, items, RecAdapterConfig(rank=4), proto_dp=proto_dp)
        dev.set_p_tilde(big)
        np.testing.assert_allclose(dev.p_tilde, want, rtol=1e-6)
        dev.receive(np.arange(1, 30), np.arange(29))
        sent = dev.upload_prototype(np.random.default_rng(0))
        assert sent.dtype == np.float32 and (proto_dp is None or np.linalg.norm(sent) <= 1.0 + 1e-6)
    dev = RecDevice("u", encoder, items, RecAdapterConfig(rank=4), proto_dp=(1.0, 2.0))
    dev.receive(np.arange(1, 30), np.arange(29))
    a, b = dev.upload_prototype(np.random.default_rng(0)), dev.upload_prototype(np.random.default_rng(1))
    assert not np.allclose(a, b)
