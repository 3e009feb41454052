"""The pure core: what a sync decides, with no I/O.

Holds the vendor payload types (`calendly_payloads`, `close_payloads`), the connection record
(`connection`), the mapping of event types to links (`mapping`), the plan of writes and deletes
(`plan`), run reports (`report`), retry and wait arithmetic (`retry`), rate-limit header parsing
(`ratelimits`) and the error tree (`errors`). Time comes in as an argument.

Must not import: any other part of closesync, nor requests, redis, celery, kombu, apscheduler,
sentry_sdk, socket, subprocess or http (the import-linter contracts in pyproject.toml check it).
"""
