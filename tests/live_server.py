"""A live uvicorn server on a free loopback port, for the tests that speak HTTP to a real socket."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 60.0) -> None:
    """Until GET url answers 200 (ConnectionError after `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise ConnectionError(f"nothing answered {url} within {seconds:.0f} s")


@contextlib.contextmanager
def live_server(app):
    """Run `app` (from create_app) and its worker on threads; yield its base URL."""
    import uvicorn

    url = f"http://127.0.0.1:{free_port()}"
    app.state.worker.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_up(f"{url}/health")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.worker.stop()
