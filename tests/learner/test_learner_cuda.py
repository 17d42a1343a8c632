"""The learner's CUDA path (pinned copies, bf16 autocast, channels-last, torch.compile) against
the CPU path on the same weights and batch. Skipped where there is no CUDA device: it runs on a
lent GPU machine (docs/learning.md says when it last did)."""

import numpy as np
import pytest
import torch

from common.config import NetworkConfig
from launch.bench.learner import synthetic_sample
from learner.learner import Learner, LearnerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NETWORK = NetworkConfig()
FAST = {"compile": True, "bf16": True, "channels_last": True}
PLAIN = {"compile": False, "bf16": False, "channels_last": False}


def pair(flags: dict, batch_size: int = 32) -> tuple[Learner, Learner]:
    torch.manual_seed(0)
    cpu = Learner(LearnerConfig(batch_size=batch_size, device="cpu"), NETWORK, num_actions=2)
    gpu = Learner(LearnerConfig(batch_size=batch_size, device="cuda", **flags), NETWORK, 2)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


# (flags, tolerance on |TD| and loss): fp32 differs by TF32 convolutions at most; bf16 keeps
# about 3 significant digits of Q-values around 0.1 here.
@pytest.mark.parametrize(
    ("flags", "atol"), [({}, 2e-3), (PLAIN, 2e-3), (FAST, 3e-2)], ids=["defaults", "plain", "fast"]
)
def test_a_cuda_update_matches_the_cpu_update(flags, atol):
    cpu, gpu = pair(flags)
    assert gpu.device.type == "cuda" and gpu.use_bf16 is flags.get("bf16", False)
    sample = synthetic_sample(np.random.default_rng(1), 32, num_actions=2)
    for _ in range(3):  # the same three steps: Adam's state moves alike on both
        cpu_metrics, cpu_td = cpu.update(sample)
        gpu_metrics, gpu_td = gpu.update(sample)
        assert isinstance(gpu_td, np.ndarray) and gpu_td.shape == (32,)
        np.testing.assert_allclose(gpu_td, cpu_td, atol=atol, rtol=atol)
        assert gpu_metrics["learner/loss"] == pytest.approx(cpu_metrics["learner/loss"], abs=atol)
    weights = gpu.cpu_weights()
    assert all(tensor.device.type == "cpu" for tensor in weights.values())
    for name, tensor in cpu.online.state_dict().items():  # 3 Adam steps move each by <= 3 lr
        torch.testing.assert_close(weights[name], tensor, atol=5e-3, rtol=1e-2)


def test_a_state_trained_on_the_cuda_defaults_loads_on_the_cpu():
    gpu = Learner(LearnerConfig(batch_size=64, device="cuda"), NETWORK, num_actions=2)
    sample = synthetic_sample(np.random.default_rng(2), 64, num_actions=2)
    for _ in range(2):
        gpu.update(sample)
    cpu = Learner(LearnerConfig(batch_size=64, device="cpu"), NETWORK, num_actions=2)
    cpu.load_state_dict(gpu.state_dict())  # a checkpoint written on the GPU resumes on a CPU
    assert cpu.updates == 2
    frames = torch.from_numpy(sample.obs[:8])
    with torch.inference_mode():
        on_cpu = cpu.online(frames)
        on_gpu = gpu.online(frames.cuda()).float().cpu()
    torch.testing.assert_close(on_cpu, on_gpu, atol=1e-3, rtol=1e-2)
