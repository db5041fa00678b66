"""The reach task, its bimodal expert, the shipped diffusion policy and its closed-loop evaluation."""

import json

import pytest
import torch

from paratime import ParallelSampler
from paratime.policy_eval import (POLICY_METHODS, chunk_latency, evaluate_baseline, evaluate_policy, policy_demo,
                                  policy_sampler, rollouts_png)
from paratime.tasks.reach import (ReachConfig, chunk_path, expert_chunk, make_dataset, make_episodes,
                                  mean_path_fails, observe, rollout_expert, step)
from paratime.zoo import load_model
from paratime.zoo.policy import WEIGHTS, _read_meta, train_policy

# Bars for the shipped weights on episodes 0..29 of the evaluation set (seed 1000), DDPM-100. On all 100 episodes
# the shipped policy scores 97% sequential, 98% with Picard (window 32, tol 0.3), the baseline 0%.
EPISODES = 30
SUCCESS_BAR = 0.9           # sequential success rate must reach this
PICARD_TOLERANCE = 2 / 30   # |Picard success - sequential success|: at most 2 of the 30 episodes differ


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these networks are dispatch-bound, and two threads spin against each other on a busy
    2-core machine (a 25-step training run takes 30 s instead of 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_episodes_depend_on_seed_and_index_only():
    whole = make_episodes(10, seed=3)
    tail = make_episodes(4, seed=3, first=6)
    for name in ("start", "goal", "centers", "radii", "sides"):
        torch.testing.assert_close(getattr(whole, name)[6:], getattr(tail, name), rtol=0, atol=0)
    assert not torch.equal(make_episodes(10, seed=4).centers, whole.centers)


def test_expert_succeeds_without_collisions():
    ep = make_episodes(60, seed=11)
    rollout_expert(ep)
    assert bool(ep.success.all()) and not bool(ep.collided.any())


def test_expert_is_bimodal_and_its_mean_fails():
    """From the start, the expert's first chunk bends left or right of the first obstacle (the side drawn per
    episode), with nothing in between; the average of its modes, what a unimodal regressor learns, fails."""
    ep = make_episodes(200, seed=7)
    end = chunk_path(ep.start, expert_chunk(ep))[:, -1]                        # (B, 2) after H steps
    u = (ep.goal - ep.start) / (ep.goal - ep.start).norm(dim=1, keepdim=True)
    lateral = ((end - ep.start) * torch.stack([-u[:, 1], u[:, 0]], 1)).sum(1)  # along the normal n
    assert torch.equal(torch.sign(lateral), ep.sides[:, 0])                    # the mode is the drawn side
    assert 0.35 <= float((lateral > 0).double().mean()) <= 0.65               # both modes are common
    assert float(lateral.abs().min()) > 0.05                                   # nothing in between
    assert bool(mean_path_fails(ep).all())


def test_dataset_is_reproducible_and_collision_free():
    obs, chunks = make_dataset(20, seed=5)
    obs2, chunks2 = make_dataset(20, seed=5)
    assert torch.equal(obs, obs2) and torch.equal(chunks, chunks2)
    cfg = ReachConfig()
    assert obs.shape[1] == cfg.obs_dim and chunks.shape[1:] == (cfg.horizon, 2)
    assert float(chunks.norm(dim=-1).max()) <= 1 + 1e-6


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="n_exec"):
        ReachConfig(horizon=4, n_exec=8)
    with pytest.raises(ValueError, match="n:"):
        make_episodes(0)
    with pytest.raises(TypeError, match="config"):
        make_episodes(2, config={"obstacles": 2})
    ep = make_episodes(3)
    with pytest.raises(ValueError, match="actions"):
        step(ep, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="method"):
        policy_sampler("euler")
    with pytest.raises(ValueError, match="^episodes:"):
        evaluate_policy("sequential", episodes=0)
    # The evaluation's DDPM-100 is a default, not a clash: steps= and solver= choose another grid.
    s = policy_sampler("picard", steps=10, solver="ddim")
    assert s.config.steps == 10 and s.solver.name == "ddim"
    with pytest.raises(ValueError, match="steps"):
        train_policy(None, steps=0)
    with pytest.raises(ValueError, match="ema"):
        train_policy(None, steps=1, ema=1.0)


def _tiny_train(seed):
    return train_policy(None, steps=25, batch=32, width=32, blocks=1, episodes=8, seed=seed, baseline_steps=5,
                        progress=False)


def test_training_is_reproducible_from_its_seed():
    a, b, c = _tiny_train(0), _tiny_train(0), _tiny_train(1)
    assert a["losses"] == b["losses"] and a["baseline_losses"] == b["baseline_losses"]
    for (ka, va), (kb, vb) in zip(a["net"].state_dict().items(), b["net"].state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a["losses"] != c["losses"]
    assert sum(a["losses"][-5:]) < sum(a["losses"][:5])


def test_shipped_weights_and_record():
    den = load_model("policy")
    meta = _read_meta(WEIGHTS)
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())      # the training record beside the weights
    assert record["command"].startswith("paratime train-policy") and record["steps"] == meta["steps"]
    assert 1e5 <= meta["params"] <= 1e6 and record["cpu_seconds"] <= 600
    assert den.sample_shape == (16, 2)
    obs = observe(make_episodes(3))
    out = den.network(torch.randn(3, 16, 2), torch.tensor([0.0, 50, 99]), obs=obs)
    assert out.shape == (3, 16, 2) and bool(torch.isfinite(out).all())


def test_picard_at_tol_zero_equals_sequential_on_the_policy():
    obs = observe(make_episodes(2, seed=9))
    seq = ParallelSampler("policy", solver="ddpm", steps=100, method="sequential", progress=False).sample(2, obs=obs)
    par = ParallelSampler("policy", solver="ddpm", steps=100, tol=0.0, window=32, progress=False).sample(2, obs=obs)
    torch.testing.assert_close(par.samples, seq.samples, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def closed_loop():
    return {m: evaluate_policy(m, EPISODES) for m in ("sequential", "picard")} | {
        "baseline": evaluate_baseline(EPISODES)}


def test_shipped_policy_succeeds_and_picard_matches_it(closed_loop):
    seq, pic = closed_loop["sequential"], closed_loop["picard"]
    assert seq.success_rate >= SUCCESS_BAR, seq.summary()
    assert abs(pic.success_rate - seq.success_rate) <= PICARD_TOLERANCE, (pic.summary(), seq.summary())
    assert POLICY_METHODS["picard"]["tol"] > 0                 # the figure is for the fast setting, not tol 0


def test_unimodal_baseline_fails_the_obstacle_cases(closed_loop):
    base = closed_loop["baseline"]
    assert base.success_rate <= 0.2 and base.collision_rate >= 0.6, base.summary()


def test_latency_record_and_png(closed_loop, tmp_path):
    lat = chunk_latency({"picard": policy_sampler("picard")}, observe(make_episodes(2)), warmup=0)["picard"]
    assert len(lat["wall_s"]) == 2 and lat["min_s"] <= lat["median_s"] and 1 <= lat["rounds"] <= 100
    png = rollouts_png(tmp_path / "r.png", list(closed_loop.values()), episodes=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_demo_prints_labelled_figures_and_writes_the_png(tmp_path):
    lines = []
    rec = policy_demo(tmp_path / "demo.png", episodes=3, latency_chunks=1, emit=lines.append)
    text = "\n".join(lines)
    assert "sequential" in text and "picard" in text and "faster" in text and "ms" in text, text
    assert rec["picard"]["speedup"] > 0 and (tmp_path / "demo.png").exists()


def test_cli_rejects_an_unknown_method():
    from paratime.cli import main

    assert main(["eval-policy", "--methods", "euler"]) == 2


def test_latency_observations_gives_the_count_asked_for():
    """``latency_observations(n)``: n observations for every n (7 gave 6: its episodes re-planned too few times)."""
    from paratime.policy_eval import latency_observations

    assert [latency_observations(n).shape[0] for n in range(1, 41)] == list(range(1, 41))


def test_evaluation_records_the_tolerance_in_force(monkeypatch):
    """Parareal's and Picard's records carry the tolerance that ran (Parareal's default 0.1 was recorded as None)."""
    from paratime import policy_eval

    monkeypatch.setattr(policy_eval, "rollout", lambda act, episodes, seed, name=None, progress=None:
                        type("R", (), {"summary": lambda self: {}})())
    rec = policy_eval.compare_methods(("parareal", "picard"), episodes=1, latency_chunks=1, baseline=False)["records"]
    assert rec["parareal"]["tol"] == 0.1 and rec["picard"]["tol"] == POLICY_METHODS["picard"]["tol"]
