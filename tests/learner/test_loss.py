"""Double-DQN loss against hand-computed targets."""

import pytest
import torch

from learner.loss import double_dqn_loss

# Two actions. Online Q(s') prefers action 0, the target net prefers action 1, so double DQN
# and plain DQN bootstrap from different values: double uses Q_target(s', 0) = 2.0, plain DQN
# uses max Q_target(s') = 5.0.
Q_T_SELECTOR = torch.tensor([[10.0, 1.0]])
Q_T_TARGET = torch.tensor([[2.0, 5.0]])
Q_TM1 = torch.tensor([[1.0, 3.0]])  # online Q(s, ·); action 1 taken → Q(s, a) = 3.0


@pytest.mark.parametrize(
    ("double", "n", "gamma", "reward", "terminated", "expected_target"),
    [
        # n = 1: target = r + γ · bootstrap
        (True, 1, 0.9, 1.0, False, 1.0 + 0.9 * 2.0),  # 2.8
        (False, 1, 0.9, 1.0, False, 1.0 + 0.9 * 5.0),  # 5.5
        # n = 3: r is the discounted 3-step sum (1 + 0.9·1 + 0.81·1 = 2.71), bootstrap γ³
        (True, 3, 0.9, 2.71, False, 2.71 + 0.729 * 2.0),  # 4.168
        (False, 3, 0.9, 2.71, False, 2.71 + 0.729 * 5.0),  # 6.355
        # terminal: no bootstrap, whatever the nets say
        (True, 1, 0.9, -15.0, True, -15.0),
        (False, 3, 0.9, 2.71, True, 2.71),
    ],
)
def test_targets_and_td(double, n, gamma, reward, terminated, expected_target):
    discount = torch.tensor([0.0 if terminated else gamma**n])  # γ^n, 0 after a termination
    loss, extra = double_dqn_loss(
        Q_TM1.clone().requires_grad_(True),
        torch.tensor([1]),
        torch.tensor([reward]),
        discount,
        Q_T_SELECTOR,
        Q_T_TARGET,
        double=double,
    )
    td = expected_target - 3.0  # Q(s, a=1) = 3
    assert extra.td_abs.item() == pytest.approx(abs(td), rel=1e-6)
    huber = 0.5 * td**2 if abs(td) <= 1 else abs(td) - 0.5
    assert loss.item() == pytest.approx(huber, rel=1e-6)


def test_importance_weights_scale_per_sample_loss_and_td_is_per_sample():
    q_tm1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    actions = torch.tensor([0, 1, 0])
    rewards = torch.tensor([0.5, 3.0, 1.0])  # TDs 0.5 (quadratic), 3.0 (linear), 0.0
    discounts = torch.zeros(3)
    zeros = torch.zeros(3, 2)
    weights = torch.tensor([1.0, 0.5, 2.0])
    loss, extra = double_dqn_loss(
        q_tm1, actions, rewards, discounts, zeros, zeros, importance_weights=weights
    )
    # per-sample Huber: 0.125, 2.5, 0 → weighted 0.125, 1.25, 0 → mean 0.458333…
    assert loss.item() == pytest.approx((0.125 + 1.25 + 0.0) / 3, rel=1e-6)
    assert extra.td_abs.tolist() == pytest.approx([0.5, 3.0, 0.0])
    assert extra.td_abs.shape == (3,)
    loss.backward()
    # dL/dQ(s,a) = -w · clip(td, ±1) / B
    expected_grad = torch.tensor([[-1.0 * 0.5 / 3, 0.0], [0.0, -0.5 * 1.0 / 3], [0.0, 0.0]])
    torch.testing.assert_close(q_tm1.grad, expected_grad)


def test_gradient_flows_only_through_q_tm1():
    q_tm1 = torch.tensor([[1.0, 2.0]], requires_grad=True)
    q_selector = torch.tensor([[1.0, 2.0]], requires_grad=True)
    q_target = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss, _ = double_dqn_loss(
        q_tm1, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.9]), q_selector, q_target
    )
    loss.backward()
    assert q_tm1.grad is not None
    assert q_selector.grad is None and q_target.grad is None


# Advantage Learning: target − α · (max_b Q_target(s, b) − Q_target(s, a)), with the target
# net's values of the first state s = s_{t-n}. Here Q_target(s, ·) = [4, 1] and action 1 was
# taken (Q_online(s, 1) = 3): its advantage under the target net is 1 − 4 = −3, a gap of 3.
Q_TM1_TARGET = torch.tensor([[4.0, 1.0]])


@pytest.mark.parametrize(
    ("alpha", "action", "terminated", "expected_target"),
    [
        (0.0, 1, False, 2.8),  # off: the double-DQN target of the first table (1 + 0.9 · 2)
        (0.5, 1, False, 2.8 - 0.5 * 3.0),  # 1.3
        (0.9, 1, False, 2.8 - 0.9 * 3.0),  # 0.1
        (0.9, 0, False, 2.8),  # the target net's greedy action: a gap of 0, nothing taken off
        (0.5, 1, True, -15.0 - 0.5 * 3.0),  # a termination ends the bootstrap, not the gap
    ],
)
def test_advantage_learning_lowers_the_target_by_alpha_times_the_gap(
    alpha, action, terminated, expected_target
):
    q_tm1 = Q_TM1.clone().requires_grad_(True)
    q_tm1_target = Q_TM1_TARGET.clone().requires_grad_(True)
    reward = -15.0 if terminated else 1.0
    loss, extra = double_dqn_loss(
        q_tm1, torch.tensor([action]), torch.tensor([reward]),
        torch.tensor([0.0 if terminated else 0.9]), Q_T_SELECTOR, Q_T_TARGET,
        q_tm1_target=q_tm1_target, advantage_learning=alpha,
    )  # fmt: skip
    td = expected_target - Q_TM1[0, action].item()
    assert extra.td_abs.item() == pytest.approx(abs(td), rel=1e-6)
    huber = 0.5 * td**2 if abs(td) <= 1 else abs(td) - 0.5
    assert loss.item() == pytest.approx(huber, rel=1e-6)
    loss.backward()  # the gap is a constant of the target: no gradient reaches it
    assert q_tm1_target.grad is None
    assert q_tm1.grad[0, action].item() != 0.0


def test_advantage_learning_without_the_target_nets_first_values_is_an_error():
    with pytest.raises(ValueError, match="advantage_learning needs q_tm1_target"):
        double_dqn_loss(Q_TM1, torch.tensor([1]), torch.tensor([1.0]), torch.tensor([0.9]),
                        Q_T_SELECTOR, Q_T_TARGET, advantage_learning=0.5)  # fmt: skip
