"""Run the fake provider as its own process.

Usage: ``python -m tests.fakeprovider [--host H] [--port N]``. Prints the base
URL on one line once it accepts connections, then serves until SIGTERM or
SIGINT. Requests are not recorded: nobody could read them, and a benchmark
must not grow memory with every request.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from tests.fakeprovider.server import serve


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakeprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    return parser.parse_args(argv)


async def _amain(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # flush: the parent reads this line through a pipe to learn the port.
    await serve(host, port, ready=lambda url: print(url, flush=True), stop=stop)


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``python -m tests.fakeprovider``."""
    args = _parse_args(argv)
    asyncio.run(_amain(args.host, args.port))


if __name__ == "__main__":
    main()
