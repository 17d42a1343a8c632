"""Frozen config dataclasses shared by every role; tyro turns their docstrings into --help."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import typing

ACTION_SETS: dict[str, tuple[tuple[str, ...], ...]] = {
    # DI-adventure's strongest set on 1-1: walk right, or jump right (hold A to jump higher).
    "right_jump": (("right",), ("right", "A")),
    # The seed's default: 5 actions, all moving right (or standing still).
    "right_only": (("NOOP",), ("right",), ("right", "A"), ("right", "B"), ("right", "A", "B")),
    "simple": (
        ("NOOP",),
        ("right",),
        ("right", "A"),
        ("right", "B"),
        ("right", "A", "B"),
        ("A",),
        ("left",),
    ),
    "complex": (
        ("NOOP",),
        ("right",),
        ("right", "A"),
        ("right", "B"),
        ("right", "A", "B"),
        ("A",),
        ("left",),
        ("left", "A"),
        ("left", "B"),
        ("left", "A", "B"),
        ("down",),
        ("up",),
    ),
}
REWARD_MODES = ("classic", "native")
GRAPHICS_MODES = ("vanilla", "downsample")
_LEVEL_PATTERN = re.compile(r"^([1-8])-([1-4])$")


def parse_levels(levels: str) -> tuple[tuple[int, int], ...]:
    """Parses `"1-1"` or `"1-1,4-2"` into ((world, stage), ...).

    Raises:
        ValueError: naming the bad level and the accepted form.
    """
    parsed = []
    for name in levels.split(","):
        match = _LEVEL_PATTERN.match(name.strip())
        if match is None:
            raise ValueError(
                f"level {name.strip()!r} is not a Super Mario Bros level: "
                "use WORLD-STAGE with world 1..8 and stage 1..4 (e.g. '1-1', '8-4'), "
                "or a comma-separated list of them"
            )
        parsed.append((int(match.group(1)), int(match.group(2))))
    return tuple(parsed)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """The Mario environment pipeline."""

    level: str = "1-1"
    """Level as WORLD-STAGE ('1-1' … '8-4'), or a comma-separated list sampled per episode."""
    action_set: str = "right_only"
    """Joypad action set: right_jump (2 actions: right, right+A), right_only (5), simple (7) or
    complex (12)."""
    reward: str = "classic"
    """Reward: classic (Δx + clock penalty + death penalty, clipped to ±15 per frame, as in
    gym-super-mario-bros 7.x) or native (the 9.x package's own shaped reward)."""
    frame_skip: int = 4
    """Emulator frames per agent step; the observation max-pools the last two."""
    frame_stack: int = 4
    """Frames stacked into one observation."""
    max_episode_steps: int = 2000
    """Agent steps after which an episode is truncated (not terminated)."""
    sticky_action_prob: float = 0.0
    """Per-frame probability that the previous action repeats (evaluation uses 0.25)."""
    noop_max: int = 0
    """Random number of no-op agent steps (0..noop_max) at the start of each episode."""
    stuck_steps: int = 0
    """End an episode after this many agent steps without a new max x_pos (0: never). A
    truncation (bootstrapped), unless --env.stuck-is-death."""
    stuck_is_death: bool = False
    """End a stuck episode as a death instead (terminated, −15: a death frame's clipped
    reward)."""
    flag_bonus: float = 0.0
    """Reward added on the step that reaches the flag (classic reward)."""
    reward_scale: float = 1.0
    """Every reward is multiplied by this (after clipping and the flag bonus)."""
    release_jump: bool = False
    """Release A for the first frame of a step when A was held at the end of the last one and
    Mario stands on the ground, so that a jump action always jumps. Without it a held A does
    nothing on landing (the NES needs a new press), and the observation cannot show that A is
    held: a greedy policy that picks right+A at a pipe stands there for ever."""
    graphics: str = "vanilla"
    """ROM graphics: vanilla, or downsample (gym-super-mario-bros 7.x's SuperMarioBros-v1: a
    black sky, background scenery tiles blanked; the same level, physics and RAM). DI-adventure
    found it about halved the steps DQN needed to clear 1-1."""

    def __post_init__(self) -> None:
        parse_levels(self.level)
        if self.action_set not in ACTION_SETS:
            raise ValueError(
                f"action_set {self.action_set!r} is unknown; accepted: {', '.join(ACTION_SETS)}"
            )
        if self.reward not in REWARD_MODES:
            raise ValueError(
                f"reward {self.reward!r} is unknown; accepted: {', '.join(REWARD_MODES)}"
            )
        if self.graphics not in GRAPHICS_MODES:
            raise ValueError(
                f"graphics {self.graphics!r} is unknown; accepted: {', '.join(GRAPHICS_MODES)}"
            )
        if self.frame_skip < 1:
            raise ValueError(f"frame_skip ({self.frame_skip}) must be >= 1")
        if self.frame_stack < 1:
            raise ValueError(f"frame_stack ({self.frame_stack}) must be >= 1")
        if self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps ({self.max_episode_steps}) must be >= 1")
        if not 0.0 <= self.sticky_action_prob < 1.0:
            raise ValueError(f"sticky_action_prob ({self.sticky_action_prob}) must be in [0, 1)")
        if self.noop_max < 0:
            raise ValueError(f"noop_max ({self.noop_max}) must be >= 0")
        if self.stuck_steps < 0:
            raise ValueError(f"stuck_steps ({self.stuck_steps}) must be >= 0 (0: off)")
        if self.stuck_is_death and not self.stuck_steps:
            raise ValueError("stuck_is_death needs stuck_steps > 0")
        if self.reward_scale <= 0:
            raise ValueError(f"reward_scale ({self.reward_scale}) must be > 0")
        if self.flag_bonus and self.reward == "native":
            raise ValueError(f"flag_bonus ({self.flag_bonus}) needs the classic reward")

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """The parsed (world, stage) pairs."""
        return parse_levels(self.level)

    @property
    def num_actions(self) -> int:
        """Size of the discrete action space."""
        return len(ACTION_SETS[self.action_set])


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The Q-network."""

    dueling: bool = False
    """Use a dueling head (value + advantage streams) instead of the plain Nature-CNN head."""
    conv_channels: tuple[int, int, int] = (32, 64, 64)
    """Channels of the three convolutions (Nature DQN: 32 64 64)."""
    hidden: int = 512
    """Units of the head's hidden layer (of each stream when dueling)."""

    def __post_init__(self) -> None:
        if len(self.conv_channels) != 3 or min(self.conv_channels) < 1:
            raise ValueError(f"conv_channels {self.conv_channels} must be three counts >= 1")
        if self.hidden < 1:
            raise ValueError(f"hidden ({self.hidden}) must be >= 1")


def recipe_network() -> NetworkConfig:
    """`mario train`'s network (launch/config.py has the rest of its recipe): dueling, conv
    16-32-32, 256 hidden units — as good as Nature's at 300k env steps on 1-1, 1.8× the
    learner's updates/s on CPU."""
    return NetworkConfig(dueling=True, conv_channels=(16, 32, 32), hidden=256)


def config_to_dict(config) -> dict:
    """A frozen config as plain JSON-able values (paths become strings)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, pathlib.PurePath):
            return str(value)
        return value

    return plain(config)


def config_from_dict(cls: type, data: dict, where: str = "config"):
    """Rebuilds a (nested) frozen config from config_to_dict's output.

    Raises:
        ValueError: naming an unknown field, or a value the config's validation rejects.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = config_from_dict(hint, value, f"{where}.{name}")
        elif value is not None and pathlib.Path in (*typing.get_args(hint), hint):
            values[name] = pathlib.Path(value)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            values[name] = tuple(value)  # a config that went through JSON
        else:
            values[name] = value
    return cls(**values)
