"""Re-sealing stored grants under a new encryption key, and checking which key each one needs.

Used by `closesync keys rotate|check`. Apart from the connection store because it walks every
sealed value of every kind (connections' grants, organization credentials, waiting Close users'
grants, the signing keys of webhook subscriptions made with a personal access token), not one
connection's. Re-sealing keeps each value bound to its owner, and binds the
values sealed before owners were bound (`closesync.store.secretbox`).
"""

from __future__ import annotations

import redis

from closesync.core.errors import EncryptionError
from closesync.store.client import guard
from closesync.store.keys import Keys, Owner, as_text, watched
from closesync.store.secretbox import PLAIN_PREFIX, FernetBox


@guard("re-encrypting grants")
def sealed_keys(redis_client: redis.Redis, keys: Keys) -> list[tuple[str, str]]:
    """Every key holding a sealed grant, with the owner its value is sealed for.

    Connections' grants, the shared organization credentials, the grants of Close users
    waiting for a Calendly match and the webhook signing keys closesync generated (a
    subscription without one is signed by the OAuth application's key: its absent key is
    skipped like any empty one); an OAuth flow under way lives minutes and is left to expire.
    """
    found = [
        (keys.grants(conn_id), Owner.connection(conn_id))
        for conn_id in map(as_text, redis_client.smembers(keys.connections()))
    ]
    found += [
        (keys.calendly_org_grant(ref), Owner.organization(ref))
        for ref in map(as_text, redis_client.smembers(keys.calendly_orgs()))
    ]
    found += [
        (keys.waiting_close_grant(user), Owner.waiting_close_user(user))
        for user in map(as_text, redis_client.hkeys(keys.waiting_close()))
    ]
    found += [
        (keys.webhook_signing_key(key), Owner.webhook(key))
        for key in map(as_text, redis_client.smembers(keys.webhooks()))
    ]
    return sorted(found)


@guard("re-encrypting stored grants")
def rotate_keys(
    redis_client: redis.Redis, keys: Keys, box: FernetBox, *, seal_plaintext: bool = False
) -> int:
    """Re-seal every stored grant under `box`'s first key, bound to its owner; how many.

    A value no configured key opens, or one sealed for another owner, is left as it is (and
    found by `check_keys`), so that one bad value does not stop the rotation of all the others.
    So is an unencrypted one unless `seal_plaintext`: anyone who can write to Redis can write
    one, and sealing it would bind their tokens to the connection whose key it sits under.
    """
    count = 0
    for key, owner in sealed_keys(redis_client, keys):

        def apply(pipe: redis.client.Pipeline, key: str = key, owner: str = owner) -> bool:
            sealed = pipe.get(key)
            if sealed is None:
                return False
            rotated = box.rotate(as_text(sealed), owner=owner, seal_plaintext=seal_plaintext)
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
    unencrypted (before any key was set), or open with no configured key (or belong to another
    owner); and, of those that open, how many are not bound to their owner yet."""
    counts = {"current": 0, "older_key": 0, "unencrypted": 0, "unreadable": 0, "unbound": 0}
    for key, owner in sealed_keys(redis_client, keys):
        sealed = redis_client.get(key)
        if sealed is None:
            continue
        if as_text(sealed).startswith(PLAIN_PREFIX):
            counts["unencrypted"] += 1
            continue
        for name, candidate in (("current", first), ("older_key", box)):
            try:
                opened = candidate.unseal(as_text(sealed), owner=owner)
            except EncryptionError:
                continue
            counts[name] += 1
            counts["unbound"] += 0 if opened.bound else 1
            break
        else:
            counts["unreadable"] += 1
    return counts
