"""Federated pretraining strategies on tiny synthetic silos (no dataset files needed, < 60 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.fleet import aggregation
from coordinator.models.tsfm import TSFM, TSFMConfig
from coordinator.pretrain.federated import FederatedSettings, local_training, run_federated
from coordinator.pretrain.silos import Silo
from coordinator.pretrain.strategies import STRATEGIES, make_strategy, params_of
from coordinator.pretrain.strategies.bilevel import grl
from coordinator.pretrain.strategies.fedpm import quantize
from coordinator.pretrain.windows import WindowPool, window_starts

CFG = TSFMConfig(context=32, horizon=8, patch_len=8, stride=8, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                 feature_dim=16, dropout=0.1)


def _silo(domain: str, period: int, channels: int, seed: int) -> Silo:
    rng = np.random.default_rng(seed)
    span = CFG.context + CFG.horizon
    chunks, starts, subs, offset = [], [], [], 0
    for c in range(channels):
        t = np.arange(200)
        x = (np.sin(2 * np.pi * t / period + c) + 0.1 * rng.standard_normal(200)).astype(np.float32)
        s = window_starts(x, span, 4, len(x))
        chunks.append(x)
        starts.append(s + offset)
        subs.append(np.full(len(s), c))
        offset += len(x)
    return Silo(domain, (domain,), WindowPool(np.concatenate(chunks), np.concatenate(starts), span),
                np.concatenate(subs).astype(np.int64), channels)


SILOS = [_silo("energy", 24, 2, 0), _silo("finance", 7, 1, 1), _silo("nature", 12, 3, 2)]
VAL = [(np.stack([SILOS[0].pool.flat[i : i + CFG.context] for i in range(0, 60, 20)]),
        np.stack([SILOS[0].pool.flat[i + CFG.context : i + CFG.context + CFG.horizon] for i in range(0, 60, 20)]))]
HP = {"fedpm": (("personal_slots", 4), ("shared_slots", 4)), "bilevel": (("n_protos", 3),)}


def _settings(strategy: str, rounds: int = 2) -> FederatedSettings:
    return FederatedSettings(strategy=strategy, rounds=rounds, local_steps=2, batch_size=8, lr=3e-3,
                             hparams=HP.get(strategy, ()))


def _run(strategy: str, rounds: int = 2, **kw):
    return run_federated(CFG, _settings(strategy, rounds), silos=SILOS, val_sets=VAL, threads=1, **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_rounds_change_weights_through_fleet_aggregation(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = aggregation.weighted_mean

    def spy(deltas, weights):
        calls.append(len(weights))
        return original(deltas, weights)

    monkeypatch.setattr(aggregation, "weighted_mean", spy)
    torch.manual_seed(0)
    initial = params_of(TSFM(CFG))
    result = _run(strategy)
    final = params_of(result.model)
    assert len(result.history) == 2
    assert any(not np.allclose(initial[k], final[k]) for k in initial)
    assert calls, "server aggregation must go through coordinator.fleet.aggregation.weighted_mean"
    assert np.isfinite(result.val_mse)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "scaffold", "bilevel", "fedal", "fedpm"])
def test_every_silo_strategy_weighs_silos_by_windows_to_the_weight_power(strategy: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """weight_power p: a silo's say in every server average is n^p -- by windows at 1 (the silos here hold 2, 1
    and 3 channels' windows), every silo alike at 0; a power outside [0, 1] is refused for every strategy."""
    import dataclasses

    original, seen = aggregation.weighted_mean, []

    def spy(deltas, weights):
        seen.append(np.asarray(weights, float) / np.sum(weights))
        return original(deltas, weights)

    monkeypatch.setattr(aggregation, "weighted_mean", spy)
    sizes = np.array([s.n_samples for s in SILOS], float)
    assert len(set(sizes)) == len(sizes)
    for power in (1.0, 0.0):
        seen.clear()
        own = (("uniform", True),) if strategy == "bilevel" else ()  # its distance weights on top: off here
        settings = dataclasses.replace(_settings(strategy, 1),
                                       hparams=(*HP.get(strategy, ()), *own, ("weight_power", power)))
        run_federated(CFG, settings, silos=SILOS, val_sets=VAL, threads=1)
        expected = sizes**power / np.sum(sizes**power)
        averages = [w for w in seen if len(w) == len(SILOS)]
        assert averages, "the server averages over the silos through aggregation.weighted_mean"
        if strategy == "fedal":  # GBE's reference mean delta is weighted by n^p, then GBE reweights by agreement
            assert np.allclose(averages[0], expected) and not np.allclose(averages[1], expected)
        else:  # every average over the silos (SCAFFOLD: the deltas and the control variates)
            for w in averages:
                np.testing.assert_allclose(w, expected, rtol=1e-9)
    with pytest.raises(ValueError, match=r"weight_power must be in \[0, 1\]"):
        make_strategy(strategy, weight_power=1.5)


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold", "bilevel", "fedal", "fedpm"])
def test_resume_matches_uninterrupted_run(strategy: str, tmp_path) -> None:
    full = _run(strategy, rounds=3)
    ckpt = tmp_path / "run.round.pt"
    interrupted = _run(strategy, rounds=3, checkpoint=ckpt, stop_after=2)
    resumed = _run(strategy, rounds=3, checkpoint=ckpt)
    assert len(resumed.history) == 3
    assert resumed.wall_s > interrupted.wall_s  # training time counts the rounds done before the interruption
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [h["val_mse"] for h in full.history] == [h["val_mse"] for h in resumed.history]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path) -> None:
    ckpt = tmp_path / "run.round.pt"
    _run("fedavg", rounds=2, checkpoint=ckpt, stop_after=1)
    with pytest.raises(ValueError, match="different run"):
        _run("fedprox", rounds=2, checkpoint=ckpt)


def test_grl_flips_gradient_sign() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    (grl(x, 0.5) * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))
    assert torch.equal(grl(x, 1.0), x)


def test_vq_straight_through_gradient_and_codebook_gradient() -> None:
    codebook = torch.randn(5, 4, requires_grad=True)
    z = torch.randn(2, 3, 4, requires_grad=True)
    z_q, e, idx = quantize(z, codebook)
    assert torch.allclose(z_q, codebook[idx].view_as(z))  # forward: the memory entries
    w = torch.randn_like(z)
    (z_q * w).sum().backward()
    assert torch.allclose(z.grad, w)  # backward: copied straight through to the encoder
    assert codebook.grad is None or torch.count_nonzero(codebook.grad) == 0  # task loss does not move memory
    torch.nn.functional.mse_loss(e, z.detach()).backward()
    assert torch.count_nonzero(codebook.grad) > 0  # the codebook loss does


def test_dbe_bias_stays_local() -> None:
    strategy = make_strategy("fedal")
    settings = _settings("fedal")
    torch.manual_seed(0)
    model = TSFM(CFG)
    client = strategy.init_client(model, SILOS[0])
    server: dict = {}
    worker = TSFM(CFG)
    for rnd in range(2):
        global_params = {k: torch.from_numpy(v) for k, v in params_of(model).items()}
        upload = local_training(strategy, worker, SILOS[0], client, server, global_params, settings, rnd, 0)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in
                               strategy.server_update(params_of(model), [upload], server, rnd).items()})
    bias = client["dbe_bias"].detach().numpy()
    assert np.count_nonzero(bias) > 0, "the DBE bias trains once the global mean exists"
    assert set(upload.update.delta) == set(model.state_dict())
    assert set(upload.payload) == {"feature_mean"}
    sent = [*upload.update.delta.values(), *upload.payload.values()]
    assert not any(a.shape == bias.shape and np.allclose(a, bias) for a in sent)


def test_prototype_alignment_is_not_minimised_by_collapsing_features() -> None:
    """The constant-feature minimiser: shrinking every feature toward the prototypes used to drive the
    unnormalised term to ~0; relative to the batch spread, collapse makes it larger, not smaller."""
    from coordinator.pretrain.strategies.bilevel import prototype_alignment

    g = torch.Generator().manual_seed(0)
    barycenter = torch.randn(4, 8, generator=g)
    features = barycenter[torch.arange(32) % 4] + 0.5 * torch.randn(32, 8, generator=g)
    spread_out = prototype_alignment(features, barycenter)
    centre = barycenter.mean(0)
    collapsed = prototype_alignment(centre + 0.01 * (features - centre), barycenter)
    assert collapsed > 10 * spread_out
    own = barycenter[torch.arange(32) % 4]
    aligned = prototype_alignment(own + 0.5 * (features - own), barycenter)
    assert aligned < spread_out  # moving clusters toward their prototypes still lowers it


def test_bilevel_warm_start_is_fedavg_then_regularised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before `warm_start` the local loss is the task loss alone and the server uses n_k weights; after
    it, the GRL (with its ramp restarted at the switch) and the domain-aware weights act."""
    from coordinator.pretrain.strategies import bilevel

    strategy = make_strategy("bilevel", n_protos=3, warm_start=0.5)
    assert strategy.ramp(0.5) == 0.0 and strategy.ramp(1.0) > 0.99
    settings = FederatedSettings(strategy="bilevel", rounds=2, local_steps=2, batch_size=8, lr=3e-3,
                                 hparams=(("n_protos", 3), ("warm_start", 0.5)))
    torch.manual_seed(0)
    model, worker = TSFM(CFG), TSFM(CFG)
    server: dict = {}
    clients = [strategy.init_client(model, s) for s in SILOS]
    assert set(clients[0]) == {"dom_weight", "dom_bias"} and clients[1] == {}  # 2 sub-datasets vs 1
    gammas: list[float] = []
    monkeypatch.setattr(bilevel, "grl", lambda x, gamma: gammas.append(gamma) or x)
    n = np.array([s.n_samples for s in SILOS], np.float64)
    for rnd in range(2):
        global_params = {k: torch.from_numpy(v) for k, v in params_of(model).items()}
        uploads = [local_training(strategy, worker, s, c, server, global_params, settings, rnd, k)
                   for k, (s, c) in enumerate(zip(SILOS, clients, strict=True))]
        assert [float(u.payload["active"]) for u in uploads] == [float(rnd == 1)] * 3
        new = strategy.server_update(params_of(model), uploads, server, rnd)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
        if rnd == 0:
            assert gammas == [], "no gradient reversal during the warm start"
            assert np.allclose(server["weights"].numpy(), n / n.sum()), "FedAvg weights during the warm start"
    # round 1, two steps each on energy and nature (finance has one sub-dataset: no classifier); ramp from 0
    assert len(gammas) == 4 and gammas[0] == gammas[2] == 0.0 < gammas[1] == gammas[3]
    assert not np.allclose(server["weights"].numpy(), n / n.sum())


def test_warmup_ramps_the_lr_over_the_first_rounds_only() -> None:
    """Recipe 2 of the foundation grid: a fresh local AdamW at full lr killed most GELU features on some seeds."""
    from coordinator.pretrain.federated import warmup_factor

    plain, warm = FederatedSettings(), FederatedSettings(warmup_rounds=1.0)
    assert [warmup_factor(plain, 0, s, 4) for s in range(4)] == [1.0] * 4
    assert [warmup_factor(warm, 0, s, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_factor(warm, 1, 0, 4) == 1.0
    assert warmup_factor(FederatedSettings(warmup_rounds=2.0), 1, 1, 4) == 0.75


def test_dead_features_counts_the_constant_ones() -> None:
    from coordinator.pretrain.evaluate import dead_features

    torch.manual_seed(0)
    model = TSFM(TSFMConfig(context=64, horizon=8, feature_dim=16, d_model=16, n_heads=2, d_ff=32))
    x = np.random.default_rng(0).normal(size=(200, 64)).astype(np.float32)
    assert dead_features(model, x) == 0
    with torch.no_grad():
        model.backbone.project.bias[:5] = -1e4  # GELU(-1e4) == 0 for every window
    assert dead_features(model, x) == 5


def test_fedadam_takes_reddis_server_step_on_the_weighted_mean_delta() -> None:
    """m ← β1 m + (1-β1) Δ̄, v ← β2 v + (1-β2) Δ̄², θ ← θ + η m / (√v + τ), v starting at τ², no bias correction."""
    from coordinator.fleet.aggregation import ClientUpdate
    from coordinator.pretrain.strategies import Upload

    strategy = make_strategy("fedadam", server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    model = TSFM(CFG)
    server = strategy.init_server(model, SILOS)
    theta = params_of(model)
    rng = np.random.default_rng(0)
    d1, d2 = ({k: rng.normal(size=v.shape).astype(np.float32) * 1e-3 for k, v in theta.items()} for _ in range(2))
    uploads = [Upload(ClientUpdate("a", 1, d1, {})), Upload(ClientUpdate("b", 3, d2, {}))]
    new = strategy.server_update(theta, uploads, server, 0)
    key = next(iter(theta))
    mean = (d1[key] + 3 * d2[key]) / 4
    m, v = 0.1 * mean, 0.99 * 1e-6 + 0.01 * mean.astype(np.float64) ** 2
    np.testing.assert_allclose(new[key], theta[key] + 0.01 * m / (np.sqrt(v) + 1e-3), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(server[f"m.{key}"].numpy(), m, rtol=1e-5)
    with pytest.raises(ValueError):
        make_strategy("fedadam", tau=0.0)


def test_fedavg_server_lr_scales_the_mean_delta() -> None:
    from coordinator.fleet.aggregation import ClientUpdate
    from coordinator.pretrain.strategies import Upload

    theta = params_of(TSFM(CFG))
    rng = np.random.default_rng(0)
    d1, d2 = ({k: rng.normal(size=v.shape).astype(np.float32) for k, v in theta.items()} for _ in range(2))
    uploads = [Upload(ClientUpdate("a", 1, d1, {})), Upload(ClientUpdate("b", 3, d2, {}))]
    plain = make_strategy("fedavg").server_update(theta, uploads, {}, 0)
    scaled = make_strategy("fedavg", server_lr=2.5).server_update(theta, uploads, {}, 0)
    for k in theta:
        np.testing.assert_allclose(scaled[k] - theta[k], 2.5 * (plain[k] - theta[k]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        make_strategy("fedavg", server_lr=0.0)
    # weight_power 0: every silo alike (1 and 3 windows -> 1/2 each); 0.5: sqrt(1) : sqrt(3)
    for power, w1 in ((0.0, 0.5), (0.5, 1 / (1 + 3**0.5)), (1.0, 0.25)):
        mixed = make_strategy("fedavg", weight_power=power, server_lr=2.0).server_update(theta, uploads, {}, 0)
        for k in theta:
            np.testing.assert_allclose(mixed[k] - theta[k], 2.0 * (w1 * d1[k] + (1 - w1) * d2[k]), rtol=1e-4,
                                       atol=1e-5)


def test_kept_optimizer_state_resumes_bit_for_bit_and_changes_the_run(tmp_path) -> None:
    """Cross-silo clients may keep their AdamW moments between rounds; the state travels in the round checkpoint."""
    import dataclasses

    kept = dataclasses.replace(_settings("fedavg", 3), keep_optimizer=True)
    full = run_federated(CFG, kept, silos=SILOS, val_sets=VAL, threads=1)
    ckpt = tmp_path / "run.round.pt"
    run_federated(CFG, kept, silos=SILOS, val_sets=VAL, threads=1, checkpoint=ckpt, stop_after=2)
    resumed = run_federated(CFG, kept, silos=SILOS, val_sets=VAL, threads=1, checkpoint=ckpt)
    assert [h["val_mse"] for h in full.history] == [h["val_mse"] for h in resumed.history]
    fresh = run_federated(CFG, _settings("fedavg", 3), silos=SILOS, val_sets=VAL, threads=1)
    assert fresh.history[0]["val_mse"] == full.history[0]["val_mse"]  # round 0 starts from no state either way
    assert fresh.history[-1]["val_mse"] != full.history[-1]["val_mse"]


def test_a_checkpoint_from_before_a_new_setting_resumes_when_the_setting_is_at_its_default(tmp_path) -> None:
    ckpt = tmp_path / "run.round.pt"
    _run("fedavg", rounds=3, checkpoint=ckpt, stop_after=1)
    payload = torch.load(ckpt, weights_only=True)
    del payload["settings"]["keep_optimizer"]  # as written before the setting existed
    torch.save(payload, ckpt)
    assert len(_run("fedavg", rounds=3, checkpoint=ckpt).history) == 3


def test_scaffold_corrects_each_local_gradient_by_the_control_variates_and_keeps_c_the_weighted_mean() -> None:
    """The optimiser sees ∇f_i + c − c_i; c_i becomes the round's mean raw gradient; the server's c stays the
    sample-weighted mean of the clients' c_i; the hooks leave with the upload (the worker model is reused)."""
    from coordinator.pretrain.strategies import LocalContext
    from coordinator.pretrain.strategies.scaffold import PREFIX

    strategy = make_strategy("scaffold")
    torch.manual_seed(0)
    model = TSFM(CFG)
    server = strategy.init_server(model, SILOS)
    client = strategy.init_client(model, SILOS[0])
    for n, p in model.named_parameters():
        server[PREFIX + n] = torch.full_like(p, 0.3)
        client[PREFIX + n] = torch.full_like(p, 0.1)
    glob = {k: torch.from_numpy(v) for k, v in params_of(model).items()}
    ctx = LocalContext(SILOS[0], client, server, glob, 1, 0.5)
    x, y, sub = SILOS[0].sample(np.random.default_rng(0), 8, CFG.context)
    model.eval()  # no dropout: the backward passes below see the same function
    fedavg_loss = make_strategy("fedavg").local_loss
    fedavg_loss(model, x, y, sub, ctx).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    strategy.begin_round(model, ctx)
    strategy.local_loss(model, x, y, sub, ctx).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, raw[n] + 0.2, atol=1e-6), n
    upload = strategy.upload(model, ctx)
    for n, _ in model.named_parameters():
        assert torch.allclose(client[PREFIX + n], raw[n], atol=1e-6)  # one step: c_i = that step's raw gradient
        assert np.allclose(upload.payload[n], raw[n].numpy() - 0.1, atol=1e-6)
    model.zero_grad(set_to_none=True)
    fedavg_loss(model, x, y, sub, ctx).backward()
    assert all(torch.allclose(p.grad, raw[n], atol=1e-6) for n, p in model.named_parameters())  # hooks removed

    result = _run("scaffold", rounds=2)
    weights = np.array([s.n_samples for s in SILOS], float)
    for n, _ in result.model.named_parameters():
        mean_ci = sum(w * c[PREFIX + n] for w, c in zip(weights / weights.sum(), result.clients, strict=True))
        assert torch.allclose(result.server[PREFIX + n], mean_ci.float(), atol=1e-6), n
        assert float(result.server[PREFIX + n].abs().sum()) > 0


def test_balanced_centralized_draws_every_silo_equally_often_and_plain_by_windows() -> None:
    from coordinator.pretrain.silos import merge_silos

    sizes = np.array([s.n_samples for s in SILOS], float)
    first_sub = np.cumsum([0] + [s.n_sub for s in SILOS])  # silo k's windows carry sub ids [first_sub[k], ...)
    for balanced, expected in ((False, sizes / sizes.sum()), (True, np.full(len(SILOS), 1 / len(SILOS)))):
        merged = merge_silos(SILOS, balanced=balanced)
        _, _, sub = merged.sample(np.random.default_rng(0), 6000, CFG.context)
        share = np.bincount(np.searchsorted(first_sub, sub.numpy(), side="right") - 1, minlength=len(SILOS)) / 6000
        np.testing.assert_allclose(share, expected, atol=0.03)
    assert not np.allclose(sizes / sizes.sum(), 1 / len(SILOS), atol=0.05)  # the two cases differ here
    assert make_strategy("centralized", balanced=True).clients(SILOS)[0].cdf is not None


def test_tail_average_returns_the_mean_of_the_last_rounds_weights_and_resumes_with_it(tmp_path) -> None:
    """tail_average k: the result is the uniform mean of the global weights after each of the last k rounds
    (scored on validation), the running mean travels in the round checkpoint, and k outside [0, rounds] is
    refused."""
    import dataclasses

    ckpt = tmp_path / "run.round.pt"
    payload_rounds = []  # the global weights after each round of a plain run (each resumes and adds one round)
    for r in (1, 2, 3):
        run_federated(CFG, _settings("fedavg", 3), silos=SILOS, val_sets=VAL, threads=1, checkpoint=ckpt,
                      stop_after=r)
        payload_rounds.append(torch.load(ckpt, weights_only=True)["global"])
    averaged = dataclasses.replace(_settings("fedavg", 3), tail_average=2)
    result = run_federated(CFG, averaged, silos=SILOS, val_sets=VAL, threads=1)
    state = result.model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(v, (payload_rounds[1][k] + payload_rounds[2][k]) / 2, rtol=1e-5, atol=1e-6)
    assert result.best_round == -1
    assert result.val_mse == pytest.approx(float(np.mean([
        np.mean((result.model(torch.from_numpy(x))[0].detach().numpy() - y) ** 2) for x, y in VAL])), rel=1e-5)
    ckpt2 = tmp_path / "avg.round.pt"
    run_federated(CFG, averaged, silos=SILOS, val_sets=VAL, threads=1, checkpoint=ckpt2, stop_after=2)
    resumed = run_federated(CFG, averaged, silos=SILOS, val_sets=VAL, threads=1, checkpoint=ckpt2)
    for k, v in state.items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="tail_average"):
        dataclasses.replace(_settings("fedavg", 3), tail_average=4)
