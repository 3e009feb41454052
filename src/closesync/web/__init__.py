"""The web process: the pages through which users connect Close and Calendly, and /healthz.

A Flask app (`app.create_app`; one blueprint module per group of routes: `connect_pages`,
`health`), served by gunicorn in production (`production`, `timed_worker`) and by werkzeug's
threaded server in one process for tests and `closesync web --dev` (`serving`). `pages` holds
the HTML answers without Flask, for `closesync connect` too.

Must not import: `cli` or `worker`. The flows themselves live in `closesync.connect`.
"""
