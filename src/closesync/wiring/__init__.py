"""The process's wiring: building the parts from the settings, logging, Sentry.

`services` builds Redis, the stores, the API clients and the engine once per process, the same
way for a CLI command, a Celery worker and the web process; `logs` configures structured,
redacted logging; `observability` starts Sentry with the same scrubbing.

Must not import: the shells (`cli`, `worker`, `web`). Decides nothing about a sync.
"""
