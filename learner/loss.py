"""The double-DQN loss: one pure function, checkable against van Hasselt et al. (2016)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class LossExtra:
    """Per-sample values the learner needs besides the scalar loss."""

    td_abs: torch.Tensor
    """|TD error| per sample [B] (detached): the new replay priorities."""
    q_taken: torch.Tensor
    """Q_online(s, a) per sample [B] (detached)."""


def double_dqn_loss(
    q_tm1: torch.Tensor,
    a_tm1: torch.Tensor,
    r_t: torch.Tensor,
    discount_t: torch.Tensor,
    q_t_selector: torch.Tensor,
    q_t_target: torch.Tensor,
    importance_weights: torch.Tensor | None = None,
    double: bool = True,
    huber_delta: float = 1.0,
    q_tm1_target: torch.Tensor | None = None,
    advantage_learning: float = 0.0,
) -> tuple[torch.Tensor, LossExtra]:
    """Importance-weighted Huber loss on n-step (double) Q-learning targets.

    target = r_t + discount_t · Q_target(s_t, a*), where discount_t = γ^n (1 − done) and
      a* = argmax_a Q_online(s_t, a)   (double DQN), or
      Q_target(s_t, a*) = max_a Q_target(s_t, a)   (double=False: the tutorial's DQN);
    with Advantage Learning (Bellemare et al. 2016, "Increasing the action gap"), α > 0:
      target −= α · (max_b Q_target(s_{t-n}, b) − Q_target(s_{t-n}, a_{t-n})),
    how far the action taken falls below the best at the first state under the target net
    (once per n-step return), which lowers the targets of actions that are not greedy and so
    widens the gap between the greedy one and the others.

    Args:
        q_tm1: online Q(s_{t-n}, ·) [B, A], with gradient.
        a_tm1: actions taken [B] (int64).
        r_t: discounted n-step reward sums [B].
        discount_t: γ^n, or 0 after a termination [B].
        q_t_selector: online Q(s_t, ·) [B, A] (gradient is ignored).
        q_t_target: target-net Q(s_t, ·) [B, A] (gradient is ignored).
        importance_weights: PER weights [B]; None means all ones.
        double: choose a* with the online net (double DQN) or the target net (DQN).
        huber_delta: where the Huber loss turns from quadratic to linear.
        q_tm1_target: target-net Q(s_{t-n}, ·) [B, A]: needed when advantage_learning > 0.
        advantage_learning: α of Advantage Learning (0: plain (double) Q-learning).

    Returns:
        (scalar loss, LossExtra with per-sample |TD| and Q(s, a)).
    """
    q_t_selector = q_t_selector.detach()
    q_t_target = q_t_target.detach()
    if double:
        a_star = q_t_selector.argmax(dim=1, keepdim=True)  # [B, 1]
        q_t_value = q_t_target.gather(1, a_star).squeeze(1)  # [B]
    else:
        q_t_value = q_t_target.max(dim=1).values  # [B]
    target = r_t + discount_t * q_t_value  # [B]
    actions = a_tm1.long().unsqueeze(1)  # [B, 1]
    if advantage_learning:
        if q_tm1_target is None:
            raise ValueError("advantage_learning needs q_tm1_target, the target net's Q(s_{t-n})")
        q_tm1_target = q_tm1_target.detach()
        gap = q_tm1_target.max(dim=1).values - q_tm1_target.gather(1, actions).squeeze(1)  # [B]
        target = target - advantage_learning * gap
    q_taken = q_tm1.gather(1, actions).squeeze(1)  # [B]
    td_error = target - q_taken  # [B]
    per_sample = F.huber_loss(q_taken, target, reduction="none", delta=huber_delta)  # [B]
    if importance_weights is not None:
        per_sample = per_sample * importance_weights
    loss = per_sample.mean()
    extra = LossExtra(td_abs=td_error.detach().abs(), q_taken=q_taken.detach())
    return loss, extra
