"""Q-networks: the tutorial's Nature CNN and a dueling variant, both taking uint8 frames."""

from __future__ import annotations

import torch
from torch import nn

from common.config import NetworkConfig


def _torso(in_channels: int, channels: tuple[int, int, int]) -> nn.Sequential:
    # Nature DQN: conv 32/8/4, 64/4/2, 64/3/1 → 64×7×7 for 84×84 input.
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel_size=8, stride=4),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=4, stride=2),
        nn.ReLU(),
        nn.Conv2d(c2, c3, kernel_size=3, stride=1),
        nn.ReLU(),
        nn.Flatten(),
    )


class QNetwork(nn.Module):
    """Nature-CNN Q-network: uint8 [B, C, 84, 84] → Q-values [B, A]; scales to [0, 1] inside."""

    def __init__(self, num_actions: int, in_channels: int = 4, config: NetworkConfig | None = None):
        super().__init__()
        config = config or NetworkConfig()
        self.torso = _torso(in_channels, config.conv_channels)
        features, hidden = config.conv_channels[2] * 7 * 7, config.hidden
        self.head = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.torso(frames.float() / 255.0))


class DuelingQNetwork(nn.Module):
    """Dueling head (Wang et al. 2016): Q = V + A − mean(A), same torso and input as QNetwork."""

    def __init__(self, num_actions: int, in_channels: int = 4, config: NetworkConfig | None = None):
        super().__init__()
        config = config or NetworkConfig()
        self.torso = _torso(in_channels, config.conv_channels)
        features, hidden = config.conv_channels[2] * 7 * 7, config.hidden
        self.value = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.advantage = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        features = self.torso(frames.float() / 255.0)
        advantage = self.advantage(features)  # [B, A]
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


def build_network(config: NetworkConfig, num_actions: int, in_channels: int = 4) -> nn.Module:
    """The Q-network the config asks for."""
    cls = DuelingQNetwork if config.dueling else QNetwork
    return cls(num_actions, in_channels, config)
