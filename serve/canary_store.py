"""Where the canary's state lives: Ray's GCS key-value store, which outlives any router
replica (and, with GCS fault tolerance, the head node), and is shared by every router
replica so followers see the leader's decisions."""
from __future__ import annotations

import json

NAMESPACE = "sinkserve"


class GcsStore:
    def load(self, key: str) -> dict | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(key, namespace=NAMESPACE)
        return json.loads(raw) if raw else None

    def save(self, key: str, state: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, json.dumps(state), overwrite=True, namespace=NAMESPACE)

    def delete(self, key: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=NAMESPACE)
