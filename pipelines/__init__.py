"""The jobs users run: the `arcface` CLI, its config, and the pipeline entry points."""
