"""Engines: the engine over a communicator, its gradient backends, and the loop-over-modules
reference."""

from dsgd.engine.comm import Communicator, LocalCommunicator
from dsgd.engine.engine import Engine, StepResult

__all__ = ["Communicator", "Engine", "LocalCommunicator", "StepResult"]
