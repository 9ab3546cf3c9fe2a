"""User-level differential privacy for fleet rounds: DP-FedAvg (McMahan et al., 2018) with a real accountant.

Why user-level: a device is one home or one user, so the unit to protect is everything one device contributes to
a round -- its whole delta -- not one reading. Every delta is clipped to an L2 bound C, the clipped deltas are
summed with equal weight (sample counts would let one device weigh more than C), and Gaussian noise of std z·C is
added to the sum, either once by the coordinator (``central``: devices trust it with their clipped deltas) or
spread over the devices (``distributed``: each adds N(0, (z·C)²/n) so the sum of n carries z·C; meaningful together
with secure aggregation, where the coordinator never sees one device's delta). The sum is divided by the number of
devices the round asked (a fixed denominator, so the count that answered is not a second query).

Privacy is accounted by Google's ``dp-accounting`` (Rényi DP of the Poisson-subsampled Gaussian, integer orders):
a round is charged when it opens -- a round that fails later is still charged, never under-counted -- with the
sampling rate q = asked / known devices. fedge samples a fixed number of devices per round, not Poisson; treating
that as Poisson with the same rate is the usual approximation of DP-FedAvg deployments (Kairouz et al., 2021,
section 5.3) and is said so in docs/privacy.md.

Adaptive clipping (Andrew et al., 2021): C follows a quantile γ of the update norms, C ← C·exp(-η(b̃ - γ)), where b̃
is the noisy share of devices whose norm was at most C. The count's noise (std σ_b) costs privacy too, so the
delta's noise multiplier becomes z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2) and the round is still charged z.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.fleet.aggregation import Params
from edge_client.learning.dp import clip_l2

PLACEMENTS = ("central", "distributed")
RDP_ORDERS = (*range(2, 257), 320, 512, 1024)  # integer orders: the RDP bound converges for all of them


class PrivacyBudgetSpent(RuntimeError):
    """The next round would take the fleet's ε above its budget: training stops, the model stays as it is."""


@dataclass(frozen=True)
class DPConfig:
    """A fleet's differential-privacy settings (``fedge serve --dp-…``)."""

    placement: str = "central"  # central | distributed
    noise_multiplier: float = 1.0  # z: the noise std of the round's sum is z·C
    clip: float = 0.1  # C: the L2 bound of one device's delta (the starting value when adaptive)
    delta: float | None = None  # δ of the reported ε; None: 1 / (devices known when the round opened)
    epsilon_budget: float | None = None  # no round opens that would take ε above this
    adaptive: bool = False
    target_quantile: float = 0.5  # γ: the share of deltas the adaptive clip leaves unclipped
    clip_lr: float = 0.2  # η
    count_noise: float | None = None  # σ_b: noise of the unclipped count; None: asked devices / 20 (the paper's)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"DP placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not (self.noise_multiplier >= 0 and self.clip > 0):
            raise ValueError("the DP noise multiplier must be >= 0 and the clip > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"δ must be in (0, 1), got {self.delta}")
        if self.adaptive and self.placement != "central":
            raise ValueError("adaptive clipping needs the unclipped norms: central placement only")

    def count_std(self, n_expected: int) -> float:
        return self.count_noise if self.count_noise is not None else n_expected / 20.0

    def delta_noise(self, n_expected: int) -> float:
        """The noise multiplier of the deltas' sum: z, or z_Δ when adaptive clipping spends part of it on the count."""
        z = self.noise_multiplier
        if not self.adaptive or z == 0:
            return z
        sb = self.count_std(n_expected)
        if 2 * sb <= z:
            raise ValueError(f"adaptive clipping needs count noise σ_b > z/2 ({sb} ≤ {z / 2}): raise σ_b or lower z")
        return (z ** -2 - (2 * sb) ** -2) ** -0.5


@dataclass(frozen=True)
class Charge:
    """What one round costs: its sampling rate and noise multiplier (the accountant's event)."""

    sampling_rate: float
    noise_multiplier: float


def epsilon(charges: Sequence[Charge], delta: float) -> float:
    """ε at `delta` of all `charges` composed (RDP accountant of dp-accounting); inf when any round had no noise."""
    if any(c.noise_multiplier <= 0 and c.sampling_rate > 0 for c in charges):
        return math.inf
    import dp_accounting  # here, not at the top: it costs a coordinator without DP ~76 MB (scipy)
    from dp_accounting.rdp import RdpAccountant

    counts: dict[Charge, int] = {}
    for c in charges:
        counts[c] = counts.get(c, 0) + 1
    acc = RdpAccountant(list(RDP_ORDERS))
    for c, n in counts.items():
        acc.compose(dp_accounting.PoissonSampledDpEvent(min(1.0, c.sampling_rate),
                                                        dp_accounting.GaussianDpEvent(c.noise_multiplier)), n)
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, rounds: int) -> float:
    """The smallest noise multiplier z with which `rounds` rounds at `sampling_rate` spend at most `target_epsilon`
    (dp-accounting's calibration, bisection over z); 0 for ε = inf."""
    if math.isinf(target_epsilon):
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(z)), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(list(RDP_ORDERS)), event, target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(0.05, 1.0), tol=1e-3))


def prototype_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at `delta` of one user's `releases` prototypes, each clipped to C and noised with std σ·C on the device
    (edge_client.learning.dp.privatize_prototype). A prototype is released alone, so the unit is replace-one: the
    user's data changes arbitrarily and the clipped prototype moves by at most 2C, i.e. a Gaussian mechanism of noise
    multiplier σ/2; no sampling (a user releases in every period it is active); composed by the same RDP accountant
    as DP-FedAvg's rounds. inf without noise."""
    return epsilon([Charge(1.0, noise_multiplier / 2.0)] * releases, delta) if releases else 0.0


def calibrate_prototype_noise(target_epsilon: float, delta: float, releases: int) -> float:
    """The prototype noise multiplier σ with which `releases` prototypes of one user spend at most `target_epsilon`."""
    return 2.0 * calibrate_noise(target_epsilon, delta, 1.0, releases)


def dp_sum(deltas: Sequence[Mapping[str, np.ndarray]], clip: float | None, noise_std: float,
           rng: np.random.Generator | None = None) -> tuple[Params, list[float]]:
    """Σ_k clip_C(Δ_k) + N(0, noise_std²) per coordinate, and each delta's norm before clipping (adaptive
    clipping counts them). `clip` None: the deltas were clipped (and noised) on the devices already."""
    if not deltas:
        raise ValueError("a DP round needs at least one update")
    sums: Params = {}
    norms = []
    for d in deltas:
        clipped, norm = clip_l2(d, clip) if clip is not None else clip_l2(d, math.inf)
        norms.append(norm)
        for k, v in clipped.items():
            sums[k] = sums[k] + v if k in sums else v.copy()
    if noise_std > 0:
        rng = rng if rng is not None else np.random.default_rng()  # OS entropy: the noise must not be predictable
        sums = {k: v + rng.normal(0.0, noise_std, v.shape) for k, v in sums.items()}
    return sums, norms


def next_clip(clip: float, norms: Sequence[float], cfg: DPConfig, n_expected: int,
              rng: np.random.Generator | None = None) -> float:
    """Andrew et al.'s geometric update of C towards the γ-quantile of the norms, from a noisy count."""
    if not cfg.adaptive:
        return clip
    rng = rng if rng is not None else np.random.default_rng()
    below = sum(1 for n in norms if n <= clip) + rng.normal(0.0, cfg.count_std(n_expected))
    share = below / max(1, n_expected)
    return float(clip * math.exp(-cfg.clip_lr * (share - cfg.target_quantile)))
