"""Isolation: nsjail commands, jailed workers, outcomes. Knows nothing about HTTP."""

from __future__ import annotations

from .command import JailConfig, JailSpec, build_command
from .errors import JailError, JailUnavailable, WorkerError
from .limits import Limits
from .result import OUTCOMES, JailResult, LogEntry, Outcome, check_response
from .runner import JailRunner, choose_jail_dir
from .worker import Invocation, Worker

__all__ = [
    "OUTCOMES",
    "Invocation",
    "JailConfig",
    "JailError",
    "JailResult",
    "JailRunner",
    "JailSpec",
    "JailUnavailable",
    "Limits",
    "LogEntry",
    "Outcome",
    "Worker",
    "WorkerError",
    "build_command",
    "check_response",
    "choose_jail_dir",
]
