"""The learner role: online and target nets, Adam, gradient clipping, target sync, weights."""

from __future__ import annotations

import copy
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
    # Defaults by measurement (`mario bench learner`, README): on an H100 the eager update is
    # bound by the host (about 5 ms of kernel launches against 0.7 ms of GPU work at batch 32):
    # replayed as one CUDA graph it runs 4.0-4.6x faster there; torch.compile and bf16 autocast
    # cost more than they save; channels-last is within the measurements' noise (kept). On
    # this project's 2-core CPU bf16 is 9-10x slower.
    compile: bool | None = False
    """torch.compile the networks (None: on CUDA only)."""
    bf16: bool | None = False
    """bf16 autocast for forward passes (None: on CUDA only)."""
    channels_last: bool | None = None
    """channels-last memory format for the convolutions (None: on CUDA only)."""
    cuda_graph: bool | None = None
    """Replay the whole update (forward, loss, backward, clip, Adam) as one captured CUDA graph:
    one launch instead of ~130 (None: on CUDA unless compile; needs a CUDA device)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the online net's weights (Polyak averaging),
    moved toward them by (1 - ema_decay) after each update; evaluation during training then
    plays the average, and the run keeps and ships it (0: no average). 0.9998 averages over
    about 5,000 updates (40,000 env steps at 4 samples per insert and batch 32): `mario train`'s
    default (its recipe; run ema-3)."""
    advantage_learning: float = 0.0
    """α of Advantage Learning (Bellemare et al. 2016): each target loses α times how far the
    action taken falls below the best under the target net, max_b Q(s, b) − Q(s, a) >= 0, which
    widens the gap between the greedy action and the others (0: off; the paper's Atari runs:
    0.9). Costs one more forward pass of the target net per update (in float32, bf16 or not)."""

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
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta ({self.huber_delta}) must be > 0")
        if self.adam_epsilon <= 0:
            raise ValueError(f"adam_epsilon ({self.adam_epsilon}) must be > 0")
        accepted = "accepted: auto, cpu, cuda, cuda:N, mps"
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda", "mps"):
                raise ValueError(f"device {self.device!r} is unknown; {accepted}")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph (True) and compile (True) exclude each other; pick one")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay ({self.ema_decay}) must be in [0, 1) (0: no average)")
        if not 0 <= self.advantage_learning < 1:
            raise ValueError(
                f"advantage_learning ({self.advantage_learning}) must be in [0, 1) (0: off)"
            )

    @property
    def averaged(self) -> bool:
        """Whether an average of the weights is kept (and so played and shipped)."""
        return self.ema_decay > 0

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
        """The device, checked against this machine's (where the learner runs).

        Raises:
            ValueError: a CUDA device this machine does not have, named.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ValueError(f"device {self.device!r}: this machine has {count} CUDA "
                                 "device(s); use --learner.device cpu (or auto)")  # fmt: skip
        return device


class Learner:
    """Steps double-DQN updates on batches and exposes its variables (weights, counters).

    On CUDA the update is captured once as a CUDA graph (after WARM_UP_UPDATES eager updates on
    a side stream, as torch's docs require) and replayed on static input tensors: the eager
    update is bound by its ~130 kernel launches from Python, not by the GPU. The learning rate
    lives in a device tensor there, so the schedule reaches the captured Adam step.
    """

    WARM_UP_UPDATES = 3

    def __init__(
        self, config: LearnerConfig, network_config: NetworkConfig, num_actions: int, *,
        stack: int = 4,
    ):  # fmt: skip
        self.config = config
        self.device = config.torch_device
        on_cuda = self.device.type == "cuda"
        use_compile = on_cuda if config.compile is None else config.compile
        self.graphed = (
            (on_cuda and not use_compile) if config.cuda_graph is None else config.cuda_graph
        )
        if self.graphed and not on_cuda:
            raise ValueError(f"cuda_graph (True) needs a CUDA device; device is {self.device}")
        if self.graphed and use_compile:
            raise ValueError("cuda_graph and compile exclude each other; pick one")
        self.online = build_network(network_config, num_actions, stack).to(self.device)
        self.target = build_network(network_config, num_actions, stack).to(self.device)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        learning_rate = config.learning_rate
        if self.graphed:  # read by the captured step at each replay
            learning_rate = torch.tensor(learning_rate, device=self.device)
        self.optimizer = torch.optim.Adam(  # fused on CUDA: one kernel, not one per tensor
            self.online.parameters(), lr=learning_rate, eps=config.adam_epsilon,
            fused=on_cuda, capturable=self.graphed,
        )  # fmt: skip
        self.updates = 0
        self.use_bf16 = on_cuda if config.bf16 is None else config.bf16
        self.channels_last = on_cuda if config.channels_last is None else config.channels_last
        if self.channels_last:
            self.online.to(memory_format=torch.channels_last)
            self.target.to(memory_format=torch.channels_last)
        # The average of the online net's weights, if kept: a copy (same device and layout)
        # that _step moves toward them in place, so the captured graph moves it too.
        self.ema = copy.deepcopy(self.online).requires_grad_(False) if config.averaged else None
        # The average's float tensors and the online net's they follow, listed once (loads copy
        # into both in place, so the lists stay valid): the hot path only lerps them.
        pairs = [] if self.ema is None else [
            (mine, theirs)
            for mine, theirs in zip(self.ema.state_dict().values(),
                                    self.online.state_dict().values(), strict=True)
            if mine.is_floating_point()
        ]  # fmt: skip
        self._averaged = [mine for mine, _ in pairs]
        self._averaged_from = [theirs for _, theirs in pairs]
        # Compiled callables share parameters with the modules; state_dict()s stay plain.
        self._online_forward = torch.compile(self.online) if use_compile else self.online
        self._target_forward = torch.compile(self.target) if use_compile else self.target
        self._failure_at_update = int(os.environ.get(FAILURE_AT_UPDATE_ENV) or 0)
        self._graph: _CapturedUpdate | None = None
        self._eager_updates = 0  # since the graph was last dropped: the warm-up before capture

    def _tensor(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = _as_tensor(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()  # page-locked: the copy below runs asynchronously
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    def _inputs(self, sample) -> dict[str, torch.Tensor]:
        return {name: self._tensor(getattr(sample, name), dtype) for name, dtype in INPUTS.items()}

    def _step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The update on device tensors, with no host synchronisation (it is what the graph
        captures). Returns [loss, mean Q(s, a), gradient norm, |TD| per sample...]."""
        obs, next_obs = inputs["obs"], inputs["next_obs"]  # [B, S, 84, 84] uint8
        if self.channels_last:
            obs = obs.contiguous(memory_format=torch.channels_last)
            next_obs = next_obs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16,
            cache_enabled=not self.graphed,  # a graph capture cannot use autocast's cache
        ):  # fmt: skip
            q_tm1 = self._online_forward(obs).float()  # [B, A]
            with torch.no_grad():
                q_t_target = self._target_forward(next_obs).float()  # [B, A]
                q_t_selector = (
                    self._online_forward(next_obs).float() if self.config.double else None
                )  # [B, A]
        q_tm1_target = None
        if self.config.advantage_learning:  # in float32 even under bf16: gaps are ~0.05 % of Q
            with torch.no_grad():
                q_tm1_target = self._target_forward(obs).float()  # [B, A]
        loss, extra = double_dqn_loss(
            q_tm1,
            inputs["actions"],
            inputs["returns"],
            inputs["discounts"],
            q_t_selector if q_t_selector is not None else q_t_target,
            q_t_target,
            importance_weights=inputs["weights"],
            double=self.config.double,
            huber_delta=self.config.huber_delta,
            q_tm1_target=q_tm1_target,
            advantage_learning=self.config.advantage_learning,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.online.parameters(), self.config.max_grad_norm
        )
        self.optimizer.step()
        if self._averaged:
            self._move_average()
        scalars = torch.stack([loss.detach(), extra.q_taken.mean(), grad_norm])
        return torch.cat([scalars, extra.td_abs])

    @torch.no_grad()
    def _move_average(self) -> None:
        """ema ← ema + (1 − decay)·(online − ema), every weight and float buffer at once."""
        torch._foreach_lerp_(self._averaged, self._averaged_from, 1.0 - self.config.ema_decay)

    def _set_learning_rate(self, learning_rate: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(learning_rate)  # in place: the captured step reads it
            else:
                group["lr"] = learning_rate

    def update(self, sample) -> tuple[dict[str, float], np.ndarray]:
        """One gradient step on a replay Sample.

        Returns:
            (metrics, |TD| per sample as new priorities).
        """
        if self.updates + 1 == self._failure_at_update:
            raise RuntimeError(f"injected failure at update {self._failure_at_update}")
        learning_rate = self.config.learning_rate_at(self.updates)
        self._set_learning_rate(learning_rate)
        if self._graph is not None and self._graph.fits(sample):
            out = self._graph.replay(sample)
        elif self.graphed and self._eager_updates >= self.WARM_UP_UPDATES:
            self._graph = _CapturedUpdate(self, sample)  # again for a batch of another shape
            out = self._graph.replay(sample)
        elif self.graphed:  # warm-up: eager, on a side stream (torch.cuda.graphs' recipe)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                out = self._step(self._inputs(sample))
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._eager_updates += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            out = self._step(self._inputs(sample))
        self.updates += 1
        if self.updates % self.config.target_sync_updates == 0:
            self.target.load_state_dict(self.online.state_dict())  # in place: graph-safe
        values = out.cpu().numpy()  # the one host synchronisation of an update
        td_abs = values[3:]
        metrics = {
            "learner/loss": float(values[0]),
            "learner/mean_q": float(values[1]),
            "learner/td_abs": float(td_abs.mean()),
            "learner/grad_norm": float(values[2]),
            "learner/learning_rate": learning_rate,
            "learner/updates": self.updates,
        }
        return metrics, td_abs

    def cpu_weights(self, net: str = "online") -> dict[str, torch.Tensor]:
        """A net's weights on the CPU: the online net's (for actors), or the average's ("ema",
        for evaluation; KeyError if none is kept)."""
        module = {"online": self.online, **({"ema": self.ema} if self.ema is not None else {})}[net]
        return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}

    @property
    def evaluated_net(self) -> str:
        """The net evaluation plays and a run ships: the average if one is kept."""
        return "ema" if self.ema is not None else "online"

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors and plain values only)."""
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Weights (and their average, if kept), Adam's moments and the update count from
        `state`; the step size, ε, the fused kernel and graph capture stay this learner's (torch
        would take the saved param groups' own: a branch's new learning rate, or a CPU
        checkpoint resumed on CUDA, would be ignored)."""
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        if self.ema is not None:  # a state saved without an average starts it at the weights
            self.ema.load_state_dict(state.get("ema", state["online"]))
        ours = self.optimizer.param_groups[0]
        optimizer = {
            **state["optimizer"],
            "state": {  # copies: torch keeps a tensor already on the right device as it is,
                # and two learners would then step the same Adam moments
                key: {name: _copied(value) for name, value in entry.items()}
                for key, entry in state["optimizer"]["state"].items()
            },
            "param_groups": [
                {**group, **{key: ours[key] for key in ("lr", "eps", "fused", "capturable")}}
                for group in state["optimizer"]["param_groups"]
            ],
        }
        self.optimizer.load_state_dict(optimizer)  # new moment tensors: recapture the graph
        self._graph, self._eager_updates = None, 0
        for parameter, moments in self.optimizer.state.items():  # in the weights' layout: a
            for name, value in moments.items():  # CPU state is contiguous, CUDA's channels-last
                if value.shape == parameter.shape and value.stride() != parameter.stride():
                    moments[name] = torch.empty_like(parameter).copy_(value)
        self.updates = int(state["updates"])
        self._set_learning_rate(self.config.learning_rate_at(self.updates))  # at the loaded update


INPUTS = {  # a Sample's fields the update reads, with their dtype on the device
    "obs": None,  # uint8 frames: scaled inside the net
    "next_obs": None,
    "actions": torch.int64,
    "returns": torch.float32,
    "discounts": torch.float32,
    "weights": torch.float32,
}


def _copied(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _as_tensor(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if dtype is None else tensor.to(dtype)


class _CapturedUpdate:
    """A learner's update captured as one CUDA graph, with the static tensors it reads: replay()
    copies a sample into them (from page-locked staging buffers) and replays the graph."""

    def __init__(self, learner: Learner, sample):
        self.pinned = {  # the staging buffers, in the dtypes the update reads
            name: _as_tensor(getattr(sample, name), dtype).pin_memory()
            for name, dtype in INPUTS.items()
        }
        self.inputs = {
            name: torch.empty_like(tensor, device=learner.device)
            for name, tensor in self.pinned.items()
        }
        self.shapes = {name: tuple(tensor.shape) for name, tensor in self.pinned.items()}
        learner.optimizer.zero_grad(set_to_none=True)  # backward writes, not adds, the grads
        self.graph = torch.cuda.CUDAGraph()
        # On the learner's device (cuda:1 too), on a stream of that device; thread_local: a
        # checkpoint or weights read in another thread may use CUDA meanwhile.
        stream = torch.cuda.Stream(learner.device)
        with (
            torch.cuda.device(learner.device),
            torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"),
        ):
            self.out = learner._step(self.inputs)

    def fits(self, sample) -> bool:
        return all(getattr(sample, name).shape == shape for name, shape in self.shapes.items())

    def _copy_in(self, sample) -> None:
        # The last update's copies have finished: update() ends by reading its result.
        for name, pinned in self.pinned.items():
            pinned.numpy()[...] = getattr(sample, name)  # cast to the staging dtype
            self.inputs[name].copy_(pinned, non_blocking=True)

    def replay(self, sample) -> torch.Tensor:
        self._copy_in(sample)
        with torch.cuda.device(self.out.device):
            self.graph.replay()
        return self.out


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
