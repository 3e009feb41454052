"""The web process: the pages through which users connect Close and Calendly, and /healthz.

Must not import: `cli` or `worker`. The flows themselves live in `closesync.connect`.
"""
