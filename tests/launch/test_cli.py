"""The `mario` command line: help lists every command, an unknown one suggests the nearest."""

import pytest

from launch.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for words, command in COMMANDS.items():
        assert f"{' '.join(words):<16} {command.help}" in out


def test_bench_help_lists_the_benches(capsys):
    main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "usage: mario bench COMMAND" in out
    for name in ("env", "replay", "actor", "learner", "system"):
        assert f"bench {name}" in out
    assert "  train " not in out


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["trian"], "did you mean 'mario train'?"),
        (["bench", "replya"], "did you mean 'mario bench replay'?"),
        (["bnech", "--help"], "did you mean 'mario bench'?"),
        (["status-all"], "did you mean 'mario status'?"),
    ],
)
def test_an_unknown_command_suggests_the_nearest(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert suggestion in capsys.readouterr().err


def test_no_command_prints_usage_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "commands:" in capsys.readouterr().out
