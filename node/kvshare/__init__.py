"""KV caches shared between nodes.

- `prefix`: the bounded local store of prefilled caches (LRU by bytes) and block-aligned prefix keys (pure).
- `plan`: measured rates and the fetch-or-compute decision (pure).
- `protocol`: the `kv.prefix` RPC method, its messages and the fetching side (trio).
- `settings`: what the sharing may hold, announce and fetch (the daemon's `kv_*` config keys).
- `service`: the node's prefill that looks for a peer's prefix first, stores and announces what it computed.
"""
