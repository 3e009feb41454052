"""The sync of one connection: the engine that joins the APIs, the store and the core.

`engine` runs a connection (lock, outcome, report, state); `run` holds a run's steps in order
(list, map, plan, write, record); `parts` the types both share, so neither imports the other.

Must not import: `connect`, `wiring` or the shells. It decides nothing itself: the decisions are
the core's `mapping` and `plan`.
"""
