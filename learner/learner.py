"""The learner role: online and target nets, Adam, gradient clipping, target sync, weights."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from common.config import NetworkConfig
from common.networks import build_network
from learner.loss import double_dqn_loss

FAILURE_AT_UPDATE_ENV = "MARIO_LEARNER_FAILURE_AT_UPDATE"
"""Fault injection for tests: when set to N, the learner's N-th update raises RuntimeError."""


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The double-DQN learner."""

    batch_size: int = 32
    """Transitions per update."""
    learning_rate: float = 2.5e-4
    """Adam step size."""
    learning_rate_final: float | None = None
    """The step size after a linear fall from learning_rate (None: learning_rate throughout)."""
    learning_rate_decay_start: int = 0
    """The update at which the fall begins."""
    learning_rate_decay_updates: int = 0
    """Updates the fall takes (0: a step down at learning_rate_decay_start)."""
    adam_epsilon: float = 1.5e-4
    """Adam ε."""
    max_grad_norm: float = 10.0
    """Global gradient-norm clip."""
    target_sync_updates: int = 2000
    """Copy the online net into the target net every this many updates."""
    double: bool = True
    """Double DQN (online net picks a*, target net evaluates it); false: the tutorial's DQN."""
    huber_delta: float = 1.0
    """Huber loss threshold."""
    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, …"""
    # Defaults by measurement (`mario bench learner`, README): on an H100 the update is bound by
    # the host (about 5 ms of kernel launches against 0.7 ms of GPU work at batch 32), so
    # torch.compile and bf16 autocast cost more than they save there; channels-last is within
    # the measurements' noise (kept). On this project's 2-core CPU bf16 is 9-10x slower.
    compile: bool | None = False
    """torch.compile the networks (None: on CUDA only)."""
    bf16: bool | None = False
    """bf16 autocast for forward passes (None: on CUDA only)."""
    channels_last: bool | None = None
    """channels-last memory format for the convolutions (None: on CUDA only)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be > 0")
        if self.learning_rate_final is not None and self.learning_rate_final <= 0:
            raise ValueError(f"learning_rate_final ({self.learning_rate_final}) must be > 0")
        for name in ("learning_rate_decay_start", "learning_rate_decay_updates"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.target_sync_updates < 1:
            raise ValueError(f"target_sync_updates ({self.target_sync_updates}) must be >= 1")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm ({self.max_grad_norm}) must be > 0")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"device {self.device!r} is unknown; accepted: auto, cpu, cuda[:N]")

    def learning_rate_at(self, updates: int) -> float:
        """The step size of the update after `updates` updates."""
        final = self.learning_rate_final
        if final is None or updates < self.learning_rate_decay_start:
            return self.learning_rate
        done = updates - self.learning_rate_decay_start
        if done >= self.learning_rate_decay_updates:
            return final
        return (
            self.learning_rate
            + (final - self.learning_rate) * done / self.learning_rate_decay_updates
        )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class Learner:
    """Steps double-DQN updates on batches and exposes its variables (weights, counters)."""

    def __init__(
        self, config: LearnerConfig, network_config: NetworkConfig, num_actions: int, stack: int = 4
    ):
        self.config = config
        self.device = config.torch_device
        self.online = build_network(network_config, num_actions, stack).to(self.device)
        self.target = build_network(network_config, num_actions, stack).to(self.device)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(  # fused on CUDA: one kernel, not one per tensor
            self.online.parameters(), lr=config.learning_rate, eps=config.adam_epsilon,
            fused=self.device.type == "cuda",
        )  # fmt: skip
        self.updates = 0
        on_cuda = self.device.type == "cuda"
        self.use_bf16 = on_cuda if config.bf16 is None else config.bf16
        self.channels_last = on_cuda if config.channels_last is None else config.channels_last
        if self.channels_last:
            self.online.to(memory_format=torch.channels_last)
            self.target.to(memory_format=torch.channels_last)
        use_compile = on_cuda if config.compile is None else config.compile
        # Compiled callables share parameters with the modules; state_dict()s stay plain.
        self._online_forward = torch.compile(self.online) if use_compile else self.online
        self._target_forward = torch.compile(self.target) if use_compile else self.target
        self._failure_at_update = int(os.environ.get(FAILURE_AT_UPDATE_ENV) or 0)

    def _frames(self, array: np.ndarray) -> torch.Tensor:
        frames = self._tensor(array)
        if self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        return frames

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()  # page-locked: the copy below runs asynchronously
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    def update(self, sample) -> tuple[dict[str, float], np.ndarray]:
        """One gradient step on a replay Sample.

        Returns:
            (metrics, |TD| per sample as new priorities).
        """
        if self.updates + 1 == self._failure_at_update:
            raise RuntimeError(f"injected failure at update {self._failure_at_update}")
        obs = self._frames(sample.obs)  # [B, S, 84, 84] uint8; scaled inside the net
        next_obs = self._frames(sample.next_obs)
        actions = self._tensor(sample.actions, torch.int64)
        returns = self._tensor(sample.returns, torch.float32)
        discounts = self._tensor(sample.discounts, torch.float32)
        weights = self._tensor(sample.weights, torch.float32)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            q_tm1 = self._online_forward(obs).float()  # [B, A]
            with torch.no_grad():
                q_t_target = self._target_forward(next_obs).float()  # [B, A]
                q_t_selector = (
                    self._online_forward(next_obs).float() if self.config.double else None
                )  # [B, A]
        loss, extra = double_dqn_loss(
            q_tm1,
            actions,
            returns,
            discounts,
            q_t_selector if q_t_selector is not None else q_t_target,
            q_t_target,
            importance_weights=weights,
            double=self.config.double,
            huber_delta=self.config.huber_delta,
        )
        learning_rate = self.config.learning_rate_at(self.updates)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.online.parameters(), self.config.max_grad_norm
        )
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.config.target_sync_updates == 0:
            self.target.load_state_dict(self.online.state_dict())
        td_abs = extra.td_abs.cpu().numpy()
        metrics = {
            "learner/loss": float(loss.detach()),
            "learner/mean_q": float(extra.q_taken.mean()),
            "learner/td_abs": float(td_abs.mean()),
            "learner/grad_norm": float(grad_norm),
            "learner/learning_rate": learning_rate,
            "learner/updates": self.updates,
        }
        return metrics, td_abs

    def cpu_weights(self) -> dict[str, torch.Tensor]:
        """The online net's weights on the CPU, for actors."""
        return {name: t.detach().cpu().clone() for name, t in self.online.state_dict().items()}

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors and plain values only)."""
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Weights, Adam's moments and the update count from `state`; the step size, ε and the
        fused kernel stay this learner's (torch would take the saved param groups' own: a
        branch's new learning rate, or a CPU checkpoint resumed on CUDA, would be ignored)."""
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        ours = self.optimizer.param_groups[0]
        optimizer = {
            **state["optimizer"],
            "param_groups": [
                {**group, **{key: ours[key] for key in ("lr", "eps", "fused")}}
                for group in state["optimizer"]["param_groups"]
            ],
        }
        self.optimizer.load_state_dict(optimizer)
        self.updates = int(state["updates"])
        for group in self.optimizer.param_groups:  # the schedule's, at the loaded update
            group["lr"] = self.config.learning_rate_at(self.updates)


def cpu_copy(state):
    """A deep copy of a (nested) state dict with every tensor on the CPU: a snapshot that later
    updates cannot change and that holds no GPU memory."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: cpu_copy(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(cpu_copy(value) for value in state)
    return state
