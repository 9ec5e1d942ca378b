"""feature_tracking (notebook 05): schedules, revision checks, snapshots reload exactly, identical revisions match
1:1 on every feature, emergence picks, top examples on planted activations."""

import pytest
import torch

from sparse_coding import dictionaries
from sparse_coding.activations import ToyConfig, ToyData, write_store
from sparse_coding.analyses import tracking
from sparse_coding.studies import nb05_examples as FX
from sparse_coding.studies import nb05_tracking as FT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_x():
    data = ToyData(ToyConfig(d=16, n_features=24, mean_active=2.0, correlated=False, seed=0))
    x, _ = data.sample(4096, generator=torch.Generator().manual_seed(0))
    return 20 * x


def test_tracking_schedule_is_log_plus_even():
    assert dictionaries.tracking_schedule(64, 4) == [0, 1, 2, 4, 8, 16, 32, 48, 64]
    assert dictionaries.tracking_schedule(10, 0) == [0, 1, 2, 4, 8, 10]
    with pytest.raises(ValueError, match="steps"):
        dictionaries.tracking_schedule(0)
    with pytest.raises(ValueError, match="n_even"):
        dictionaries.tracking_schedule(10, -1)


def test_check_revisions_and_steps():
    assert FT.check_revisions(["step0", "step64", "final"]) == ["step0", "step64", "final"]
    assert FT.check_revisions(["final"]) == ["final"]  # one revision (a GGUF model): part (a) only
    for bad, msg in (([], "empty"), (["step64", "step0", "final"], "oldest first"),
                     (["step0", "final", "step64"], "oldest first"), (["step0", "step0"], "duplicates"),
                     (["step0", "latest"], "stepN")):
        with pytest.raises(ValueError, match=msg):
            FT.check_revisions(bad)
    assert FT.revision_step("offline", "step512") == 512
    assert FT.revision_step("EleutherAI/pythia-70m", "main") is None
    assert FT.revision_labels("EleutherAI/pythia-70m", ["step1", "main"]) == ["step1", "main"]


def test_context_snippet_brackets_the_token():
    decode = lambda ids: "".join(chr(ord("a") + i) if i < 26 else "\n" for i in ids)  # noqa: E731
    toks = torch.tensor([0, 1, 2, 26, 3, 4])
    assert FX.context_snippet(toks, 4, decode, before=3) == "bc\\n[d]"
    assert FX.context_snippet(toks, 0, decode) == "[a]"
    assert FX.context_snippet(toks, 5, decode, before=5) == "abc\\nd[e]"
    assert FX.context_snippet(toks, 5, decode, before=5, max_chars=6) == "…nd[e]"


def test_snapshots_reload_exactly_and_identical_revisions_match(tmp_path, toy_x):
    tokens = torch.arange(len(toy_x)) % 100
    s_old = write_store(tmp_path / "a", toy_x, tokens, revision="step0", ctx_len=16)
    s_new = write_store(tmp_path / "b", toy_x, tokens, revision="final", ctx_len=16)
    kw = dict(data_dir=tmp_path / FT.TRACKING_SUBDIR, n_tokens=4096 * 2, batch_size=256, lr=3e-3, progress=False)
    run_old = dictionaries.train_revision_sae(s_old, "topk", 2, {"k": 2}, **kw)
    run_new = dictionaries.train_revision_sae(s_new, "topk", 2, {"k": 2}, snapshots=True, n_even=4, **kw)
    assert run_new.folder.parent.parent.parent.parent.parent.name == FT.TRACKING_SUBDIR
    # The last snapshot is the saved SAE, with the sweep's input scale folded in the same way.
    last = FT.snapshot_sae(run_new, 32)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(last, name), getattr(run_new.sae, name), rtol=1e-6, atol=1e-7), name
    rows = FT.eval_rows([s_old, s_new], 2048)
    xs = [s_old.rows(rows), s_new.rows(rows)]
    traj = FT.training_trajectory(run_new, xs[1])
    assert traj.steps == dictionaries.tracking_schedule(32, 4)
    assert torch.allclose(traj.track.self_sim.to_final[-1][traj.alive[-1]].float(), torch.ones(int(traj.alive[-1].sum())))
    summ = traj.summary()
    assert 0 <= summ["share_reached_0.9_then_below_0.6"] <= 1 and summ["n_alive_final"] > 0
    # Same data, same seed: the two SAEs are the same, so every live final feature matches itself with cosine 1.
    em = FT.match_revisions(["step0", "final"], [run_old, run_new], xs)
    live = em.alive[-1]
    assert torch.equal(em.partner[0, live], torch.nonzero(live).squeeze(1))
    assert em.present_by_revision() == {"step0": 1.0, "final": 1.0}
    assert em.count_by_revision()["step0"] == int(live.sum())
    m = FT.tracking_metrics(traj, em)
    assert m["final_features_present_by_step"]["step0"] == 1.0 and "share_reached_0.9_then_below_0.6" in m
    # Examples: a live feature's top rows are where its code is largest.
    f = int(torch.nonzero(live)[0])
    decode = lambda ids: " ".join(str(i) for i in ids)  # noqa: E731
    ex = FX.top_examples(run_new.sae, s_new, rows, f, decode, n=2, before=0)
    codes = FT.feature_codes(run_new.sae, xs[1], features=torch.tensor([f]))[:, 0]
    top = int(codes.argmax())
    assert ex[0] == (f"[{int(tokens[top])}]", pytest.approx(float(codes[top])))
    per = FX.trajectory_examples(em, [run_old, run_new], [s_old, s_new], rows, [f], decode, xs, n=2, before=0)
    assert per[f][0] == per[f][1] == ex


def test_eval_rows_refuses_different_tokens(tmp_path, toy_x):
    a = write_store(tmp_path / "a", toy_x[:512], torch.zeros(512, dtype=torch.long), ctx_len=16)
    b = write_store(tmp_path / "b", toy_x[:512], torch.ones(512, dtype=torch.long), ctx_len=16)
    with pytest.raises(ValueError, match="same contexts"):
        FT.eval_rows([a, b], 256)
    assert FT.eval_rows([a, a], 10_000).tolist() == list(range(512))


def test_single_sae_per_revision(tmp_path, toy_x):
    s = write_store(tmp_path / "a", toy_x[:512], torch.zeros(512, dtype=torch.long), ctx_len=16)
    with pytest.raises(ValueError, match="one SAE per revision"):
        dictionaries.train_revision_sae(s, "topk", 2, {"k": [2, 4]}, data_dir=tmp_path, n_tokens=512, batch_size=256)


def test_pick_tracked_spreads_over_emergence_steps():
    # 5 final features over 4 checkpoints: emergence 0, 1, 1, 3, and one dead (NaN).
    nan = float("nan")
    to_final = torch.tensor([[0.95, 0.2, 0.3, 0.1, nan],
                             [0.96, 0.95, 0.92, 0.2, nan],
                             [0.97, 0.95, 0.93, 0.3, nan],
                             [1.0, 1.0, 1.0, 1.0, nan]], dtype=torch.float64)
    fires = torch.tensor([[5, 5, 5, 5, 0]] * 3 + [[10, 3, 7, 2, 0]])
    em = FT.Emergence(["step0", "step1", "step2", "final"],
                      tracking.RevisionMatching([], to_final, "hungarian"),
                      torch.arange(5).expand(4, 5), fires, fires > 0)
    assert FT.pick_tracked(em, 3) == [0, 2, 3]       # emergence 0, 1 (feature 2 fires more than 1), 3
    assert FT.pick_tracked(em, 1) == [0]
    assert em.present_by_revision() == {"step0": 0.25, "step1": 0.75, "step2": 0.75, "final": 1.0}
    assert em.count_by_revision() == {"step0": 1, "step1": 3, "step2": 3, "final": 4}
    with pytest.raises(ValueError, match="n must be"):
        FT.pick_tracked(em, 0)
