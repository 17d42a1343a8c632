"""`mario bench learner` measures every asked configuration and writes them as JSON."""

import json

import pytest

from launch.bench.learner import BenchLearnerConfig
from launch.cli import main


def test_bench_learner_writes_one_row_per_configuration(tmp_path, capsys):
    out = tmp_path / "learner.json"
    main(["bench", "learner", "--batch-sizes", "8", "16", "--threads", "1", "--variants",
          "plain", "channels-last", "cuda-graph", "advantage-learning", "ema", "--seconds", "0.2",
          "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    measured = {(r["batch_size"], r["variant"]) for r in rows if r["device"] == "cpu"}
    # cuda-graph needs a CUDA device: left out on the CPU
    assert measured == {
        (b, v) for b in (8, 16) for v in ("plain", "channels-last", "advantage-learning", "ema")
    }
    assert not any(r["cuda_graph"] for r in rows if r["device"] == "cpu")
    for row in rows:
        assert row["updates_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["updates_per_s"] * row["batch_size"])
    assert "updates/s" in capsys.readouterr().out


def test_an_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"variants \['fp8'\] are unknown"):
        BenchLearnerConfig(variants=("plain", "fp8"))
