"""Start fastdecode's Ray Serve application (server/ray_serve.py) from `fastdecode serve --ray`: connect
to a Ray cluster (--ray-address) or start a local Ray instance, open Ray Serve's HTTP proxy on
--host:--port, deploy, and wait until Ctrl-C or SIGTERM, then take the application down.

An address is checked with a plain TCP connection first (5 s): Ray's own connect retries for a
minute or more before it gives up on a host that does not answer.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from urllib.parse import urlparse

from ..errors import FastDecodeError

TEARDOWN_S = 60
REPLICA_HEADER = "x-fastdecode-replica"  # each response names its replica; a request that sends it is pinned there


def find_replicas(url: str, count: int, tries: int = 200) -> list[str]:
    """The ids of up to `count` replicas behind `url`, read from the header of unpinned /ping
    requests (which Ray spreads over the replicas), within `tries` requests."""
    import urllib.request

    seen: set[str] = set()
    for _ in range(tries):
        with urllib.request.urlopen(f"{url}/ping", timeout=30) as response:
            seen.add(response.headers[REPLICA_HEADER])
        if len(seen) == count:
            break
    return sorted(seen)


def import_ray():
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise FastDecodeError("--ray needs Ray Serve: pip install 'fastdecode[ray]' (or pip install 'ray[serve]')") from None
    return ray


def check_reachable(address: str) -> None:
    """A host:port or ray://host:port address must accept a TCP connection ('auto' and 'local' are Ray's own)."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise FastDecodeError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise FastDecodeError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def connect(address: str | None, num_cpus: int | None = None):
    """ray.init on the cluster at `address`, or on a new local instance (num_cpus: its CPUs, default all)."""
    ray = import_ray()
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise FastDecodeError(f"cannot start on {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return ray


def deploy(config: dict, host: str, port: int, **build_options) -> None:
    """Ray Serve's proxy on host:port and the application on '/', returning once its replicas are up."""
    from ray import serve

    from .ray_serve import APP_NAME, build

    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(config, **build_options), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start (e.g. the model is missing on a node)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise FastDecodeError(f"the deployment failed: {lines[-1] if lines else exc}") from None


def serve_until_stopped(config: dict, host: str, port: int, address: str | None, **build_options) -> int:
    ray = connect(address)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deploy(config, host, port, **build_options)
        scale = build_options.get("autoscaling") or {}
        size = (f"{scale['min_replicas']} to {scale['max_replicas']} replicas (autoscaled)" if scale
                else f"{build_options.get('replicas', 1)} replica(s)")
        print(f"Serving {config['method']} on http://{host}:{port} through Ray Serve: {size} of "
              f"{config['model']}, {build_options.get('cpus_per_replica', 1)} CPU each. Ctrl-C stops.", file=sys.stderr)
        stop.wait()
        print("fastdecode: stopping the Ray Serve application...", file=sys.stderr)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        teardown = threading.Thread(target=_take_down, args=(ray, address), daemon=True)
        teardown.start()
        teardown.join(TEARDOWN_S)
        if teardown.is_alive():  # e.g. the signal reached Ray's own processes too and the instance is gone
            print(f"fastdecode: Ray did not stop within {TEARDOWN_S} s; exiting without it", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
    return 0


def _take_down(ray, address: str | None) -> None:
    """A local instance goes whole (running requests get Ray Serve's graceful shutdown); on a cluster,
    only this application."""
    from ray import serve

    if address is None:
        serve.shutdown()
        ray.shutdown()
    else:
        from .ray_serve import APP_NAME

        serve.delete(APP_NAME)


def run_from_cli(args, options: dict, origins: list[str] | None) -> int:
    """`fastdecode serve --ray`: the serve arguments (already checked by cli._serve) and the Ray ones."""
    from ..models.loader import model_source

    if args.replicas < 1 or args.cpus_per_replica < 1:
        raise FastDecodeError("--replicas and --cpus-per-replica take 1 or more")
    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None or args.target_ongoing_requests is not None:
        low = args.min_replicas if args.min_replicas is not None else 1
        high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas)
        target = args.target_ongoing_requests if args.target_ongoing_requests is not None else float(args.max_batch)
        if low < 0 or high < 1 or low > high or target <= 0:
            raise FastDecodeError("autoscaling takes 0 <= --min-replicas <= --max-replicas, --max-replicas 1 or more, "
                                  "--target-ongoing-requests more than 0")
        if not low <= args.replicas <= high:
            raise FastDecodeError(f"--replicas {args.replicas} (the start) must lie within --min-replicas {low} and "
                                  f"--max-replicas {high}")
        autoscaling = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}
    model_source(args.model)  # an unknown name or missing path fails here; each replica loads from its own node
    # serve.run re-checks the proxy's options against Ray's defaults, and warns that the port "differs" and
    # "is ignored" (it is not); Ray reads its defaults from these at import.
    os.environ.setdefault("RAY_SERVE_DEFAULT_HTTP_HOST", args.host)
    os.environ.setdefault("RAY_SERVE_DEFAULT_HTTP_PORT", str(args.port))
    import_ray()
    config = {"model": args.model, "dtype": args.dtype, "weights": args.weights, "threads": args.cpus_per_replica,
              "method": args.method, "options": options, "max_batch": args.max_batch, "max_queue": args.max_queue,
              "step_tokens": args.step_tokens, "kv_budget_bytes": args.kv_cache_mb << 20,
              "draft_model": args.draft_model, "served_model_name": args.served_model_name,
              "api_key": args.api_key if args.api_key is not None else (os.environ.get("FASTDECODE_API_KEY") or None),
              "allowed_origins": origins, "prefix_cache": args.prefix_caching}
    return serve_until_stopped(config, args.host, args.port, args.ray_address, replicas=args.replicas,
                               autoscaling=autoscaling, cpus_per_replica=args.cpus_per_replica)
