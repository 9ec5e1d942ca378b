"""Known answers for sparse_coding.tracking on constructed trajectories."""

import math

import pytest
import torch

from sparse_coding.analyses import tracking as TR


def rotating_checkpoints(angles_deg):
    """Feature 0 fixed on e0; feature 1 in the (e1, e2) plane at the given angles; feature 2 dead (zero) throughout."""
    cps = []
    for a in angles_deg:
        r = math.radians(a)
        W = torch.zeros(3, 4)
        W[0, 0] = 2.0
        W[1, 1], W[1, 2] = math.cos(r), math.sin(r)
        cps.append(W)
    return cps


def test_self_similarity_known_angles():
    ss = TR.self_similarity(rotating_checkpoints([0, 10, 90, 90]))
    assert torch.isnan(ss.to_previous[0]).all()
    assert torch.allclose(ss.to_previous[1:, 0], torch.ones(3, dtype=torch.float64))
    expect_prev = torch.tensor([math.cos(math.radians(10)), math.cos(math.radians(80)), 1.0], dtype=torch.float64)
    assert torch.allclose(ss.to_previous[1:, 1], expect_prev)
    expect_final = torch.tensor([0.0, math.cos(math.radians(80)), 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(ss.to_final[:, 1], expect_final, atol=1e-12)
    assert torch.isnan(ss.to_final[:, 2]).all()  # dead feature: never similar, never dissimilar


def test_reached_then_fell_counts_only_rise_before_fall():
    sim = torch.tensor([
        # f0: reached then fell; f1: fell then reached (no); f2: reached, never < 0.6; f3: NaN gaps; f4: same step
        [0.95, 0.10, 0.95, float("nan"), 0.95],
        [0.50, 0.95, 0.70, 0.92, 0.95],
        [0.99, 0.99, 0.61, float("nan"), 0.95],
        [0.20, 0.99, 0.90, 0.30, 0.95],
    ], dtype=torch.float64)
    assert TR.reached_then_fell(sim).tolist() == [True, False, False, True, False]
    assert TR.reached_then_fell(sim, high=0.99, low=0.5).tolist() == [True, False, False, False, False]
    assert TR.reached_then_fell(sim, high=0.95, low=0.25).tolist() == [True, False, False, False, False]
    with pytest.raises(ValueError, match="low <= high"):
        TR.reached_then_fell(sim, high=0.5, low=0.9)


def test_settled_step():
    to_final = torch.tensor([[0.1, 0.95, 0.2], [0.95, 0.3, 0.2], [0.92, 0.95, float("nan")], [1.0, 1.0, float("nan")]])
    assert TR.settled_step(to_final, 0.9).tolist() == [1, 2, -1]


def test_birth_death_known_masks():
    alive = torch.tensor([[1, 0, 0, 1],
                          [1, 1, 0, 0],
                          [0, 1, 0, 1],
                          [0, 1, 0, 1]], dtype=torch.bool)
    bd = TR.birth_death(alive)
    assert bd.births.tolist() == [2, 1, 1, 0]
    assert bd.deaths.tolist() == [0, 1, 1, 0]
    assert bd.n_alive.tolist() == [2, 2, 2, 2]
    assert bd.first_alive.tolist() == [0, 1, -1, 0] and bd.last_alive.tolist() == [1, 3, -1, 3]
    assert bd.n_never_alive == 1 and bd.n_died_for_good == 1
    with pytest.raises(ValueError, match="bool tensor"):
        TR.birth_death(alive.int())


def test_track_training_summary_on_a_trajectory():
    # feature 1 goes 0 -> 10 -> 90 -> 90 degrees: high with its previous at step 1 (cos 10°), then far (cos 80°)
    track = TR.track_training(rotating_checkpoints([0, 10, 90, 90]),
                              alive=torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool))
    assert track.reached_then_fell_previous.tolist() == [False, True, False]
    assert track.reached_then_fell_final.tolist() == [False, False, False]
    assert track.settled.tolist() == [0, 2, -1]
    assert track.birth_death.n_never_alive == 1


def test_checkpoints_must_share_a_shape():
    with pytest.raises(ValueError, match="one shape"):
        TR.self_similarity([torch.randn(4, 8), torch.randn(5, 8)])
    with pytest.raises(ValueError, match="empty"):
        TR.self_similarity([])


def planted_emergence(n=64, d=32, K=5, seed=0):
    """Final dictionary F; at model checkpoint k, final feature i exists (shuffled, slightly noised) iff k >= e_i,
    else a random direction stands in its place."""
    g = torch.Generator().manual_seed(seed)
    F = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    emerge = torch.randint(0, K, (n,), generator=g)
    emerge[0] = K - 1  # at least one feature only appears in the final model
    dicts = []
    for k in range(K):
        D = torch.where((emerge <= k)[:, None], F + 0.02 * torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
        # the final dictionary keeps F's order (emergence is indexed by it); earlier ones are shuffled
        dicts.append(F.clone() if k == K - 1 else D[torch.randperm(n, generator=g)])
    return dicts, emerge


@pytest.mark.parametrize("method", ["hungarian", "max"])
def test_model_checkpoints_count_final_features_present(method):
    dicts, emerge = planted_emergence()
    K = len(dicts)
    cm = TR.match_across_revisions(dicts, method=method)
    expect = torch.tensor([int((emerge <= k).sum()) for k in range(K)])
    assert torch.equal(cm.present(0.9), expect)
    assert torch.equal(cm.emergence_step(0.9), emerge)
    assert cm.share_present(0.9)[-1] == 1.0
    assert len(cm.consecutive) == K - 1
    # consecutive: features present at k are present at k+1 (emergence is monotone here)
    assert (cm.consecutive_share_above(0.9) >= expect[:-1].double() / len(emerge) - 1e-12).all()


def test_model_checkpoint_matching_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        TR.match_across_revisions([torch.randn(4, 8)])
    with pytest.raises(ValueError, match="method"):
        TR.match_across_revisions([torch.randn(4, 8), torch.randn(4, 8)], method="cosine")
    with pytest.raises(ValueError, match="different widths"):
        TR.match_across_revisions([torch.randn(4, 8), torch.randn(4, 9)])
