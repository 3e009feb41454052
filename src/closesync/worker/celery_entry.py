"""The Celery app for Celery's own command line: `celery -A closesync.worker.celery_entry …`.

Flower, `celery events` and `celery inspect` need the app closesync's workers run, not a bare
broker URL: the queues, events and control messages live under closesync's key prefix
(`global_keyprefix` in `closesync.worker.celery_app`), which a tool started with `--broker`
alone would not see. `celery -A` imports a module and takes its `app`, so this one module builds
it from the environment at import (REDIS_URL, REDIS_PREFIX, CELERY_TASK_EVENTS, …): nothing of
closesync imports it.

    pip install flower
    CELERY_TASK_EVENTS=true closesync worker          # the workers send task events
    celery -A closesync.worker.celery_entry flower --port=5555
"""

from __future__ import annotations

from closesync.settings import load_settings
from closesync.worker.celery_app import create_app

app = create_app(load_settings())
