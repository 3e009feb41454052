"""Everything closesync keeps in Redis, and the one way it opens Redis.

Holds the key layout (`keys`, whose docstring lists every key), opening Redis and turning its
errors into StoreUnavailable (`client`), a Redis server of our own when there is none
(`embedded`), connections and their sealed grants (`connections`), per-connection sync state
(`sync_state`), expiring locks (`locks`), encryption at rest (`secretbox`) and re-sealing under
a new key (`key_rotation`).

Must not import: `apis`, `sync`, `connect`, `wiring` or the shells.
"""
