"""Role specs and their builders: how each role is made, the same way in both backends.

A spec is a frozen dataclass holding everything one role is built from; `RoleSpecs` derives the
specs from the run's TrainConfig. The in-process backend builds the role cores (ActorCore,
PrioritizedReplay, Learner); the Ray backend ships a spec to a Ray actor, which builds the same
core and wraps it in its Redis runner (ActorRunner, ReplayShard, LearnerRunner).
"""

from __future__ import annotations

import dataclasses

import torch

from actors.actor import ActorConfig, ActorCore, slot_epsilons
from actors.runner import ActorRunner
from common.config import EnvConfig, NetworkConfig
from common.redis_io import RedisEndpoint
from launch.config import TrainConfig
from launch.evaluate import Evaluator
from learner.learner import Learner, LearnerConfig
from learner.runner import LearnerRunner, ReplayClient
from replay_server.replay import PrioritizedReplay, ReplayConfig
from replay_server.shard import ReplayShard


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    """One actor: its envs, exploration and network."""

    actor_id: int
    epsilon_band: int
    """Whose Ape-X ε band (of `epsilon_bands`) its envs take: an actor started later in a run
    takes an initial actor's band."""
    epsilon_bands: int
    """Actors the Ape-X ε ladder is spread over (the initial actor count)."""
    env: EnvConfig
    actor: ActorConfig
    network: NetworkConfig
    seed: int
    weights_poll_frames: int
    """Emulator frames between checks of the published weights version (Ray backend)."""


@dataclasses.dataclass(frozen=True)
class ReplaySpec:
    """One replay shard."""

    shard_id: int
    replay: ReplayConfig
    stack: int
    num_actions: int
    seed: int


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """The learner."""

    learner: LearnerConfig
    network: NetworkConfig
    num_actions: int
    stack: int
    seed: int
    publish_every_updates: int
    torch_threads: int
    """CPU threads for torch (0: torch's default)."""


@dataclasses.dataclass(frozen=True)
class RoleSpecs:
    """The specs of every role of a run, from its config (a TrainConfig)."""

    config: TrainConfig

    def actor(self, actor_id: int, epsilon_band: int, epsilon_bands: int) -> ActorSpec:
        config = self.config
        return ActorSpec(
            actor_id=actor_id,
            epsilon_band=epsilon_band,
            epsilon_bands=epsilon_bands,
            env=config.env,
            actor=config.actor,
            network=config.network,
            seed=config.seed,
            weights_poll_frames=config.distributed.weights_poll_frames,
        )

    def replay(self, shard_id: int) -> ReplaySpec:
        """Shard `shard_id`: a replay of its own --replay.capacity; β anneals over the run's
        samples, of which each of S shards serves about 1/S."""
        config = self.config
        shards = config.distributed.num_shards
        anneal = max(1, config.replay.beta_anneal_samples // shards)
        return ReplaySpec(
            shard_id=shard_id,
            replay=dataclasses.replace(config.replay, beta_anneal_samples=anneal),
            stack=config.env.frame_stack,
            num_actions=config.env.num_actions,
            seed=config.seed,
        )

    def learner(self) -> LearnerSpec:
        config = self.config
        return LearnerSpec(
            learner=config.learner,
            network=config.network,
            num_actions=config.env.num_actions,
            stack=config.env.frame_stack,
            seed=config.seed,
            publish_every_updates=config.publish_every_updates,
            torch_threads=config.torch_threads,
        )


# -- role cores (both backends) -----------------------------------------------------------------


def build_actor(spec: ActorSpec) -> ActorCore:
    return ActorCore(
        spec.env,
        spec.actor,
        spec.network,
        epsilons=slot_epsilons(spec.actor, spec.epsilon_band, spec.epsilon_bands),
        actor_id=spec.actor_id,
        seed=spec.seed,
    )


def build_replay(spec: ReplaySpec) -> PrioritizedReplay:
    return PrioritizedReplay(spec.replay, stack=spec.stack, seed=spec.seed + 7919 * spec.shard_id)


def build_learner(spec: LearnerSpec, state: dict | None = None) -> Learner:
    """The learner, from a checkpoint's learner state when one is given."""
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(spec.seed)
    learner = Learner(spec.learner, spec.network, spec.num_actions, stack=spec.stack)
    if state is not None:
        learner.load_state_dict(state)
    return learner


def build_evaluator(config: TrainConfig) -> Evaluator:
    """The evaluator of a run: its env with the evaluation's sticky actions and no-ops."""
    return Evaluator(config.eval.env(config.env), config.network)


# -- the Redis runners around them (Ray backend) ------------------------------------------------


def build_actor_runner(spec: ActorSpec, endpoint: RedisEndpoint) -> ActorRunner:
    torch.set_num_threads(1)  # an actor holds one CPU
    return ActorRunner(build_actor(spec), endpoint, weights_poll_frames=spec.weights_poll_frames)


def build_shard(spec: ReplaySpec, endpoint: RedisEndpoint) -> ReplayShard:
    return ReplayShard(
        build_replay(spec),
        endpoint,
        shard_id=spec.shard_id,
        stack=spec.stack,
        num_actions=spec.num_actions,
    )


def build_learner_runner(
    spec: LearnerSpec,
    endpoint: RedisEndpoint,
    replay: ReplayClient,
    state: dict | None = None,
    updates_floor: int = 0,
) -> LearnerRunner:
    """`updates_floor`: a learner restarted from an older state counts on from the updates its
    predecessor reached (set before it first publishes), so the counter and the weights'
    version never go back."""
    learner = build_learner(spec, state)
    learner.updates = max(learner.updates, updates_floor)
    publish = spec.publish_every_updates
    return LearnerRunner(learner, replay, endpoint, publish_every_updates=publish)
