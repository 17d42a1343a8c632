"""The Mario pipeline on the real emulator (level 1-1)."""

import dataclasses
import hashlib
import pathlib
import tempfile

import gym_super_mario_bros.smb_env as smb_env_module
import numpy as np
import pytest
from gym_super_mario_bros.smb_env import SuperMarioBrosEnv

from common.config import EnvConfig
from common.mario_env import FrameRing, action_bytes, classic_frame_reward, make_env, rom_path

RIGHT = 1  # index of ['right'] in every action set but right_jump


@pytest.fixture(scope="module")
def env():
    environment = make_env(EnvConfig())
    yield environment
    environment.close()


def run_actions(config: EnvConfig, actions, seed=0):
    """Plays a fixed action list; returns (stacked obs copies, rewards, infos, flags)."""
    environment = make_env(config)
    observation, _ = environment.reset(seed=seed)
    observations, rewards, infos, ends = [observation.copy()], [], [], []
    for action in actions:
        observation, reward, terminated, truncated, info = environment.step(action)
        observations.append(observation.copy())
        rewards.append(reward)
        infos.append(info)
        ends.append((terminated, truncated))
        if terminated or truncated:
            break
    environment.close()
    return np.stack(observations), rewards, infos, ends


@pytest.mark.parametrize(
    ("action_set", "size"), [("right_jump", 2), ("right_only", 5), ("simple", 7), ("complex", 12)]
)
def test_action_space_sizes(action_set, size):
    environment = make_env(EnvConfig(action_set=action_set))
    assert environment.action_space.n == size
    assert len(action_bytes(action_set)) == size
    environment.close()


def test_observation_is_uint8_stack(env):
    observation, info = env.reset(seed=1)
    assert observation.shape == (4, 84, 84)
    assert observation.dtype == np.uint8
    assert (info["world"], info["stage"]) == (1, 1)
    for key in ("x_pos", "flag_get", "world", "stage", "time", "score"):
        assert key in info
    observation, *_ = env.step(RIGHT)
    assert observation.shape == (4, 84, 84) and observation.dtype == np.uint8
    assert observation.max() > observation.min()  # a real picture, not a blank


def test_frame_stack_shifts_by_one_frame(env):
    env.reset(seed=2)
    previous = env.step(0)[0].copy()
    new_frames = 0
    for _ in range(70):  # standing still (the goomba walks in); crosses the ring's wrap-around
        current = env.step(0)[0].copy()
        np.testing.assert_array_equal(current[:3], previous[1:])
        new_frames += not np.array_equal(current[3], current[2])
        previous = current
    assert new_frames > 10  # the frames move: the shift is not of identical pictures


def test_frame_ring_keeps_order_across_wrap():
    ring = FrameRing(stack=3, slack=2, frame_shape=(1, 1))
    ring.fill(np.zeros((1, 1), np.uint8))
    for value in range(1, 10):
        ring.next_slot()[:] = value
        expected = [max(value - 2, 0), max(value - 1, 0), value]
        assert ring.stack().ravel().tolist() == expected


def test_walking_right_into_the_goomba_terminates_on_life_loss():
    # Holding right on 1-1 runs into the first goomba and dies well within 200 steps.
    _, rewards, infos, ends = run_actions(EnvConfig(), [RIGHT] * 200)
    assert ends[-1] == (True, False)
    assert infos[-1]["life_lost"] and not infos[-1]["flag_get"]
    assert rewards[-1] <= -15 + 3 * 4  # the death frame is clipped to -15
    assert len(rewards) < 200


def test_step_cap_truncates():
    _, _, _, ends = run_actions(EnvConfig(max_episode_steps=5), [0] * 10)
    assert len(ends) == 5 and ends[-1] == (False, True)


def test_reward_over_a_skip_is_the_sum_of_frame_rewards():
    rng = np.random.default_rng(3)
    actions = [int(a) for a in rng.integers(5, size=60)]
    _, skip4_rewards, skip4_infos, _ = run_actions(EnvConfig(frame_skip=4), actions)
    per_frame = [a for a in actions for _ in range(4)]
    _, skip1_rewards, _, _ = run_actions(EnvConfig(frame_skip=1), per_frame)
    for step, reward in enumerate(skip4_rewards):
        assert reward == sum(skip1_rewards[4 * step : 4 * step + 4])
    assert skip4_infos[-1]["x_pos"] > 40  # Mario moved


def test_native_reward_over_a_skip_matches_package_steps():
    actions = [RIGHT, 2, 2, RIGHT, 4, 4, RIGHT, 0] * 5
    _, rewards, _, _ = run_actions(EnvConfig(reward="native"), actions)
    game = SuperMarioBrosEnv(target=(1, 1))
    game.reset()
    codes = action_bytes("right_only")
    for action, reward in zip(actions, rewards, strict=False):
        expected = 0.0
        for _ in range(4):
            _, frame_reward, terminated, _, _ = game.step(int(codes[action]))
            expected += frame_reward
            if terminated:
                break
        assert reward == pytest.approx(expected)
    game.close()


@pytest.mark.parametrize(
    ("dx", "dtime", "died", "expected"),
    [
        (3, 0, False, 3),  # walking right
        (-2, 0, False, -2),  # walking left
        (5, 0, False, 5),  # fastest legal move
        (6, 0, False, 0),  # teleport (pipe/reset) counts 0
        (-200, 0, False, 0),
        (2, -1, False, 1),  # clock tick
        (0, 399, False, 0),  # clock reset counts 0
        (0, 0, True, -15),  # -25 clipped to -15
        (3, -1, True, -15),
    ],
)
def test_classic_frame_reward_table(dx, dtime, died, expected):
    assert classic_frame_reward(dx, dtime, died) == expected


def test_classic_reward_matches_hand_computation_from_recorded_info():
    # frame_skip=1 so every step is one frame; recompute each reward from x_pos/time/death.
    actions = [RIGHT] * 40 + [4] * 300
    config = EnvConfig(frame_skip=1, max_episode_steps=1000)
    environment = make_env(config)
    _, info = environment.reset(seed=0)
    x_last, time_last = info["x_pos"], info["time"]
    saw_clock_tick = saw_death = False
    for action in actions:
        _, reward, terminated, _, info = environment.step(action)
        dx = info["x_pos"] - x_last
        dx = 0 if abs(dx) > 5 else dx
        dtime = min(info["time"] - time_last, 0)
        death = -25 if info["life_lost"] else 0
        assert reward == max(-15, min(15, dx + dtime + death))
        saw_clock_tick |= dtime < 0
        saw_death |= info["life_lost"]
        x_last, time_last = info["x_pos"], info["time"]
        if terminated:
            break
    environment.close()
    assert saw_clock_tick and saw_death


def test_seeding_makes_runs_identical():
    config = EnvConfig(sticky_action_prob=0.25, noop_max=10)
    actions = [int(a) for a in np.random.default_rng(4).integers(5, size=80)]
    first = run_actions(config, actions, seed=7)
    second = run_actions(config, actions, seed=7)
    other = run_actions(config, actions, seed=8)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert len(first[0]) != len(other[0]) or not np.array_equal(first[0], other[0])


def test_sticky_actions_change_a_run_only_when_probability_is_positive():
    actions = [int(a) for a in np.random.default_rng(5).integers(5, size=80)]
    plain_a = run_actions(EnvConfig(), actions, seed=1)
    plain_b = run_actions(EnvConfig(), actions, seed=2)
    np.testing.assert_array_equal(plain_a[0], plain_b[0])  # p = 0: the seed changes nothing
    sticky = run_actions(EnvConfig(sticky_action_prob=0.25), actions, seed=1)
    assert len(sticky[0]) != len(plain_a[0]) or not np.array_equal(sticky[0], plain_a[0])


def test_noop_starts_vary_the_start():
    config = EnvConfig(noop_max=30)
    environment = make_env(config)
    starts = {environment.reset(seed=seed)[1]["time"] for seed in range(6)}
    starts |= {int(environment.reset(seed=seed)[0][-1].sum()) for seed in range(6)}
    environment.close()
    assert len(starts) > 2


def test_level_list_is_sampled_per_episode():
    environment = make_env(EnvConfig(level="1-1, 4-2"))
    seen = set()
    environment.reset(seed=0)
    for _ in range(12):
        _, info = environment.reset()
        seen.add((info["world"], info["stage"]))
    environment.close()
    assert seen == {(1, 1), (4, 2)}


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("level", "9-1", "world 1..8"),
        ("level", "1-5", "stage 1..4"),
        ("level", "abc", "WORLD-STAGE"),
        ("level", "1-1,2-9", "WORLD-STAGE"),
        ("action_set", "everything", "right_jump, right_only, simple, complex"),
        ("reward", "dense", "classic, native"),
        ("graphics", "v1", "vanilla, downsample"),
    ],
)
def test_bad_config_names_value_and_accepted_ones(field, value, accepted):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(EnvConfig(), **{field: value})
    assert repr(value.split(",")[-1].strip()) in str(error.value) or repr(value) in str(error.value)
    assert accepted in str(error.value)


# -- recipe options: stuck episodes, flag bonus, reward scale ------------------------------------

NOOP = 0


def test_standing_still_is_a_bootstrapped_truncation_after_stuck_steps():
    _, _, infos, ends = run_actions(EnvConfig(stuck_steps=10), [NOOP] * 50)
    assert len(ends) == 10 and ends[-1] == (False, True)  # truncated, not terminated
    assert infos[-1]["stuck"] and not infos[-2]["stuck"] and not infos[-1]["life_lost"]


def test_moving_right_resets_the_stuck_count():
    # 8 no-ops, 5 steps right (new max x each), 8 no-ops: never 10 steps without a new max
    _, _, _, ends = run_actions(EnvConfig(stuck_steps=10), [NOOP] * 8 + [RIGHT] * 5 + [NOOP] * 8)
    assert len(ends) == 21 and ends[-1] == (False, False)


@pytest.mark.parametrize("new_part", [False, True])
def test_another_part_of_the_stage_starts_the_stuck_count_again(new_part):
    # A pipe to another part of a stage (1-2's exit, a bonus room) starts x again near 0:
    # measured against the furthest x of the part before, 100 steps there counted as stuck (a
    # death with stuck_is_death), and 1-2 could not be cleared
    from common.mario_env import _RAM_AREA

    environment = make_env(EnvConfig(stuck_steps=10))
    environment.reset(seed=0)
    raw = environment.unwrapped
    raw._max_x = 10_000  # as if the part before had been played far to the right
    ends = [environment.step(RIGHT)[3] for _ in range(5)]
    if new_part:
        raw._ram[_RAM_AREA] ^= 1  # Mario comes out in another part of the stage
    for _ in range(7):
        _, _, terminated, truncated, info = environment.step(RIGHT)
        ends.append(truncated)
        if terminated or truncated:
            break
    environment.close()
    assert any(ends) == (not new_part) and ends.count(True) <= 1
    assert not new_part or not info["stuck"]


def test_stuck_is_death_terminates_with_a_clipped_death_penalty():
    _, rewards, infos, ends = run_actions(EnvConfig(stuck_steps=10, stuck_is_death=True),
                                          [NOOP] * 50)  # fmt: skip
    _, plain_rewards, _, _ = run_actions(EnvConfig(stuck_steps=10), [NOOP] * 50)
    assert len(ends) == 10 and ends[-1] == (True, False) and infos[-1]["stuck"]
    assert rewards[-1] == plain_rewards[-1] - 15  # what a death frame costs after clipping
    assert rewards[:-1] == plain_rewards[:-1]


@pytest.mark.parametrize(("scale", "bonus"), [(1.0, 50.0), (0.1, 50.0), (0.5, 0.0)])
def test_reward_scale_and_flag_bonus(scale, bonus, monkeypatch):
    actions = [RIGHT] * 30
    _, plain, _, _ = run_actions(EnvConfig(), actions)
    _, scaled, _, _ = run_actions(EnvConfig(reward_scale=scale, flag_bonus=bonus), actions)
    assert scaled == pytest.approx([scale * r for r in plain])  # no flag: no bonus
    # The flag: the frame it is reached ends the episode, with the bonus added before scaling.
    environment = make_env(EnvConfig(reward_scale=scale, flag_bonus=bonus))
    environment.reset(seed=0)
    monkeypatch.setattr(environment, "_flag_get", lambda: True)
    _, reward, terminated, truncated, info = environment.step(RIGHT)
    environment.close()
    assert (terminated, truncated, info["life_lost"]) == (True, False, False)
    # one frame of walking from a standstill (Δx 0 or 1, no clock tick yet) plus the bonus
    assert scale * bonus <= reward <= scale * (bonus + 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stuck_steps": -1}, r"stuck_steps \(-1\) must be >= 0"),
        ({"stuck_is_death": True}, "stuck_is_death needs stuck_steps > 0"),
        ({"reward_scale": 0.0}, r"reward_scale \(0.0\) must be > 0"),
        ({"flag_bonus": 50.0, "reward": "native"}, r"flag_bonus \(50.0\) needs the classic"),
    ],
)
def test_bad_recipe_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig(**kwargs)


# -- release_jump: a held A is released on the ground, so a jump action always jumps -----------

JUMP = 1  # ['right', 'A'] in right_jump


def hold_jump_from(
    x_switch: int, release_jump: bool, steps: int = 200, frame_skip: int = 4
) -> tuple[int, list[int]]:
    """Hops (right, right+A alternately) to x_switch, then holds right+A: (max x, Mario's y
    per step)."""
    config = EnvConfig(action_set="right_jump", release_jump=release_jump, frame_skip=frame_skip)
    environment = make_env(config)
    _, info = environment.reset(seed=0)
    holding, max_x, heights = False, 0, []
    for step in range(steps):
        holding = holding or info["x_pos"] >= x_switch
        _, _, terminated, truncated, info = environment.step(JUMP if holding else step % 2)
        max_x = max(max_x, info["x_pos"])
        heights.append(int(environment._ram[0x00CE]))
        if terminated or truncated:
            break
    environment.close()
    return max_x, heights


@pytest.mark.parametrize(("release_jump", "passes_the_pipe"), [(False, False), (True, True)])
def test_holding_jump_at_the_first_pipe(release_jump, passes_the_pipe):
    # Holding right+A from x 380: one jump, then (without release_jump) Mario lands before the
    # first pipe (x 434) with A still held and stands there; with it he hops on over the pipes.
    max_x, _ = hold_jump_from(380, release_jump)
    assert (max_x > 600) == passes_the_pipe, max_x
    if not passes_the_pipe:
        assert 430 <= max_x <= 440


@pytest.mark.parametrize(("frame_skip", "steps"), [(4, 14), (1, 56)])
def test_release_jump_keeps_a_held_jump_whole_and_jumps_again_on_landing(frame_skip, steps):
    # From a standstill, holding A: the same full-height arc either way (y 176 is the ground;
    # it falls as Mario rises), then only release_jump jumps again on landing. With one frame
    # per step, A is held into a step while Mario is still on the ground (the game makes him
    # airborne a frame after the press): that must not count as a landing.
    _, plain = hold_jump_from(0, release_jump=False, steps=steps, frame_skip=frame_skip)
    _, released = hold_jump_from(0, release_jump=True, steps=steps, frame_skip=frame_skip)
    landing = plain.index(176, plain.index(min(plain)))
    assert min(plain) <= 115 and plain[: landing + 1] == released[: landing + 1]
    assert set(plain[landing:]) == {176} and min(released[landing:]) < 170


# -- graphics: the downsample ROM of gym-super-mario-bros 7.x ------------------------------------

# SHA-256 of gym-super-mario-bros 7.4.0's _roms/super-mario-bros-downsample.nes (from its wheel)
DOWNSAMPLE_7_4_0 = "b65e7d0fb62d39926b67b612bb94b1c355a5f9e81c0851e3f878c0ec50b8a9df"


def test_downsample_rom_is_the_one_7_4_0_shipped():
    assert hashlib.sha256(pathlib.Path(rom_path("downsample")).read_bytes()).hexdigest() == (
        DOWNSAMPLE_7_4_0
    )


def test_downsample_graphics_change_the_picture_not_the_game():
    # The same actions give the same positions and rewards; the sky (the commonest pixel of the
    # first frame's top rows, a mid grey in vanilla) is black.
    actions = [RIGHT] * 30 + [2] * 6 + [RIGHT] * 20  # 2: right + A
    plain = run_actions(EnvConfig(), actions)
    downsampled = run_actions(EnvConfig(graphics="downsample"), actions)
    assert [i["x_pos"] for i in plain[2]] == [i["x_pos"] for i in downsampled[2]]
    assert plain[1] == downsampled[1] and plain[3] == downsampled[3]
    sky = [np.bincount(obs[0, -1, :20].ravel()).argmax() for obs in (plain[0], downsampled[0])]
    assert sky[0] > 100 and sky[1] == 0


def test_downsample_refuses_a_vanilla_rom_it_was_not_made_for(tmp_path, monkeypatch):
    other = tmp_path / "other.nes"
    other.write_bytes(bytes(40976))
    monkeypatch.setattr(smb_env_module, "smb1_rom_path", lambda: str(other))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError, match=r"graphics 'downsample'.*other\.nes has [0-9a-f]{64}"):
        rom_path("downsample")
