"""The sandbox: an emulator of the OpenAI Files + Batches API.

`Emulator` is the world (no HTTP). `EmulatorService` gives it HTTP behaviour (auth,
latency, faults, a request log) through one dispatch with two doors:
`EmulatorTransport` in this process (httpx) and `EmulatorServer` on loopback sockets.
`open_sandbox` is what `--sandbox` uses, `serve` what `batchplan sandbox serve` runs.
"""

from reconciler.sandbox.emulator import Emulator, EmulatorError, Timing, timing_from_env
from reconciler.sandbox.faults import Fault
from reconciler.sandbox.server import EmulatorServer, serve, start_sandbox
from reconciler.sandbox.service import EmulatorService, LoggedRequest
from reconciler.sandbox.transport import EmulatorTransport, open_sandbox

__all__ = ["Emulator", "EmulatorError", "EmulatorServer", "EmulatorService", "EmulatorTransport", "Fault",
           "LoggedRequest", "Timing", "open_sandbox", "serve", "start_sandbox", "timing_from_env"]
