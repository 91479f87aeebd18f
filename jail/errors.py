"""Exceptions of the jail package.

JailError                 root; OSError never leaves jail/
├── JailUnavailable       nsjail cannot run here (self-check failed); says what is missing
└── WorkerError           one worker failed to start or broke its protocol
    └── WorkerGone        a warm worker became unusable before it took an invocation
"""

from __future__ import annotations


class JailError(Exception):
    """Root of every exception raised by jail/."""


class JailUnavailable(JailError):
    """The machine cannot run jails; the message names what is missing and how to fix it."""


class WorkerError(JailError):
    """A jailed worker failed to start or sent something outside the protocol."""


class WorkerGone(WorkerError):
    """A warm worker became unusable before the request was written (it
    retired, or its runtime died while idle): nothing of the invocation ran,
    so it may go to another worker."""
