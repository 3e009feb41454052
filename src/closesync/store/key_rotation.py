"""Re-sealing stored grants under a new encryption key, and checking which key each one needs.

Used by `closesync keys rotate|check`. Apart from the connection store because it walks every
sealed value of every kind (connections' grants, organization credentials, waiting Close users'
grants), not one connection's.
"""

from __future__ import annotations

import redis

from closesync.core.errors import EncryptionError
from closesync.store.client import guard
from closesync.store.keys import Keys, as_text, watched
from closesync.store.secretbox import PLAIN_PREFIX, FernetBox


@guard("re-encrypting grants")
def sealed_keys(redis_client: redis.Redis, keys: Keys) -> list[str]:
    """Every key holding a sealed grant.

    Connections' grants, the shared organization credentials and the grants of Close users
    waiting for a Calendly match; an OAuth flow under way lives minutes and is left to expire.
    """
    sealed_keys = [keys.grants(as_text(m)) for m in redis_client.smembers(keys.connections())]
    sealed_keys += [
        keys.calendly_org_grant(as_text(m)) for m in redis_client.smembers(keys.calendly_orgs())
    ]
    sealed_keys += [
        keys.waiting_close_grant(as_text(f)) for f in redis_client.hkeys(keys.waiting_close())
    ]
    return sorted(sealed_keys)


@guard("re-encrypting stored grants")
def rotate_keys(redis_client: redis.Redis, keys: Keys, box: FernetBox) -> int:
    """Re-seal every stored grant under `box`'s first key; how many were re-sealed.

    A value no configured key opens is left as it is (and found by `check_keys`), so that
    one bad value does not stop the rotation of all the others.
    """
    count = 0
    for key in sealed_keys(redis_client, keys):

        def apply(pipe: redis.client.Pipeline, key: str = key) -> bool:
            sealed = pipe.get(key)
            if sealed is None:
                return False
            rotated = box.rotate(as_text(sealed))
            pipe.multi()
            pipe.set(key, rotated)
            return True

        try:
            if watched(redis_client, key, apply):
                count += 1
        except EncryptionError:
            continue
    return count


@guard("checking stored grants")
def check_keys(
    redis_client: redis.Redis, keys: Keys, box: FernetBox, first: FernetBox
) -> dict[str, int]:
    """How many sealed grants open with the first key alone, need an older key, are stored
    unencrypted (sandbox, before any key was set), or open with no configured key."""
    counts = {"current": 0, "older_key": 0, "unencrypted": 0, "unreadable": 0}
    for key in sealed_keys(redis_client, keys):
        sealed = redis_client.get(key)
        if sealed is None:
            continue
        if as_text(sealed).startswith(PLAIN_PREFIX):
            counts["unencrypted"] += 1
            continue
        for name, candidate in (("current", first), ("older_key", box)):
            try:
                candidate.open(as_text(sealed))
            except EncryptionError:
                continue
            counts[name] += 1
            break
        else:
            counts["unreadable"] += 1
    return counts
