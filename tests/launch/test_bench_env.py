"""`mario bench env` runs all three measurements and writes JSON (speed printed, not asserted)."""

import json

import pytest

from launch.cli import main


def test_bench_env_writes_all_rates(tmp_path, capsys):
    out = tmp_path / "env.json"
    main(["bench", "env", "--seconds", "0.5", "--cpu", "None", "--out", str(out)])
    result = json.loads(out.read_text())
    for key in (
        "raw_emulator_frames_per_s",
        "package_step_frames_per_s",
        "pipeline_agent_steps_per_s",
        "pipeline_frames_per_s",
        "pipeline_fraction_of_raw",
    ):
        assert result[key] > 0
    assert result["pipeline_frames_per_s"] > result["pipeline_agent_steps_per_s"]
    assert "wrapped pipeline" in capsys.readouterr().out


def test_unknown_command_names_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    assert "'fly'" in capsys.readouterr().err
