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
) -> tuple[torch.Tensor, LossExtra]:
    """Importance-weighted Huber loss on n-step (double) Q-learning targets.

    target = r_t + discount_t · Q_target(s_t, a*), where discount_t = γ^n (1 − done) and
      a* = argmax_a Q_online(s_t, a)   (double DQN), or
      Q_target(s_t, a*) = max_a Q_target(s_t, a)   (double=False: the tutorial's DQN).

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
    q_taken = q_tm1.gather(1, a_tm1.long().unsqueeze(1)).squeeze(1)  # [B]
    td_error = target - q_taken  # [B]
    per_sample = F.huber_loss(q_taken, target, reduction="none", delta=huber_delta)  # [B]
    if importance_weights is not None:
        per_sample = per_sample * importance_weights
    loss = per_sample.mean()
    extra = LossExtra(td_abs=td_error.detach().abs(), q_taken=q_taken.detach())
    return loss, extra
