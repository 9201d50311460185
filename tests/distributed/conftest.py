"""The tiny model folder and task shared by the distributed, fault and hardening tests."""

from tests.faults.tiny_run import assets  # noqa: F401  (a session fixture)
