"""Reads docker-compose.yml the way `docker compose` does (interpolation, entrypoint + command)
so tests can run its services' commands as local processes."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $VAR and $$."""

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op = env.get(name), match["op"]
        if op == ":-":
            return value if value else match["arg"]
        if op == "-":
            return value if value is not None else match["arg"]
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {match['arg']}")
        return value or ""

    return _VARIABLE.sub(replace, text)


def _walk(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    return node


def load_compose(env: dict[str, str]) -> dict:
    """The compose file with every value interpolated from `env` (YAML anchors resolved)."""
    return _walk(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def image_entrypoint() -> list[str]:
    """ENTRYPOINT of deploy/Dockerfile's final stage (JSON form)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    return json.loads(lines[-1].split(None, 1)[1])


def service_argv(compose: dict, name: str) -> list[str]:
    """What the container runs: entrypoint (the service's, else the image's) + command."""
    service = compose["services"][name]
    command = service.get("command", [])
    assert isinstance(command, list), f"{name}: use the list form of command"
    if "entrypoint" in service:
        return [*service["entrypoint"], *command]
    if "build" in service:
        return [*image_entrypoint(), *command]
    return command  # an official image: the command is the program


def service_env(compose: dict, name: str) -> dict[str, str]:
    environment = compose["services"][name].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment if "=" in item)
    return {key: str(value) for key, value in environment.items()}
