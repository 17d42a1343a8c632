"""Q-networks take uint8 stacks and return one value per action."""

import pytest
import torch

from common.config import NetworkConfig
from common.networks import DuelingQNetwork, QNetwork, build_network


@pytest.mark.parametrize("dueling", [False, True])
@pytest.mark.parametrize("num_actions", [5, 7, 12])
def test_output_shape_from_uint8(dueling, num_actions):
    network = build_network(NetworkConfig(dueling=dueling), num_actions)
    assert isinstance(network, DuelingQNetwork if dueling else QNetwork)
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    q = network(frames)
    assert q.shape == (3, num_actions)
    assert q.dtype == torch.float32


def test_scaling_happens_inside():
    torch.manual_seed(0)
    network = QNetwork(5)
    frames = torch.full((1, 4, 84, 84), 255, dtype=torch.uint8)
    with torch.no_grad():
        expected = network.head(network.torso(torch.ones(1, 4, 84, 84)))
        torch.testing.assert_close(network(frames), expected)


def test_nature_cnn_parameter_count():
    # conv: 4·32·64+32, 32·64·16+64, 64·64·9+64; fc: 3136·512+512, 512·5+5
    expected = (8192 + 32) + (32768 + 64) + (36864 + 64) + (1605632 + 512) + (2560 + 5)
    assert sum(p.numel() for p in QNetwork(5).parameters()) == expected


def test_dueling_advantages_are_centered():
    torch.manual_seed(0)
    network = DuelingQNetwork(5)
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        features = network.torso(frames.float() / 255)
        value = network.value(features)
        q = network(frames)
    torch.testing.assert_close(q.mean(dim=1, keepdim=True), value)
