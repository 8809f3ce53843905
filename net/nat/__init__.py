"""NAT traversal: AutoNAT reachability, circuit relay v2 reservations and service, DCUtR hole punching.

The policy (votes, renewal schedules, limits, retry backoff, connection kinds)
lives in pure modules; `service.NatService` is the thin trio layer over py-libp2p.
"""
