"""The seed tutorial's teaching example: tabular Q-learning vs double Q-learning on a 3×3 grid.

The agent starts in the top-left corner and must reach the bottom-right one, moving in 8
directions. Each step costs −1; the step that reaches the end pays 0 and ends the episode, so
the best route (one diagonal step, then the step onto the goal) returns −1.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

# (row, column) deltas of the 8 moves, and the arrow printed for each.
MOVES = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
ARROWS = ("↑", "↗", "→", "↘", "↓", "↙", "←", "↖")
ALGORITHMS = ("q_learning", "double_q_learning")


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Tabular Q-learning and double Q-learning on the tutorial's 3×3 grid."""

    size: int = 3
    """Grid side length."""
    episodes: int = 2000
    """Training episodes per algorithm."""
    learning_rate: float = 0.1
    """Step size α of the tabular update."""
    gamma: float = 0.9
    """Discount factor."""
    epsilon: float = 0.1
    """Exploration rate of the ε-greedy behaviour policy."""
    target_sync_steps: int = 10
    """Double Q-learning: copy the online table into the target table every this many steps."""
    max_steps: int = 100
    """Step cap per episode."""
    rolling_window: int = 50
    """Episodes in the rolling average of the plot."""
    seed: int = 0
    """Random seed."""
    out: pathlib.Path = pathlib.Path("runs/grid")
    """Folder for the reward-curve PNG."""

    def __post_init__(self) -> None:
        for name in ("size", "episodes", "target_sync_steps", "max_steps", "rolling_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.size < 2:
            raise ValueError(f"size ({self.size}) must be >= 2")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be >= 0")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be in (0, 1]")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma ({self.gamma}) must be in [0, 1]")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon ({self.epsilon}) must be in [0, 1]")


class GridWorld:
    """States are cells numbered row-major; moves off the grid leave the agent in place."""

    def __init__(self, size: int = 3):
        self.size = size
        self.start = 0
        self.goal = size * size - 1

    @property
    def num_states(self) -> int:
        return self.size * self.size

    def step(self, state: int, action: int) -> tuple[int, float, bool]:
        """Returns (next state, reward, done)."""
        row, column = divmod(state, self.size)
        d_row, d_column = MOVES[action]
        row = min(max(row + d_row, 0), self.size - 1)
        column = min(max(column + d_column, 0), self.size - 1)
        next_state = row * self.size + column
        if next_state == self.goal:
            return next_state, 0.0, True
        return next_state, -1.0, False


def train(config: GridConfig, algorithm: str) -> tuple[np.ndarray, np.ndarray]:
    """Trains one algorithm; returns (Q table [S, 8], return of each episode [episodes]).

    q_learning:        Q(s,a) += α (r + γ max_a' Q(s',a') − Q(s,a))
    double_q_learning: Q(s,a) += α (r + γ Q_target(s', argmax_a' Q(s',a')) − Q(s,a)),
                       with Q_target a copy of Q refreshed every target_sync_steps steps.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown; accepted: {', '.join(ALGORITHMS)}")
    world = GridWorld(config.size)
    rng = np.random.default_rng(config.seed)
    q = np.zeros((world.num_states, len(MOVES)))
    q_target = q.copy()
    returns = np.zeros(config.episodes)
    total_steps = 0
    for episode in range(config.episodes):
        state, episode_return = world.start, 0.0
        for _ in range(config.max_steps):
            if rng.random() < config.epsilon:
                action = int(rng.integers(len(MOVES)))
            else:  # break ties at random so an untrained table still explores
                best = np.flatnonzero(q[state] == q[state].max())
                action = int(rng.choice(best))
            next_state, reward, done = world.step(state, action)
            if done:
                bootstrap = 0.0
            elif algorithm == "q_learning":
                bootstrap = q[next_state].max()
            else:
                bootstrap = q_target[next_state, int(q[next_state].argmax())]
            q[state, action] += config.learning_rate * (
                reward + config.gamma * bootstrap - q[state, action]
            )
            total_steps += 1
            if algorithm == "double_q_learning" and total_steps % config.target_sync_steps == 0:
                q_target = q.copy()
            episode_return += reward
            state = next_state
            if done:
                break
        returns[episode] = episode_return
    return q, returns


def greedy_path(q: np.ndarray, size: int = 3) -> tuple[list[int], float]:
    """Follows argmax Q from the start: (visited states, total reward)."""
    world = GridWorld(size)
    state, path, total = world.start, [world.start], 0.0
    for _ in range(world.num_states * 2):
        state, reward, done = world.step(state, int(q[state].argmax()))
        path.append(state)
        total += reward
        if done:
            break
    return path, total


def policy_arrows(q: np.ndarray, size: int = 3) -> str:
    """The greedy policy as a grid of arrows ('G' marks the goal)."""
    rows = []
    for row in range(size):
        cells = []
        for column in range(size):
            state = row * size + column
            cells.append("G" if state == size * size - 1 else ARROWS[int(q[state].argmax())])
        rows.append(" ".join(cells))
    return "\n".join(rows)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the trailing `window` values at each index (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def save_reward_plot(returns: dict[str, np.ndarray], window: int, path: pathlib.Path) -> None:
    """Per-episode returns of each algorithm, and their rolling averages normalised to [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (raw_axis, normalized_axis) = plt.subplots(1, 2, figsize=(12, 4))
    for name, values in returns.items():
        raw_axis.plot(values, label=name, alpha=0.6, linewidth=0.8)
        smooth = rolling_mean(values, window)
        span = smooth.max() - smooth.min()
        normalized = (smooth - smooth.min()) / span if span > 0 else np.ones_like(smooth)
        normalized_axis.plot(normalized, label=name)
    raw_axis.set(title="Return per episode", xlabel="episode", ylabel="return")
    normalized_axis.set(
        title=f"Rolling average ({window} episodes), normalised", xlabel="episode", ylabel="0..1"
    )
    for axis in (raw_axis, normalized_axis):
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(config: GridConfig) -> tuple[dict[str, dict], pathlib.Path]:
    """Trains both algorithms and saves the plot.

    Returns:
        ({algorithm: q, arrows, path, greedy_return, mean_return_last_100}, plot path).
    """
    results, returns = {}, {}
    for algorithm in ALGORITHMS:
        q, returns[algorithm] = train(config, algorithm)
        path, total = greedy_path(q, config.size)
        results[algorithm] = {
            "q": q,
            "arrows": policy_arrows(q, config.size),
            "path": path,
            "greedy_return": total,
            "mean_return_last_100": float(returns[algorithm][-100:].mean()),
        }
    plot_path = config.out / "grid_rewards.png"
    save_reward_plot(returns, config.rolling_window, plot_path)
    return results, plot_path
