"""Shared experiment code for the project's scripts: data, CLI, training loop, run output."""
