"""The Mario environment pipeline: action repeat + max-pool, grayscale 84×84 uint8, frame stack.

One lean Gymnasium env replaces the seed's chain of five wrappers. It drives the emulator of
`gym-super-mario-bros` directly (`frame_advance`) and reads the few RAM bytes the classic reward
needs, instead of calling the package's per-frame `step()`, which builds a 30-key info dict every
frame. That bookkeeping alone costs ~10 % of the emulator's speed; skipping it is how the wrapped
env keeps ≥ 85 % of the raw frame rate.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import Any, ClassVar

import cv2
import gym_super_mario_bros.smb_env as smb_env_module
import gymnasium as gym
import numpy as np
from gym_super_mario_bros.smb_env import SuperMarioBrosEnv

from common.config import ACTION_SETS, EnvConfig

OBS_SIZE = 84
_SCREEN_SHAPE = (240, 256)
_BUTTONS = {
    "right": 0b10000000,
    "left": 0b01000000,
    "down": 0b00100000,
    "up": 0b00010000,
    "start": 0b00001000,
    "select": 0b00000100,
    "B": 0b00000010,
    "A": 0b00000001,
    "NOOP": 0,
}

# RAM addresses (SMB1), as read by gym-super-mario-bros.
_RAM_X_PAGE = 0x006D
_RAM_X_SCREEN = 0x0086
_RAM_PLAYER_STATE = 0x000E
_RAM_Y_VIEWPORT = 0x00B5
_RAM_TIME = 0x07F8  # three decimal digits
_RAM_SCORE = 0x07DE  # six decimal digits
_RAM_WORLD = 0x075F
_RAM_STAGE = 0x075C
_RAM_AREA = 0x0760  # the part of a stage (a pipe or a bonus room leads to another)
_RAM_GAME_MODE = 0x0770  # 2 = end of world
_RAM_FLOAT_STATE = 0x001D  # 0 = on the ground, 3 = sliding down the flag pole
_RAM_ENEMY_TYPES = (0x0016, 0x0017, 0x0018, 0x0019, 0x001A)
_RAM_CHANGE_AREA_TIMER = 0x06DE
_RAM_PRELEVEL_TIMER = 0x07A0
_STATE_DYING = 0x0B
_STATE_DEAD = 0x06
_BUSY_STATES = frozenset((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07))
_STAGE_OVER_ENEMIES = (0x2D, 0x31)  # Bowser, flag pole
DEATH_PENALTY = -25
REWARD_CLIP = 15


# gym-super-mario-bros 7.x shipped a second SMB1 ROM, "downsample" (its SuperMarioBros-v1); 9.x
# ships only the vanilla one. Compared byte by byte (7.4.0's two files), the downsample ROM is
# the vanilla ROM with the bytes below changed: eight background palette entries (the sky) set
# to black (NES colour 0x0D), and five runs of background tiles (scenery) blanked. It is rebuilt
# here from the installed vanilla ROM and checked against 7.4.0's file by its SHA-256.
_VANILLA_SHA256 = "ec299b990e8bfee8ba46e3f61d63b2e1ae5b8a2e431de84e2e4bbd692dc53586"
_ROM_PATCHES: dict[str, tuple[str, tuple[tuple[int, bytes], ...]]] = {
    "downsample": (
        "b65e7d0fb62d39926b67b612bb94b1c355a5f9e81c0851e3f878c0ec50b8a9df",
        (
            (1503, b"\x0d" * 8),
            (37472, bytes(8)),
            (37648, bytes(207)),
            (38928, bytes(32)),
            (39440, bytes(32)),
            (39826, bytes(139)),
        ),
    ),
}


def rom_path(graphics: str) -> str:
    """The SMB1 ROM file for a graphics mode (see EnvConfig.graphics): the package's own for
    vanilla, else the patched copy, made once per machine in the temp directory.

    Raises:
        ValueError: the installed vanilla ROM is not the one the patch was made for.
    """
    vanilla = smb_env_module.smb1_rom_path()
    if graphics == "vanilla":
        return vanilla
    expected, patch = _ROM_PATCHES[graphics]
    path = pathlib.Path(tempfile.gettempdir()) / "mario-apex-roms" / f"smb1-{expected[:16]}.nes"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == expected:
        return str(path)
    rom = bytearray(pathlib.Path(vanilla).read_bytes())
    found = hashlib.sha256(rom).hexdigest()
    if found != _VANILLA_SHA256:
        raise ValueError(
            f"graphics {graphics!r} patches the SMB1 ROM with SHA-256 {_VANILLA_SHA256}, but "
            f"{vanilla} has {found}: use --env.graphics vanilla with this gym-super-mario-bros"
        )
    for offset, data in patch:
        rom[offset : offset + len(data)] = data
    if hashlib.sha256(rom).hexdigest() != expected:
        raise RuntimeError(f"the {graphics} ROM patch did not give the ROM it was made from")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(rom)
    partial.replace(path)  # atomic: another process may be making the same file
    return str(path)


def make_game(level: tuple[int, int], graphics: str = "vanilla") -> SuperMarioBrosEnv:
    """The package's emulator env of one level, booted from the graphics mode's ROM."""
    if graphics == "vanilla":
        return SuperMarioBrosEnv(target=level)
    path = rom_path(graphics)
    # The package's constructor takes no ROM path: it asks its module's smb1_rom_path().
    original = smb_env_module.smb1_rom_path
    smb_env_module.smb1_rom_path = lambda: path
    try:
        return SuperMarioBrosEnv(target=level)
    finally:
        smb_env_module.smb1_rom_path = original


def action_bytes(action_set: str) -> np.ndarray:
    """Joypad bitmaps, one per discrete action of the named set."""
    codes = []
    for buttons in ACTION_SETS[action_set]:
        code = 0
        for button in buttons:
            code |= _BUTTONS[button]
        codes.append(code)
    return np.array(codes, dtype=np.uint8)


def classic_frame_reward(dx: int, dtime: int, died: bool) -> int:
    """The 7.x per-frame reward: Δx + clock penalty + death penalty, clipped to ±15.

    Args:
        dx: x_pos change this frame; |dx| > 5 is a teleport (death, pipe) and counts 0.
        dtime: in-game clock change this frame; an increase (reset) counts 0.
        died: Mario is dying or dead this frame.
    """
    if dx < -5 or dx > 5:
        dx = 0
    dtime = min(dtime, 0)
    reward = dx + dtime + (DEATH_PENALTY if died else 0)
    return max(-REWARD_CLIP, min(REWARD_CLIP, reward))


class FrameRing:
    """Frame stack without per-step copies of the stack.

    New frames are written into a ring of `stack + slack` slots and `stack()` returns a
    contiguous view of the newest `stack` frames. Only when the write position reaches the end
    are the last `stack - 1` frames moved to the front (amortised: once per `slack` steps).

    Trap: a returned view stays valid for `slack` more pushes only; copy it to keep it longer.
    """

    def __init__(self, stack: int, slack: int = 64, frame_shape: tuple[int, int] = (84, 84)):
        self.stack_size = stack
        self.buffer = np.zeros((stack + slack, *frame_shape), dtype=np.uint8)
        self.position = stack - 1  # index of the newest frame

    def next_slot(self) -> np.ndarray:
        """Advances the ring and returns the slot to write the newest frame into."""
        if self.position + 1 >= len(self.buffer):
            keep = self.stack_size - 1
            if keep:
                self.buffer[:keep] = self.buffer[self.position - keep + 1 : self.position + 1]
            self.position = keep - 1
        self.position += 1
        return self.buffer[self.position]

    def fill(self, frame: np.ndarray) -> None:
        """Starts an episode: every stacked frame is `frame`."""
        self.position = self.stack_size - 1
        self.buffer[: self.stack_size] = frame

    def stack(self) -> np.ndarray:
        """View of the newest frames, oldest first: [stack, H, W] uint8."""
        return self.buffer[self.position - self.stack_size + 1 : self.position + 1]


class MarioEnv(gym.Env):
    """Super Mario Bros with the project's observation pipeline and reward.

    Observations are uint8 [frame_stack, 84, 84] views into a frame ring (see FrameRing's
    trap). `info` holds x_pos, flag_get, world, stage, time, score, frames (emulator frames this
    step), life_lost and stuck (ended for standing still: see EnvConfig.stuck_steps).
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(self, config: EnvConfig, render_mode: str | None = None):
        self.config = config
        self.render_mode = render_mode
        self._levels = config.levels
        self._action_bytes = action_bytes(config.action_set)
        self.action_space = gym.spaces.Discrete(len(self._action_bytes))
        self.observation_space = gym.spaces.Box(
            0, 255, (config.frame_stack, OBS_SIZE, OBS_SIZE), dtype=np.uint8
        )
        self._games: dict[tuple[int, int], SuperMarioBrosEnv] = {}
        self._game: SuperMarioBrosEnv | None = None
        self._ring = FrameRing(config.frame_stack)
        self._gray = np.empty(_SCREEN_SHAPE, dtype=np.uint8)
        self._gray_previous = np.empty(_SCREEN_SHAPE, dtype=np.uint8)
        self._episode_steps = 0
        self._previous_action_byte = 0
        self._a_outlived_its_jump = False  # A held since before Mario's last time in the air
        self._a_was_airborne = False
        self._x_last = 0
        self._time_last = 0
        self._max_x = 0
        self._steps_since_new_max_x = 0
        self._done = True

    # -- emulator access --------------------------------------------------------------------

    def _game_for(self, level: tuple[int, int]) -> SuperMarioBrosEnv:
        game = self._games.get(level)
        if game is None:
            # The package's constructor boots the ROM, skips the title screen and keeps a
            # backup state at the level's start; reset() restores it.
            game = make_game(level, self.config.graphics)
            self._games[level] = game
        return game

    def _x_pos(self) -> int:
        ram = self._ram
        return int(ram[_RAM_X_PAGE]) * 256 + int(ram[_RAM_X_SCREEN])

    def _clock(self) -> int:
        ram = self._ram
        return int(ram[_RAM_TIME]) * 100 + int(ram[_RAM_TIME + 1]) * 10 + int(ram[_RAM_TIME + 2])

    def _dying(self) -> bool:
        state = int(self._ram[_RAM_PLAYER_STATE])
        return state in (_STATE_DYING, _STATE_DEAD) or int(self._ram[_RAM_Y_VIEWPORT]) > 1

    def _flag_get(self) -> bool:
        ram = self._ram
        if int(ram[_RAM_GAME_MODE]) == 2:
            return True
        for address in _RAM_ENEMY_TYPES:
            if int(ram[address]) in _STAGE_OVER_ENEMIES:
                return int(ram[_RAM_FLOAT_STATE]) == 3
        return False

    def _skip_cutscenes(self) -> int:
        """The package's between-frame RAM hacks (pipes, area changes); returns frames used."""
        ram = self._ram
        timer = int(ram[_RAM_CHANGE_AREA_TIMER])
        if 1 < timer < 255:
            ram[_RAM_CHANGE_AREA_TIMER] = 1
        frames = 0
        while int(ram[_RAM_PLAYER_STATE]) in _BUSY_STATES or int(ram[_RAM_GAME_MODE]) == 2:
            ram[_RAM_PRELEVEL_TIMER] = 0
            self._emulator.frame_advance(0)
            frames += 1
        return frames

    # -- Gymnasium API ----------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        rng = self.np_random
        level = self._levels[int(rng.integers(len(self._levels)))]
        self._game = self._game_for(level)
        self._game.reset()
        self._emulator = self._game._env
        self._ram = self._game.ram
        self._x_last = self._x_pos()
        self._time_last = self._clock()
        self._previous_action_byte = 0
        self._a_outlived_its_jump = self._a_was_airborne = False
        self._episode_steps = 0
        self._done = False
        self._ring.fill(self._observe_frame())
        frames = 0
        noops = int(rng.integers(self.config.noop_max + 1)) if self.config.noop_max else 0
        for _ in range(noops):
            _, terminated, step_frames = self._advance(0)
            frames += step_frames
            if terminated:  # practically impossible in the first seconds; start over
                return self.reset(options=options)
        self._episode_steps = 0
        self._max_x, self._steps_since_new_max_x = self._x_pos(), 0
        self._area = int(self._ram[_RAM_AREA])
        return self._ring.stack(), self._info(frames=frames, life_lost=False, stuck=False)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        config = self.config
        reward, terminated, frames = self._advance(int(self._action_bytes[action]))
        self._episode_steps += 1
        life_lost = terminated and self._dying()
        if terminated and not life_lost:
            reward += config.flag_bonus  # the flag (or an end of world)
        stuck = False
        x_pos, area = self._x_pos(), int(self._ram[_RAM_AREA])
        if area != self._area:  # x starts again in another part of the stage (e.g. 1-2's exit)
            self._area, self._max_x, self._steps_since_new_max_x = area, x_pos, 0
        elif x_pos > self._max_x:
            self._max_x, self._steps_since_new_max_x = x_pos, 0
        else:
            self._steps_since_new_max_x += 1
            stuck = not terminated and 0 < config.stuck_steps <= self._steps_since_new_max_x
        if stuck and config.stuck_is_death:  # costs what a death frame costs, after clipping
            terminated, reward = True, reward - REWARD_CLIP
        truncated = not terminated and (stuck or self._episode_steps >= config.max_episode_steps)
        self._done = terminated or truncated
        info = self._info(frames, life_lost, stuck)
        return self._ring.stack(), reward * config.reward_scale, terminated, truncated, info

    def _advance(self, action_byte: int) -> tuple[float, bool, int]:
        """Repeats the action frame_skip times; writes the max-pooled frame into the ring."""
        skip = self.config.frame_skip
        sticky = self.config.sticky_action_prob
        native = self.config.reward == "native"
        rng = self.np_random
        emulator = self._emulator
        total_reward = 0.0
        terminated = False
        frames = 0
        pooled = False
        for frame_index in range(skip):
            byte = action_byte
            if sticky and rng.random() < sticky:
                byte = self._previous_action_byte
            if frame_index == 0 and self._a_outlived_its_jump and byte & _BUTTONS["A"]:
                byte &= ~_BUTTONS["A"] & 0xFF  # release_jump: let go of A for this one frame
            self._previous_action_byte = byte
            frames += 1
            if native:
                # The package's own step: its reward, termination and RAM hacks, per frame.
                _, reward, terminated, _, _ = self._game.step(byte)
                total_reward += reward
            else:
                emulator.frame_advance(byte)
                x_pos, clock, dying = self._x_pos(), self._clock(), self._dying()
                total_reward += classic_frame_reward(
                    x_pos - self._x_last, clock - self._time_last, dying
                )
                self._x_last, self._time_last = x_pos, clock
                terminated = dying or self._flag_get()
                if not terminated:
                    frames += self._skip_cutscenes()
            if self.config.release_jump:
                self._track_held_jump(byte)
            if terminated:
                break
            if frame_index == skip - 2:
                emulator.copy_screen_grayscale(self._gray_previous)
                pooled = True
        if native:
            self._x_last = self._x_pos()
        self._write_observation(pooled)
        return total_reward, terminated, frames

    def _track_held_jump(self, byte: int) -> None:
        """For release_jump: whether the A held now was pressed before Mario's last time in the
        air and he stands on the ground again — a held A the NES will not jump on. A new press
        counts from the frame it starts; the game sets the airborne state a frame after a press,
        so a press on a step's last frame is not mistaken for one that already jumped."""
        if not byte & _BUTTONS["A"]:
            self._a_outlived_its_jump = False
            self._a_was_airborne = False
            return
        airborne = int(self._ram[_RAM_FLOAT_STATE]) != 0
        if airborne:
            self._a_was_airborne = True
        self._a_outlived_its_jump = self._a_was_airborne and not airborne

    def _observe_frame(self) -> np.ndarray:
        self._emulator.copy_screen_grayscale(self._gray)
        return cv2.resize(self._gray, (OBS_SIZE, OBS_SIZE), interpolation=cv2.INTER_AREA)

    def _write_observation(self, pooled: bool) -> None:
        self._emulator.copy_screen_grayscale(self._gray)
        if pooled:  # max over the last two frames removes NES sprite flicker
            np.maximum(self._gray, self._gray_previous, out=self._gray)
        cv2.resize(
            self._gray,
            (OBS_SIZE, OBS_SIZE),
            dst=self._ring.next_slot(),
            interpolation=cv2.INTER_AREA,
        )

    def _info(self, frames: int, life_lost: bool, stuck: bool) -> dict[str, Any]:
        ram = self._ram
        score = 0
        for digit in ram[_RAM_SCORE : _RAM_SCORE + 6]:
            score = score * 10 + int(digit)
        return {
            "x_pos": self._x_pos(),
            "flag_get": self._flag_get(),
            "world": int(ram[_RAM_WORLD]) + 1,
            "stage": int(ram[_RAM_STAGE]) + 1,
            "time": self._clock(),
            "score": score,
            "frames": frames,
            "life_lost": life_lost,
            "stuck": stuck,
        }

    def render(self) -> np.ndarray | None:
        """The current RGB screen [240, 256, 3] (a copy), for videos."""
        if self._game is None:
            return None
        return np.array(self._game.screen)

    def close(self) -> None:
        for game in self._games.values():
            game.close()
        self._games.clear()
        self._game = None


def make_env(config: EnvConfig, seed: int | None = None) -> MarioEnv:
    """Builds the pipeline and pins OpenCV to one thread (actors own exactly one core)."""
    cv2.setNumThreads(1)
    env = MarioEnv(config)
    if seed is not None:
        env.reset(seed=seed)
    return env
