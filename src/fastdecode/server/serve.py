"""Run the app: the model's loop on the main thread, the web server on a thread beside it.

SIGTERM or Ctrl-C drains: new requests get 503 with Retry-After, /health (readiness) answers 503
while /health/live and /ping stay 200, running and queued ones finish, then the web server closes
and the process exits 0. A second signal stops at once.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

import uvicorn

from ..errors import FastDecodeError


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    worker = app.state.worker
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    web = threading.Thread(target=server.run, name="fastdecode-http", daemon=True)
    web.start()
    while not server.started:
        if not web.is_alive():
            raise FastDecodeError(f"could not serve on {host}:{port} (see the message above)")
        time.sleep(0.05)

    def on_signal(signum, _frame):
        if worker.draining:
            worker.stop()
            return
        print(f"fastdecode: {signal.Signals(signum).name}: finishing {worker.active} request(s), "
              "refusing new ones; send it again to stop now", file=sys.stderr)
        worker.drain()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.should_exit = True
        web.join(timeout=10)
