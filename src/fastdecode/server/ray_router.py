"""Which replica serves a request under `fastdecode serve --ray`: prefix affinity, with a load fallback.

Each replica keeps its own prefix cache (KV blocks of prompts it has read), so a request gains only
where a replica that already read its prefix serves it. The rule:

- The affinity key of a chat request is its opening: every message up to and including the first
  user message (the system prompt and the first question). All turns of one conversation share it,
  since each turn resends the whole history; a shared system prompt with different first questions
  spreads over the replicas (each replica then reads that system prompt once, and caches it).
  A text completion's key is the first 1,024 characters of its prompt (or its first 256 token ids).
  Keys are cut to 4,096 characters of canonical JSON and hashed (SHA-1).
- The key picks a replica by rendezvous hashing: each replica scores hash(key, replica id) and the
  highest wins. Adding or losing a replica moves only the keys that replica wins or won.
- Load fallback: when the chosen replica's queue (Ray's cached count of its ongoing requests) is
  `imbalance` or more above the least-loaded replica's, or full, the request goes to the least
  loaded instead. A request with no key (GET /metrics, a body that is not JSON) goes to the less
  loaded of two random replicas, Ray's default.
- A request may pin a replica with the header X-Fastdecode-Replica: ID (the ID each response
  carries in that header), to read that replica's /metrics or /health; a pin naming no live replica
  is routed as if absent.
"""
from __future__ import annotations

import hashlib
import json
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

KEY_CHARS = 4096
PROMPT_CHARS = 1024
PROMPT_IDS = 256


def affinity_key(path: str, body: bytes) -> str | None:
    """The request's affinity key (see the module's docstring), or None. Never raises: the replica,
    not the router, answers a malformed body with its 400."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if path.endswith("/chat/completions") and isinstance(data.get("messages"), list):
        opening = []
        for message in data["messages"]:
            opening.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        head = json.dumps(opening, sort_keys=True, ensure_ascii=False)
    elif path.endswith("/completions") and isinstance(data.get("prompt"), (str, list)):
        prompt = data["prompt"]
        head = prompt[:PROMPT_CHARS] if isinstance(prompt, str) else json.dumps(prompt[:PROMPT_IDS])
    else:
        return None
    return hashlib.sha1(head[:KEY_CHARS].encode("utf-8", "surrogatepass")).hexdigest()


def rendezvous(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids best first for this key: highest hash(key, id) wins."""
    score = lambda rid: hashlib.sha1(f"{key}|{rid}".encode()).digest()  # noqa: E731
    return sorted(replica_ids, key=score, reverse=True)


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router of the model replicas; the front deployment passes the key and pin as
    the keyword arguments `affinity` and `replica` of its call."""

    def initialize_state(self, imbalance: int = 4, **kwargs):
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pinned = by_id.get(kwargs.get("replica") or "")
        if pinned is not None:
            return [[pinned]]
        key = kwargs.get("affinity")
        if not key:
            return [random.sample(candidate_replicas, k=min(2, len(candidate_replicas)))]
        ranked = [by_id[rid] for rid in rendezvous(key, list(by_id))]
        preferred, others = ranked[0], ranked[1:]
        loads = {r.replica_id.unique_id: self.replica_queue_len_cache.get(r.replica_id) for r in ranked}
        known = [n for n in loads.values() if n is not None]
        mine = loads[preferred.replica_id.unique_id]
        if mine is not None and others and (mine >= preferred.max_ongoing_requests or mine - min(known) >= self.imbalance):
            least = sorted(others, key=lambda r: loads[r.replica_id.unique_id] if loads[r.replica_id.unique_id] is not None else 0)
            return [least, [preferred]]
        return [[preferred], others] if others else [[preferred]]
