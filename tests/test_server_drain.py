"""`fastdecode serve` as a user runs it: SIGTERM lets the running request finish, refuses new ones
with 503 (and /health with 503, while /health/live answers 200), and the process exits 0."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

try:
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow


def test_sigterm_drains_running_requests_then_exits(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "fastdecode.cli", "serve", "--port", str(port), "--method", "ar"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": "smollm2-135m-instruct", "max_tokens": 160, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Write a long essay on the history of Rome."}],
                "stream_options": {"include_usage": True}}
        events, first = [], threading.Event()

        def read_stream():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        first.set()

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first.wait(60)
        server.send_signal(signal.SIGTERM)
        at_signal = len(events)
        time.sleep(0.3)
        refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        ready, live = httpx.get(f"{url}/health"), httpx.get(f"{url}/health/live")
        reader.join(60)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert ready.status_code == 503 and ready.json()["status"] == "draining"  # readiness: take it out of rotation
    assert live.status_code == 200  # liveness: the process still serves
    assert events[-1] == "[DONE]"  # the running request was not cut off...
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"  # ...it ran to max_tokens
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 160 and len(events) > at_signal + 10
    assert "finishing 1 request(s)" in Path(tmp_path / "server.log").read_text()
