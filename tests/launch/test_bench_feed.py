"""`mario bench feed`: real replay shards (filled through Redis) serve a learner's client through
Ray; one row per configuration, and bad settings are named."""

import json

import pytest

from launch.bench.feed import BenchFeedConfig
from launch.cli import main


def test_bench_feed_measures_every_configuration(tmp_path, capsys):
    out = tmp_path / "feed.json"
    main(["bench", "feed", "--shards", "1", "2", "--batch-sizes", "8", "16", "--prefetch", "2",
          "--batches-per-request", "1", "3", "--transitions-per-shard", "500", "--seconds", "0.3",
          "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    measured = {(row["shards"], row["batch_size"], row["prefetch"], row["batches_per_request"])
                for row in result["rows"]}  # fmt: skip
    assert measured == {(shards, batch, 2, per_request) for shards in (1, 2) for batch in (8, 16)
                        for per_request in (1, 3)}  # fmt: skip
    for row in result["rows"]:
        assert row["batches_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["batches_per_s"] * row["batch_size"])
    # every shard held its share, was sampled and took the learner's priorities back
    for count, shards in result["shards_after"].items():
        assert len(shards) == int(count)
        for shard in shards:
            assert shard["size"] == 500 and shard["sampled"] > 0 and shard["priority_updates"] > 0
    assert "batches/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shards": ()}, "shards () must be one or more numbers >= 1"),
        ({"prefetch": (0,)}, "prefetch (0,) must be one or more numbers >= 1"),
        ({"batches_per_request": (2, 0)},
         "batches_per_request (2, 0) must be one or more numbers >= 1"),
        ({"batch_sizes": (256,), "transitions_per_shard": 200},
         "transitions_per_shard (200) must be >= 256"),
        ({"seconds": 0}, "seconds (0) must be > 0"),
    ],
)  # fmt: skip
def test_bad_feed_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchFeedConfig(**kwargs)
