"""SecAgg+ (edge_client.secagg): Shamir, the masks, the neighbour graph, and whole rounds with dropouts in one
process -- the sum is exact up to quantisation, survives dropouts after masking, aborts cleanly when it cannot,
and one masked input alone tells nothing about the vector under it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_client.secagg import shamir
from edge_client.secagg.graph import degree, neighbours, threshold
from edge_client.secagg.local import run_local
from edge_client.secagg.masking import DTYPE, dequantise_sum, max_bits, prg, quantise
from edge_client.secagg.protocol import RoundSpec, SecAggDevice, SecAggError, SecAggServer

SIZE, RANGE = 240, 0.5


def _spec(n: int, round_id: int = 7) -> RoundSpec:
    return RoundSpec("f", round_id, SIZE, RANGE, max_bits(n))


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"d{i:03d}": rng.normal(0, 0.1, SIZE) for i in range(n)}


def test_shamir_any_t_shares_recover_the_secret_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 7, 4)
    assert shamir.combine({x: shares[x] for x in (2, 5, 6, 7)}, 4) == secret
    assert shamir.combine({x: shares[x] for x in (1, 3, 4, 6)}, 4) == secret
    with pytest.raises(ValueError):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    wrong = shamir.combine({x: shares[x] for x in (1, 2, 3)} | {4: shamir.split(secret, 7, 4)[4]}, 4, 66)
    assert wrong[-32:] != secret  # shares of two different polynomials do not mix


def test_quantisation_and_prg() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-RANGE, RANGE, SIZE) for _ in range(50)]
    bits = max_bits(50)
    total = sum(quantise(x, RANGE, bits, rng) for x in xs).astype(DTYPE)
    step = 2 * RANGE / ((1 << bits) - 1)
    assert np.max(np.abs(dequantise_sum(total, 50, RANGE, bits) - sum(xs))) <= 50 * step
    a, b = prg(b"k" * 32, 1000, bytes(16)), prg(b"k" * 32, 1000, bytes(16))
    assert a.dtype == DTYPE and np.array_equal(a, b) and not np.array_equal(a, prg(b"j" * 32, 1000, bytes(16)))


@pytest.mark.parametrize("n", [3, 10, 100, 1000])
def test_the_neighbour_graph_is_symmetric_with_log_degree(n: int) -> None:
    k = degree(n)
    g = neighbours([f"d{i}" for i in range(n)], k, seed=1)
    assert all(len(v) == k for v in g.values())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert k <= max(n - 1, 6 * np.log2(n) + 2) and threshold(k) > k / 2
    if n >= 100:
        assert k < n / 2  # sparse: the cost per device grows with log n


def test_a_round_without_dropouts_is_fedavgs_sum_within_quantisation() -> None:
    vectors = _vectors(12)
    spec = _spec(12)
    out = run_local(vectors, spec)
    assert not out.aborted and out.survivors == sorted(vectors)
    step = 2 * RANGE / ((1 << spec.bits) - 1)
    np.testing.assert_allclose(out.total, sum(vectors.values()), atol=12 * step)


def test_thirty_percent_dropping_after_masking_still_gives_the_survivors_sum() -> None:
    vectors = _vectors(20, seed=1)
    drop = sorted(vectors)[::3][:6]  # 6 of 20 send keys and shares, then vanish before their masked input
    out = run_local(vectors, _spec(20), seed=2, drop={"masked": drop})
    assert not out.aborted and set(out.survivors) == set(vectors) - set(drop)
    expected = sum(v for d, v in vectors.items() if d not in drop)
    np.testing.assert_allclose(out.total, expected, atol=20 * 2 * RANGE / ((1 << _spec(20).bits) - 1))


@pytest.mark.parametrize("seed", range(4))
def test_thirty_percent_dropping_at_every_stage_completes_exactly_or_aborts_cleanly(seed: int) -> None:
    vectors = _vectors(30, seed)
    rng = np.random.default_rng(seed)
    left = sorted(vectors)
    drop = {}
    for stage in ("shares", "masked", "reveal"):
        drop[stage] = list(rng.choice(left, int(0.3 * len(left)), replace=False))
        left = [d for d in left if d not in drop[stage]]
    out = run_local(vectors, _spec(30), seed=seed, drop=drop)
    if out.aborted:
        assert out.total is None and "needed" in out.aborted  # too few shares came back: nothing is unmasked
    else:
        expected = sum(vectors[d] for d in out.survivors)
        assert set(out.survivors) == set(vectors) - set(drop["shares"]) - set(drop["masked"])
        np.testing.assert_allclose(out.total, expected, atol=30 * 2 * RANGE / ((1 << _spec(30).bits) - 1))


def _seeded(device_id: str, spec: RoundSpec, rng: np.random.Generator) -> SecAggDevice:
    """A device whose keys and self-mask seed come from a seeded generator (real devices use the OS's entropy)."""
    return SecAggDevice(device_id, spec, _c=X25519PrivateKey.from_private_bytes(rng.bytes(32)),
                        _s=X25519PrivateKey.from_private_bytes(rng.bytes(32)), _b=rng.bytes(32))


def _masked_round(vectors: dict[str, np.ndarray], spec: RoundSpec, seed: int):  # type: ignore[no-untyped-def]
    """Stages 1-3 of a round with every device present: (server, devices, masked inputs, inboxes)."""
    rng = np.random.default_rng(seed)
    server = SecAggServer(spec)
    devices = {d: _seeded(d, spec, rng) for d in vectors}
    for d, dev in devices.items():
        server.keys[d] = dev.advertise()
    rosters = server.rosters(seed)
    for d, dev in devices.items():
        server.add_shares(d, dev.share(rosters[d], server.t))
    inbox = server.forwarded()
    masked = {}
    for d, dev in devices.items():
        masked[d] = dev.masked_input(quantise(vectors[d], RANGE, spec.bits, rng), inbox[d])
        server.add_masked(d, masked[d])
    return server, devices, masked, inbox


def test_a_masked_input_alone_is_uncorrelated_with_the_update() -> None:
    vectors = _vectors(10, seed=3)
    _, _, masked, _ = _masked_round(vectors, RoundSpec("f", 1, SIZE, RANGE, max_bits(10)), seed=3)
    corr = [np.corrcoef(masked[d].astype(np.float64), vectors[d])[0, 1] for d in vectors]
    # at chance: |r| of independent samples of 240 has std 1/sqrt(240) = 0.065
    assert np.max(np.abs(corr)) < 4 / np.sqrt(SIZE) and abs(np.mean(corr)) < 3 / np.sqrt(SIZE * len(corr))
    plain = [np.corrcoef(quantise(vectors[d], RANGE, 16).astype(np.float64), vectors[d])[0, 1] for d in vectors]
    assert min(plain) > 0.99  # the same statistic on the unmasked quantised update: it would reveal everything


def test_a_device_refuses_to_reveal_both_secrets_or_to_too_few_survivors() -> None:
    vectors = _vectors(8, seed=4)
    _, devices, _, inbox = _masked_round(vectors, _spec(8), seed=4)
    names = sorted(vectors)
    me = devices[names[0]]
    with pytest.raises(SecAggError, match="both survived and dropped"):
        me.reveal(names, names[1:2])
    with pytest.raises(SecAggError, match="threshold"):
        me.reveal(names[:2], names[2:])
    me.reveal(names, [])
    with pytest.raises(SecAggError, match="second"):
        me.reveal(names[:-1], names[-1:])  # after revealing b of everyone, the s key of one of them: never
    forged = dict(inbox[names[1]])
    sender = next(iter(forged))
    forged[sender] = forged[sender][:-1] + bytes([forged[sender][-1] ^ 1])
    with pytest.raises(SecAggError, match="does not decrypt"):
        devices[names[1]].masked_input(np.zeros(SIZE, DTYPE), forged)  # a relay that alters a share


def test_with_identities_a_device_refuses_neighbour_keys_its_neighbour_did_not_sign(tmp_path) -> None:
    """A coordinator (or anyone on the path) that swaps a neighbour's keys for its own is caught by the device: keys
    must carry the neighbour's signature, checked with a certificate the fleet CA issued to that neighbour."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from coordinator.fleet.pki import FleetPKI
    from edge_client import wire as P
    from edge_client.daemon.secure import SecureSession
    from edge_client.identity import Identity, load_certificate

    pki = FleetPKI(tmp_path / "fleet")
    pki.init("f")
    names = ["a", "b", "c"]
    ids = {n: Identity.load(pki.enroll(n)) for n in names}
    der = {n: load_certificate(ids[n].cert_file).public_bytes(Encoding.DER) for n in names}
    task = P.RoundTask(fleet="f", device_id="a", round_id=3, model_version=0, deadline_ts=2e9)
    update = P.Update(fleet="f", device_id="a", round_id=3, base_version=0, n_samples=1,
                      delta={"w": np.zeros(SIZE, np.float16)})
    spec = RoundSpec("f", 3, SIZE, RANGE, 28)
    peers = {n: SecAggDevice(n, spec, identity_key=ids[n].key) for n in ("b", "c")}
    keys = {n: d.advertise() for n, d in peers.items()}

    def run(roster: dict, certs: dict) -> tuple[list, list]:
        sent, refused = [], []
        session = SecureSession("a", "f", sent.append, identity_key=ids["a"].key,
                                ca=load_certificate(ids["a"].ca_file), refused=refused.append)
        session.start(task, update)
        session.handle(P.SecAggRoster(fleet="f", device_id="a", round_id=3, size=SIZE, value_range=RANGE, bits=28,
                                      threshold=2, neighbours=roster, certs=certs))
        return sent, refused

    sent, refused = run(keys, der)
    assert not refused and [m.type for m in sent] == ["secagg_keys", "secagg_shares"]
    assert len(sent[0].key_sig) == 64  # its own keys went out signed
    mallory = SecAggDevice("b", spec)  # fresh keys, no identity: what a key-substituting relay would send
    c_pk, s_pk, _ = mallory.advertise()
    forged = {**keys, "b": (c_pk, s_pk, keys["c"][2])}  # b's slot, with another device's signature
    for roster, certs in ((forged, der), (keys, {"b": der["b"], "c": der["b"]}), (keys, {"c": der["c"]})):
        sent, refused = run(roster, certs)
        assert [m.type for m in sent] == ["secagg_keys"] and len(refused) == 1  # no shares for anyone
        assert refused[0].reason == "secagg_refused"
