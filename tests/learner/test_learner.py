"""Learner: target sync cadence, priorities out, optional bf16/channels-last paths (CPU)."""

import copy
import re

import numpy as np
import pytest
import torch

from common.config import NetworkConfig
from learner.learner import Learner, LearnerConfig
from replay_server.replay import Sample


def batch(size=8, seed=0):
    rng = np.random.default_rng(seed)
    frames = lambda: rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8)  # noqa: E731
    return Sample(
        keys=np.arange(size),
        probabilities=np.full(size, 1 / size),
        weights=np.ones(size, np.float32),
        table_size=size,
        obs=frames(),
        actions=rng.integers(0, 5, size),
        returns=rng.normal(size=size).astype(np.float32),
        discounts=np.full(size, 0.729, np.float32),
        next_obs=frames(),
    )


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                   strict=True))  # fmt: skip


def test_target_syncs_every_t_updates():
    torch.manual_seed(0)
    learner = Learner(LearnerConfig(target_sync_updates=3, device="cpu"), NetworkConfig(), 5)
    assert same_weights(learner.online, learner.target)
    for update in range(1, 7):
        metrics, td_abs = learner.update(batch(seed=update))
        assert td_abs.shape == (8,) and metrics["learner/updates"] == update
        assert same_weights(learner.online, learner.target) == (update % 3 == 0)


@pytest.mark.parametrize(("double", "alpha"), [(True, 0.0), (False, 0.0), (True, 0.9)])
def test_one_update_values_the_online_choice_with_the_target_net_and_weights_each_sample(
    double, alpha
):
    # Online and target nets that disagree, rewards and importance weights that differ per
    # sample: the update's |TD| and loss must be the ones computed here from the two nets
    # (double DQN: the online net chooses a*, the target net values it; DQN: the target's max;
    # Advantage Learning, alpha > 0: minus alpha times the target net's gap at the first state).
    torch.manual_seed(0)
    learner = Learner(
        LearnerConfig(device="cpu", double=double, huber_delta=1.0, advantage_learning=alpha),
        NetworkConfig(), 5,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in learner.target.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    sample = batch(size=16, seed=3)
    sample = Sample(**{**sample.__dict__,
                       "weights": np.linspace(0.1, 1.0, 16).astype(np.float32),
                       "returns": np.linspace(-3, 3, 16).astype(np.float32),
                       "discounts": np.tile(np.float32([0.729, 0.0]), 8)})  # fmt: skip
    with torch.no_grad():
        q = learner.online(torch.from_numpy(sample.obs)).numpy().astype(np.float64)
        q_next_online = learner.online(torch.from_numpy(sample.next_obs)).numpy()
        q_next_target = learner.target(torch.from_numpy(sample.next_obs)).numpy()
    chosen = q_next_online.argmax(axis=1) if double else q_next_target.argmax(axis=1)
    # the nets disagree on a* for some samples: the test tells double DQN from DQN
    assert np.any(q_next_online.argmax(axis=1) != q_next_target.argmax(axis=1))
    target = sample.returns + sample.discounts * q_next_target[np.arange(16), chosen]
    with torch.no_grad():
        q_first_target = learner.target(torch.from_numpy(sample.obs)).numpy()
    gap = q_first_target.max(axis=1) - q_first_target[np.arange(16), sample.actions]
    assert np.count_nonzero(gap) > 8  # most actions taken are not the target net's greedy one
    target = target - alpha * gap
    td = target - q[np.arange(16), sample.actions]
    huber = np.where(np.abs(td) <= 1.0, 0.5 * td**2, np.abs(td) - 0.5)
    # the gradient norm, from a copy of the online net and the targets computed here
    twin = copy.deepcopy(learner.online)
    q_twin = twin(torch.from_numpy(sample.obs))[torch.arange(16), torch.from_numpy(sample.actions)]
    per_sample = torch.nn.functional.huber_loss(
        q_twin, torch.from_numpy(target.astype(np.float32)), reduction="none"
    )
    (per_sample * torch.from_numpy(sample.weights)).mean().backward()
    grad_norm = float(torch.cat([p.grad.flatten() for p in twin.parameters()]).norm())
    metrics, td_abs = learner.update(sample)
    np.testing.assert_allclose(td_abs, np.abs(td), rtol=1e-4, atol=1e-5)
    assert metrics["learner/loss"] == pytest.approx(np.mean(sample.weights * huber), rel=1e-4)
    assert metrics["learner/mean_q"] == pytest.approx(q[np.arange(16), sample.actions].mean(),
                                                      rel=1e-4, abs=1e-6)  # fmt: skip
    assert metrics["learner/grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


@pytest.mark.parametrize("flags", [{"bf16": True}, {"channels_last": True}, {"dueling": True},
                                   {"bf16": True, "channels_last": True,
                                    "advantage_learning": 0.9}])  # fmt: skip
def test_optional_paths_update(flags):
    dueling = flags.pop("dueling", False)
    learner = Learner(LearnerConfig(device="cpu", **flags), NetworkConfig(dueling=dueling), 5)
    before = [p.clone() for p in learner.online.parameters()]
    metrics, td_abs = learner.update(batch())
    assert np.isfinite(metrics["learner/loss"]) and np.all(np.isfinite(td_abs))
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.online.parameters(),
                                                      strict=True))  # fmt: skip


def test_state_dict_round_trip():
    learner = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)
    learner.update(batch())
    other = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)
    other.load_state_dict(learner.state_dict())
    assert other.updates == 1 and same_weights(learner.online, other.online)


def test_a_loaded_state_shares_no_tensor_with_its_source():
    source = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)
    source.update(batch())
    loaded = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)
    loaded.load_state_dict(source.state_dict())
    before = {name: t.clone() for name, t in loaded.state_dict()["optimizer"]["state"][0].items()}
    source.update(batch(seed=1))  # moves the source's weights and Adam moments in place
    for name, tensor in loaded.state_dict()["optimizer"]["state"][0].items():
        assert torch.equal(tensor, before[name]), name
    assert not same_weights(loaded.online, source.online)


def test_loaded_adam_moments_take_the_layout_of_this_learners_weights():
    # A CPU run resumed on CUDA (channels-last there): fused Adam refuses moments whose layout
    # differs from the weights'
    source = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)
    source.update(batch())
    loaded = Learner(LearnerConfig(device="cpu", channels_last=True), NetworkConfig(), 5)
    loaded.load_state_dict(source.state_dict())
    convolutions = 0
    theirs = source.optimizer.state_dict()["state"]
    for index, parameter in enumerate(loaded.online.parameters()):
        state = loaded.optimizer.state[parameter]
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].stride() == parameter.stride(), name
            torch.testing.assert_close(state[name], theirs[index][name])
        convolutions += parameter.dim() == 4
    assert convolutions == 3


def test_a_loaded_state_keeps_this_learners_step_size_and_epsilon():
    # A branch (`mario train --branch-from`) may change the learning rate; torch's own
    # Optimizer.load_state_dict would put the saved one back.
    learner = Learner(LearnerConfig(device="cpu", learning_rate=1e-4), NetworkConfig(), 5)
    learner.update(batch())
    other = Learner(LearnerConfig(device="cpu", learning_rate=1e-3, adam_epsilon=1e-8),
                    NetworkConfig(), 5)  # fmt: skip
    other.load_state_dict(learner.state_dict())
    group = other.optimizer.param_groups[0]
    assert (group["lr"], group["eps"]) == (1e-3, 1e-8)
    saved = learner.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other.optimizer.state_dict()["state"][0]["exp_avg"], saved)  # moments kept


@pytest.mark.parametrize(
    "decay, steps",
    [
        # (final, start, updates): [(updates done, step size of the next update)]
        ((None, 0, 0), [(0, 1e-4), (10**6, 1e-4)]),  # constant
        ((2.5e-5, 100, 0), [(99, 1e-4), (100, 2.5e-5), (10**6, 2.5e-5)]),  # a step down
        ((2.5e-5, 100, 50), [(99, 1e-4), (100, 1e-4), (125, 6.25e-5), (149, 2.65e-5),
                             (150, 2.5e-5), (10**6, 2.5e-5)]),  # linear: 1e-4 - 7.5e-5 · done/50
        ((2e-4, 0, 4), [(0, 1e-4), (1, 1.25e-4), (2, 1.5e-4), (4, 2e-4)]),  # up works the same
    ],
)  # fmt: skip
def test_learning_rate_schedule(decay, steps):
    final, start, updates = decay
    config = LearnerConfig(
        learning_rate=1e-4,
        learning_rate_final=final,
        learning_rate_decay_start=start,
        learning_rate_decay_updates=updates,
    )
    for done, expected in steps:
        assert config.learning_rate_at(done) == pytest.approx(expected, rel=1e-12), done


def test_the_optimizer_takes_the_scheduled_step_size_and_reports_it():
    config = LearnerConfig(device="cpu", learning_rate=1e-4, learning_rate_final=2.5e-5,
                           learning_rate_decay_start=2, learning_rate_decay_updates=2)  # fmt: skip
    learner = Learner(config, NetworkConfig(), 5)
    seen = []
    for seed in range(5):
        metrics, _ = learner.update(batch(seed=seed))
        assert learner.optimizer.param_groups[0]["lr"] == metrics["learner/learning_rate"]
        seen.append(metrics["learner/learning_rate"])
    assert seen == pytest.approx([1e-4, 1e-4, 1e-4, 6.25e-5, 2.5e-5])
    resumed = Learner(config, NetworkConfig(), 5)  # resumed: the schedule goes on from update 5
    resumed.load_state_dict(learner.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-5)  # before an update
    assert resumed.update(batch())[0]["learner/learning_rate"] == pytest.approx(2.5e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"learning_rate_final": 0.0}, "learning_rate_final (0.0) must be > 0"),
        ({"learning_rate_decay_start": -1}, "learning_rate_decay_start (-1) must be >= 0"),
        ({"learning_rate_decay_updates": -5}, "learning_rate_decay_updates (-5) must be >= 0"),
    ],
)
def test_a_bad_schedule_is_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LearnerConfig(**flags)


def test_a_cuda_graph_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match=re.escape("cuda_graph (True) and compile (True)")):
        LearnerConfig(cuda_graph=True, compile=True)
    with pytest.raises(
        ValueError, match=re.escape("cuda_graph (True) needs a CUDA device; device is cpu")
    ):
        Learner(LearnerConfig(device="cpu", cuda_graph=True), NetworkConfig(), 5)
    learner = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)  # the default: off here
    assert learner.graphed is False and learner.optimizer.param_groups[0]["capturable"] is False


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_the_average_moves_toward_the_weights_by_one_minus_decay_per_update(decay):
    # By hand: a0 = w0 (a copy at the start); after update k, a_k = decay·a_{k-1} + (1-decay)·w_k.
    torch.manual_seed(0)
    learner = Learner(LearnerConfig(device="cpu", ema_decay=decay), NetworkConfig(), 5)
    assert learner.evaluated_net == "ema"
    expected = {name: t.clone().double() for name, t in learner.online.state_dict().items()}
    assert same_weights(learner.ema, learner.online)
    for update in range(3):
        learner.update(batch(seed=update))
        for name, weight in learner.online.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * weight.double()
    ema = learner.cpu_weights("ema")
    for name, value in expected.items():
        torch.testing.assert_close(ema[name].double(), value, rtol=0, atol=1e-6)
    # it lags the weights: after three updates it is not them (nor the starting weights)
    assert not same_weights(learner.ema, learner.online)


def test_the_average_is_saved_and_a_state_without_one_starts_it_at_the_weights():
    torch.manual_seed(0)
    config = LearnerConfig(device="cpu", ema_decay=0.9)
    learner = Learner(config, NetworkConfig(), 5)
    for update in range(2):
        learner.update(batch(seed=update))
    resumed = Learner(config, NetworkConfig(), 5)
    resumed.load_state_dict(copy.deepcopy(learner.state_dict()))
    assert same_weights(resumed.ema, learner.ema) and not same_weights(resumed.ema, resumed.online)
    # the same update from the same state moves both averages alike
    learner.update(batch(seed=9))
    resumed.update(batch(seed=9))
    assert same_weights(resumed.ema, learner.ema)
    # a run that kept none (branched or resumed with an average): it starts at the weights
    plain = Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5)
    assert plain.evaluated_net == "online" and "ema" not in plain.state_dict()
    with pytest.raises(KeyError):
        plain.cpu_weights("ema")
    averaged = Learner(config, NetworkConfig(), 5)
    averaged.load_state_dict(plain.state_dict())
    assert same_weights(averaged.ema, plain.online)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_a_bad_ema_decay_is_refused_by_name(decay):
    with pytest.raises(ValueError, match=re.escape(f"ema_decay ({decay})")):
        LearnerConfig(ema_decay=decay)


@pytest.mark.parametrize("alpha", [-0.5, 1.0, 2.0])
def test_a_bad_advantage_learning_alpha_is_refused_by_name(alpha):
    with pytest.raises(ValueError, match=re.escape(f"advantage_learning ({alpha})")):
        LearnerConfig(advantage_learning=alpha)
