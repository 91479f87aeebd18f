"""Fails on purpose: its traceback lands in the logs, the caller gets a 500."""

import logging

log = logging.getLogger("fail")


def handler(request, ctx):
    log.warning("about to fail", extra={"why": "on purpose"})
    raise RuntimeError("this function fails on purpose")
