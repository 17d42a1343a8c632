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
    group = gpu.optimizer.param_groups[0]
    assert gpu.device.type == "cuda" and gpu.use_bf16 is flags.get("bf16", False)
    assert group["fused"] is True and gpu.channels_last is flags.get("channels_last", True)
    start = {name: t.clone() for name, t in cpu.online.state_dict().items()}
    sample = synthetic_sample(np.random.default_rng(1), 32, num_actions=2)
    for _ in range(3):  # the same three steps: Adam's state moves alike on both
        cpu_metrics, cpu_td = cpu.update(sample)
        gpu_metrics, gpu_td = gpu.update(sample)
        assert isinstance(gpu_td, np.ndarray) and gpu_td.shape == (32,)
        np.testing.assert_allclose(gpu_td, cpu_td, atol=atol, rtol=atol)
        assert gpu_metrics["learner/loss"] == pytest.approx(cpu_metrics["learner/loss"], abs=atol)
    weights = gpu.cpu_weights()
    assert all(tensor.device.type == "cpu" for tensor in weights.values())
    # What the three steps moved (up to 3 lr = 7.5e-4 per weight) agrees in direction, and in
    # fp32 to within one step per weight (TF32 convolutions move the few weights whose gradient
    # is near Adam's ε by up to half a step: seen on an H100).
    moved = {name: (weights[name] - start[name], cpu.online.state_dict()[name] - start[name])
             for name in start if start[name].is_floating_point()}  # fmt: skip
    gpu_all = torch.cat([g.flatten() for g, _ in moved.values()])
    cpu_all = torch.cat([c.flatten() for _, c in moved.values()])
    similarity = torch.nn.functional.cosine_similarity(gpu_all, cpu_all, dim=0)
    assert similarity > (0.95 if flags.get("bf16") else 0.99), similarity
    if not flags.get("bf16"):
        torch.testing.assert_close(gpu_all, cpu_all, atol=2.5e-4, rtol=0)


def test_a_state_trained_on_the_cuda_defaults_loads_and_trains_on_the_cpu():
    gpu = Learner(LearnerConfig(batch_size=64, device="cuda"), NETWORK, num_actions=2)
    sample = synthetic_sample(np.random.default_rng(2), 64, num_actions=2)
    for _ in range(2):
        gpu.update(sample)
    cpu = Learner(LearnerConfig(batch_size=64, device="cpu"), NETWORK, num_actions=2)
    cpu.load_state_dict(gpu.state_dict())  # a checkpoint written on the GPU resumes on a CPU
    assert cpu.updates == 2 and cpu.optimizer.param_groups[0]["fused"] is False
    frames = torch.from_numpy(sample.obs[:8])
    with torch.inference_mode():
        on_cpu = cpu.online(frames)
        on_gpu = gpu.online(frames.cuda()).float().cpu()
    torch.testing.assert_close(on_cpu, on_gpu, atol=1e-3, rtol=1e-2)
    metrics, _ = cpu.update(sample)  # and goes on training there
    assert np.isfinite(metrics["learner/loss"]) and cpu.updates == 3
