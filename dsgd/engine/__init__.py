"""Engines: the D-SGD/C-SGD engine over a communicator, and the loop-over-modules reference."""

from dsgd.engine.comm import Communicator, LocalCommunicator
from dsgd.engine.engine import Engine, StepResult

__all__ = ["Communicator", "Engine", "LocalCommunicator", "StepResult"]
