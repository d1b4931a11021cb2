"""Fault injection for tests and drills: make a worker crash, hang, fail or slow down on purpose.

Given as `--fault SPEC` (comma-separated): `crash-on-token=ID` (exit at once when a new sequence's
tokens contain ID), `stall-on-token=ID` (hang in the step, heartbeats still flowing: a hung kernel),
`error-rate=P` (fail a step with probability P), `delay-ms=N` (sleep N ms per step).
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

from protocol.messages import Step, unpack_ints

log = logging.getLogger("nimbus.worker.faults")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Faults:
    crash_on_token: int | None = None
    stall_on_token: int | None = None
    error_rate: float = 0.0
    delay_ms: int = 0

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        if not spec:
            return cls()
        values: dict[str, int | float] = {}
        for item in spec.split(","):
            key, _, raw = item.partition("=")
            name = key.strip().replace("-", "_")
            if name not in cls.__dataclass_fields__:
                raise ValueError(f"unknown fault {key!r}; known: crash-on-token, stall-on-token, error-rate, delay-ms")
            values[name] = float(raw) if name == "error_rate" else int(raw)
        return cls(**values)  # type: ignore[arg-type]

    def before_step(self, step: Step) -> None:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        if self.error_rate and random.random() < self.error_rate:
            raise InjectedFault("injected step failure")
        for new in step.new_seqs:
            tokens = unpack_ints(new.token_ids)
            if self.crash_on_token is not None and self.crash_on_token in tokens:
                log.error("injected crash (token %d)", self.crash_on_token)
                os._exit(17)
            if self.stall_on_token is not None and self.stall_on_token in tokens:
                log.error("injected hang (token %d)", self.stall_on_token)
                while True:
                    time.sleep(3600)
