"""The daemon side of closesync: the Celery app and tasks, the scheduler, and enqueueing.

The sync itself is the engine's; this package only decides when it runs and what to do with a
run's report (retry now, later, or never).
"""
