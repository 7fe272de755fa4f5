"""The sandbox: an emulator of the OpenAI Files + Batches API on loopback HTTP.

`Emulator` is the world (no HTTP), `EmulatorServer` serves it with latency, faults
and a request log; `start_sandbox` and `serve` are what the CLI calls.
"""

from reconciler.sandbox.emulator import Emulator, EmulatorError, Timing
from reconciler.sandbox.server import EmulatorServer, Fault, LoggedRequest, serve, start_sandbox, timing_from_env

__all__ = ["Emulator", "EmulatorError", "EmulatorServer", "Fault", "LoggedRequest", "Timing", "serve",
           "start_sandbox", "timing_from_env"]
