"""`batchplan sandbox`: the emulator's own commands (`serve`). Parses the options; the emulator is sandbox/.

Nothing of sandbox/ is imported until a command runs: `batchplan --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from .options import Group, debug_option


@click.group("sandbox", cls=Group)
def sandbox_group() -> None:
    """The embedded Files + Batches API emulator."""


@sandbox_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8089, show_default=True, type=int, help="Port to listen on.")
@click.option("--dir", "world", type=click.Path(file_okay=False), help="Keep the world on disk here.")
@click.option("--step-seconds", type=click.FloatRange(0), default=None,
              help="Seconds per lifecycle step (validating, in_progress, finalizing) [default: 2/3/1].")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests that fail into the error file.")
@click.option("--latency", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds added to every request.")
@click.option("--no-auth", is_flag=True, help="Accept requests without an API key.")
@click.option("--enqueued-token-limit", "limits", multiple=True, metavar="MODEL=TOKENS",
              help="Fail a batch of MODEL with token_limit_exceeded when its input tokens would take the model's "
                   "batches in progress over TOKENS, as the API does (repeatable) [default: BATCHPLAN_SANDBOX_LIMITS].")
@click.option("--auth", type=click.Choice(["bearer", "api-key"]), default="bearer", show_default=True,
              help="The header the key must come in: Authorization: Bearer KEY (OpenAI), or api-key: KEY "
                   "(Azure OpenAI).")
@click.option("--prefix", default="/v1", show_default=True, metavar="PATH",
              help="Where the API is served, e.g. /openai/v1 as Azure OpenAI serves it.")
@debug_option
def sandbox_serve(host, port, world, step_seconds, fail_rate, latency, no_auth, limits, auth, prefix) -> None:
    """Serve the emulator over HTTP at http://HOST:PORT/v1 (or --prefix) until Ctrl-C."""
    from .sandbox import Timing, serve
    from .sandbox.capacity import parse_limits

    if not prefix.startswith("/") or prefix.rstrip("/") in ("", "/_sandbox"):
        raise click.BadParameter("give a path such as /v1 or /openai/v1", param_hint="--prefix")
    timing = Timing.uniform(step_seconds) if step_seconds is not None else Timing()
    serve(host=host, port=port, root=Path(world) if world else None, timing=timing, fail_rate=fail_rate,
          latency=latency, require_auth=not no_auth, auth=auth, prefix=prefix.rstrip("/"),
          enqueued_token_limits=parse_limits(limits, "--enqueued-token-limit") if limits else None)
