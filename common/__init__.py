"""Shared pieces: config, Mario env pipeline, networks, CLI, the tutorial grid world."""
