"""`mario status` reads a run's state from a real redis-server, or from its status.json."""

import json
import re
import time

import msgpack
import pytest
import redis
from rich.console import Console

from common.redis_io import RedisKeys
from launch.status import StatusConfig, health_problems, show


def test_status_shows_counters_roles_and_lag(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys("run-x")
    client.hset(keys.counters, mapping={"env_steps": 1234, "chunks_written": 12})
    client.hset(keys.heartbeats, mapping={"actor-0": time.time() - 3, "learner": time.time()})
    client.hset(keys.stats, "actor-0", msgpack.packb({"frames_per_s": 812.5, "policy_version": 7}))
    client.hset(keys.stats, "learner", msgpack.packb({"learner/updates_per_s": 9.5,
                                                      "learner/loss": 0.25}))  # fmt: skip
    client.set(keys.weights_version, 9)
    client.xadd(keys.experience, {b"c": b"x"})
    run_dir = tmp_path / "run-x"
    run_dir.mkdir()
    (run_dir / "redis_url").write_text(redis_url + "\n")
    console = Console(record=True, width=120)
    state = show(StatusConfig(run_dir=run_dir), console)
    assert state["counters"]["env_steps"] == 1234
    assert state["stream_lag_chunks"] == 1 and state["weights_version"] == 9
    assert 2.5 < state["heartbeat_age_s"]["actor-0"] < 30
    text = console.export_text()
    for expected in ("run run-x", "1,234", "actor-0", "812", "learner", "9.5", "0.250"):
        assert expected in text


@pytest.mark.parametrize(
    ("ages", "problems"),
    [
        ({"learner": 1.0, "actor-0": 2.0}, []),
        ({"learner": 1.0, "actor-0": 500.0, "actor-1": 3.0}, []),  # one fresh actor is enough
        ({"actor-0": 2.0}, ["no learner heartbeat"]),
        ({"learner": 61.0, "actor-0": 2.0}, ["learner heartbeat 61 s old"]),
        ({"learner": 1.0}, ["no actor heartbeat"]),
        ({"learner": 1.0, "actor-0": 90.0}, ["newest actor heartbeat 90 s old"]),
        ({}, ["no learner heartbeat", "no actor heartbeat"]),
    ],
)
def test_health_problems(ages, problems):
    assert health_problems({"heartbeat_age_s": ages}, within_s=60) == problems


def test_without_redis_status_reads_the_status_file_and_checks_its_age(tmp_path):
    run_dir = tmp_path / "serial-run"
    run_dir.mkdir()
    best = {"env_steps": 50_000, "flag_rate": 0.2, "x_pos_mean": 1234.5, "x_pos_median": 1100,
            "x_pos_max": 3161}  # fmt: skip
    state = {"mode": "serial", "time": time.time() - 100, "elapsed_s": 600.0,
             "counters": {"env_steps": 4321}, "rates": {"rate/env_steps_per_s": 81.5},
             "last_eval": best, "best_eval": best}  # fmt: skip
    (run_dir / "status.json").write_text(json.dumps(state))
    console = Console(record=True, width=120)
    show(StatusConfig(run_dir=run_dir), console)
    text = " ".join(console.export_text().split())  # the title wraps
    # the file's age is 100 s plus however long the test took to get here
    assert re.search(r"run serial-run \(serial; status.json written 1\d\d s ago\)", text), text
    for expected in ("4,321", "81.5", "│ best │ 50,000 │ 20% │ 1234 │ 1100 │ 3161 │"):
        assert expected in text
    show(StatusConfig(run_dir=run_dir, healthy_within=200), console)
    with pytest.raises(SystemExit) as exit_info:
        show(StatusConfig(run_dir=run_dir, healthy_within=60), console)
    assert exit_info.value.code == 1
    assert re.search(r"status.json 1\d\d s old", console.export_text())


def test_a_malformed_entry_is_named_and_skipped_and_the_rest_still_shows(redis_url, tmp_path):
    # One bad record must not hide the others, nor fail --healthy-within (the container health
    # check) while the heartbeats are fresh.
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys("run-bad")
    client.hset(keys.counters, mapping={"env_steps": 1234, "chunks_written": "lots"})
    client.hset(keys.heartbeats, mapping={"actor-0": time.time() - 3, "learner": time.time(),
                                          "actor-1": "yesterday"})  # fmt: skip
    client.hset(keys.stats, "actor-0", b"\xc1 not msgpack")
    client.hset(keys.stats, "actor-1", msgpack.packb({"frames_per_s": "fast"}))
    client.hset(keys.stats, "learner", msgpack.packb({"learner/loss": 0.25}))
    client.set(keys.weights_version, "v9")
    run_dir = tmp_path / "run-bad"
    run_dir.mkdir()
    (run_dir / "redis_url").write_text(redis_url + "\n")
    console = Console(record=True, width=200)
    state = show(StatusConfig(run_dir=run_dir, healthy_within=60), console)
    assert state["counters"] == {"env_steps": 1234}
    assert set(state["heartbeat_age_s"]) == {"actor-0", "learner"}
    assert set(state["stats"]) == {"actor-1", "learner"} and state["weights_version"] == 0
    assert state["malformed"] == ["counter 'chunks_written'", "stats of 'actor-0'",
                                  "heartbeat of 'actor-1'", "the weights version"]  # fmt: skip
    text = " ".join(console.export_text().split())
    assert "run run-bad: healthy malformed entries skipped: counter 'chunks_written'" in text
    console = Console(record=True, width=200)
    show(StatusConfig(run_dir=run_dir), console)
    text = " ".join(console.export_text().split())
    assert "0.250" in text and "malformed entries skipped: counter 'chunks_written'" in text
