"""The learner's CUDA path (pinned copies, bf16 autocast, channels-last, torch.compile, the update
captured as a CUDA graph) against the CPU path, and the graph against the eager CUDA update, on
the same weights and batches. Skipped where there is no CUDA device: it runs on a
lent GPU machine (docs/learning.md says when it last did)."""

import io

import numpy as np
import pytest
import torch

from common.config import NetworkConfig
from launch.bench.learner import synthetic_sample
from learner.learner import Learner, LearnerConfig, cpu_copy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NETWORK = NetworkConfig()
FAST = {"compile": True, "bf16": True, "channels_last": True}
PLAIN = {"compile": False, "bf16": False, "channels_last": False, "cuda_graph": False}


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
    for _ in range(6):  # past the warm-up: the last two replay the graph
        gpu.update(sample)
    assert gpu._graph is not None
    buffer = io.BytesIO()  # as a checkpoint is written and read: CPU copies, weights only
    torch.save(cpu_copy(gpu.state_dict()), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    cpu = Learner(LearnerConfig(batch_size=64, device="cpu"), NETWORK, num_actions=2)
    cpu.load_state_dict(state)  # a checkpoint written on the GPU resumes on a CPU
    group = cpu.optimizer.param_groups[0]
    assert cpu.updates == 6 and group["fused"] is False and group["capturable"] is False
    assert isinstance(group["lr"], float)
    frames = torch.from_numpy(sample.obs[:8])
    with torch.inference_mode():
        on_cpu = cpu.online(frames)
        on_gpu = gpu.online(frames.cuda()).float().cpu()
    torch.testing.assert_close(on_cpu, on_gpu, atol=1e-3, rtol=1e-2)
    metrics, _ = cpu.update(sample)  # and goes on training there
    assert np.isfinite(metrics["learner/loss"]) and cpu.updates == 7


def flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten().cpu() for t in net.state_dict().values()])


def test_the_captured_update_replays_the_eager_one(monkeypatch):
    # Past the warm-up (3 eager updates) the graph replays; the schedule's step size falls at
    # every update (1e-3 to 1e-4 over 20, both before and after the load below) and the target
    # syncs every 3rd: both must reach the captured step. A graph that kept its first step
    # size, inputs or target would leave the weights a large part of their movement away from
    # the eager ones; Adam moves the few weights whose gradient is near ε by up to a step on
    # any rounding difference, hence norms, not weights. The average of the weights (ema) is
    # moved inside the graph too, and Advantage Learning's extra target forward runs in it.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    schedule = {"learning_rate": 1e-3, "learning_rate_final": 1e-4,
                "learning_rate_decay_updates": 20, "target_sync_updates": 3,
                "ema_decay": 0.5, "advantage_learning": 0.9}  # fmt: skip
    torch.manual_seed(0)
    eager = Learner(LearnerConfig(device="cuda", cuda_graph=False, **schedule), NETWORK, 2)
    graphed = Learner(LearnerConfig(device="cuda", **schedule), NETWORK, 2)  # the default
    graphed.load_state_dict(eager.state_dict())
    assert graphed.graphed and graphed.optimizer.param_groups[0]["capturable"]
    rng = np.random.default_rng(3)
    samples = [synthetic_sample(rng, 32, num_actions=2) for _ in range(4)]
    start = flat(eager.online)

    def step_both(sample):
        eager_metrics, eager_td = eager.update(sample)
        graphed_metrics, graphed_td = graphed.update(sample)
        np.testing.assert_allclose(graphed_td, eager_td, rtol=1e-3, atol=1e-4)
        for key in ("learner/loss", "learner/mean_q", "learner/grad_norm"):
            assert graphed_metrics[key] == pytest.approx(eager_metrics[key], rel=1e-3, abs=1e-5)
        assert graphed_metrics["learner/learning_rate"] == eager_metrics["learner/learning_rate"]

    def assert_same_nets():
        moved = (flat(eager.online) - start).norm()
        pairs = ((graphed.online, eager.online), (graphed.target, eager.target),
                 (graphed.ema, eager.ema))  # fmt: skip
        for ours, theirs in pairs:
            assert (flat(ours) - flat(theirs)).norm() < 0.01 * moved
        assert (flat(eager.ema) - start).norm() > 0.1 * moved  # the average moved too

    for index in range(8):
        step_both(samples[index % 4])
    assert graphed._graph is not None  # it replayed the last five
    assert_same_nets()
    # A loaded state (other weights, other Adam moments) replaces the graph's: it is captured anew.
    eager.update(samples[0])
    graphed.load_state_dict(eager.state_dict())
    assert graphed._graph is None and graphed.updates == eager.updates == 9
    for index in range(5):
        step_both(samples[(index + 1) % 4])
    assert graphed._graph is not None
    # A batch of another size is captured as its own graph.
    step_both(synthetic_sample(rng, 16, num_actions=2))
    assert graphed._graph.shapes["obs"][0] == 16
    assert_same_nets()


def test_a_state_trained_on_the_cpu_resumes_on_the_cuda_defaults():
    # Adam moments saved on the CPU are contiguous; the CUDA learner's weights are channels-last
    # and its fused Adam needs them alike. Past the warm-up the update replays the graph.
    cpu = Learner(LearnerConfig(device="cpu"), NETWORK, num_actions=2)
    rng = np.random.default_rng(4)
    samples = [synthetic_sample(rng, 32, num_actions=2) for _ in range(3)]
    cpu.update(samples[0])
    gpu = Learner(LearnerConfig(device="cuda"), NETWORK, num_actions=2)
    gpu.load_state_dict(cpu_copy(cpu.state_dict()))
    assert gpu.graphed and gpu.channels_last
    for index in range(6):
        metrics, td_abs = gpu.update(samples[index % 3])
        assert np.isfinite(metrics["learner/loss"]) and np.all(np.isfinite(td_abs))
    assert gpu._graph is not None and gpu.updates == 7
