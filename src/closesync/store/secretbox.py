"""Sealing secrets (the OAuth grants) before they reach Redis, and opening them again.

A stolen Redis dump or a `MONITOR` session must not yield a usable token, so the store only ever
writes what a `SecretBox` sealed. `FernetBox` is the real one (decisions.md: the first key of
`CLOSESYNC_ENCRYPTION_KEYS` encrypts, all of them decrypt, so keys can rotate). Without a key,
`NoKeyBox` refuses every seal and open, naming the setting, so commands that decrypt nothing
(`status`, `connections list`) still work. `PlainBox` stores in the clear only on the explicit
choice CLOSESYNC_ALLOW_PLAINTEXT_TOKENS=true (decisions.md: never inferred from where the API URLs
point), warned each time it is chosen: what it seals carries a `plain:` prefix so that a FernetBox
refuses it loudly instead of mistaking it for a bad token. `rotate` encrypts such a value only when
asked to (`closesync keys rotate --seal-plaintext`): anyone who can write to Redis can write a
`plain:` value, and sealing it would make their tokens the connection's own.

Every sealed value is bound to its owner (the connection, organization, waiting Close user or
OAuth flow it belongs to, `closesync.store.keys.Owner`): what is encrypted is an envelope
`{"sealed_for": owner, "secret": base64}`, and `open` with another owner fails loudly. So whoever
can write to Redis, but holds no key, cannot move one connection's grants under another's key
and have that connection's runs use them. A value sealed before this binding existed (its
plaintext is the secret itself) still opens, reported "unbound" by `closesync keys check`;
`closesync keys rotate` re-seals it bound to the key it sits under, whichever that is: a copy
moved there before the rotation gets bound there too. So once every value is bound, set
CLOSESYNC_REQUIRE_BOUND_GRANTS=true (`require_bound`): an unbound value then neither opens nor
rotates.

No message raised here ever contains a key or a secret; a bad key is named by its position.

A run opens its connection's sealed grants several times (the Calendly user check, the shared
grant's name, each side's token keeper), and decrypting is most of what opening costs: a
`FernetBox` keeps what it decrypted for a short while (DECRYPTED_TTL_SECONDS, at most
DECRYPTED_KEPT values, in this process's memory only), keyed by the SHA-256 of the sealed value.
A value sealed anew (a refresh, a reconnect, a rotation) has another digest, so nothing stale is
ever opened; the binding to the owner is checked on every open, cached or not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from cachetools import TTLCache
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from closesync.core.errors import ConfigError, EncryptionError
from closesync.settings import Settings

log = logging.getLogger(__name__)

PLAIN_PREFIX = "plain:"
# Decrypted values a FernetBox keeps, and for how many seconds: long enough for the opens of one
# run (a second or two), short enough that a token does not linger in memory; enough of them
# for the runs a worker process makes at once, each opening a few values.
DECRYPTED_TTL_SECONDS = 30.0
DECRYPTED_KEPT = 1024

_NO_KEY_HELP = (
    "CLOSESYNC_ENCRYPTION_KEYS is not set: stored OAuth tokens are encrypted with it. "
    "Run `closesync keys generate` and set CLOSESYNC_ENCRYPTION_KEYS to the key it prints "
    "(only a throwaway setup may set CLOSESYNC_ALLOW_PLAINTEXT_TOKENS=true instead)"
)
_PLAINTEXT_WARNING = (
    "CLOSESYNC_ALLOW_PLAINTEXT_TOKENS=true and CLOSESYNC_ENCRYPTION_KEYS is not set: OAuth "
    "tokens are stored unencrypted in Redis; set a key (`closesync keys generate`) and run "
    "`closesync keys rotate --seal-plaintext` to encrypt them"
)


class SecretBox(Protocol):
    """Turns secret bytes into a string safe to store, bound to `owner`, and back."""

    def seal(self, plaintext: bytes, *, owner: str) -> str: ...

    def open(self, sealed: str, *, owner: str) -> bytes: ...


_FOR = "sealed_for"
_SECRET = "secret"


@dataclass(frozen=True)
class Opened:
    """An opened secret; `bound` False: sealed before values were bound to an owner."""

    plaintext: bytes
    bound: bool


def _bind(plaintext: bytes, owner: str) -> bytes:
    """The envelope that is encrypted: the secret and the owner it is sealed for."""
    return json.dumps({_FOR: owner, _SECRET: base64.b64encode(plaintext).decode("ascii")}).encode()


def _unbind(data: bytes, owner: str) -> Opened:
    """The secret in a decrypted envelope, refused unless it was sealed for `owner`.

    Decrypted data that is no envelope was sealed before the binding (every secret closesync
    seals is a JSON object of other fields): it opens, unbound.
    """
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return Opened(data, bound=False)
    if not (isinstance(value, dict) and set(value) == {_FOR, _SECRET}):
        return Opened(data, bound=False)
    if value[_FOR] != owner:
        raise EncryptionError(
            f"this secret was sealed for another owner ({value[_FOR]}), not for {owner}: it was "
            "copied here from elsewhere in Redis, so it is refused; connect again to replace it"
        )
    try:
        return Opened(base64.b64decode(str(value[_SECRET]), validate=True), bound=True)
    except binascii.Error:
        raise EncryptionError(f"the secret sealed for {owner} is corrupt (not base64)") from None


def generate_key() -> str:
    """A new Fernet key (url-safe base64 of 32 random bytes)."""
    return Fernet.generate_key().decode("ascii")


class FernetBox:
    """Fernet with key rotation: `keys[0]` encrypts, every key decrypts."""

    def __init__(self, keys: list[str], *, require_bound: bool = False) -> None:
        if not keys:
            raise ConfigError(_NO_KEY_HELP)
        fernets: list[Fernet] = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                # `from None`: the chained error's frame would hold the key's value.
                raise ConfigError(
                    f"key {position} of {len(keys)} in CLOSESYNC_ENCRYPTION_KEYS is not a Fernet "
                    "key (32 url-safe base64-encoded bytes); `closesync keys generate` makes one"
                ) from None
        self._fernet = MultiFernet(fernets)
        self.key_count = len(fernets)
        # SHA-256 of a sealed value -> its decryption (see the module docstring).
        self._decrypted: TTLCache[bytes, bytes] = TTLCache(DECRYPTED_KEPT, DECRYPTED_TTL_SECONDS)
        self._decrypted_lock = threading.Lock()
        # CLOSESYNC_REQUIRE_BOUND_GRANTS: refuse values sealed before the binding (see above).
        self.require_bound = require_bound

    def seal(self, plaintext: bytes, *, owner: str) -> str:
        return self._fernet.encrypt(_bind(plaintext, owner)).decode("ascii")

    def open(self, sealed: str, *, owner: str) -> bytes:
        return self.unseal(sealed, owner=owner).plaintext

    def unseal(self, sealed: str, *, owner: str) -> Opened:
        """`open`, also saying whether the value was bound to its owner already."""
        if sealed.startswith(PLAIN_PREFIX):
            # Not "run keys rotate": whoever can write to Redis can write such a value, and
            # sealing it would hand them the connection. `keys check` explains the choice.
            raise EncryptionError(
                "this secret is stored unencrypted (CLOSESYNC_ALLOW_PLAINTEXT_TOKENS), which "
                "closesync refuses once a key is set: anyone who can write to Redis could have "
                "put it there; connect again to replace it (`closesync keys check` counts them)"
            )
        opened = _unbind(self._decrypt(sealed), owner)
        if self.require_bound and not opened.bound:
            raise EncryptionError(
                "this secret was sealed before secrets were bound to their owner, and "
                "CLOSESYNC_REQUIRE_BOUND_GRANTS=true refuses such values (a copy of another "
                "connection's would look the same); connect again to replace it"
            )
        return opened

    def _decrypt(self, sealed: str) -> bytes:
        """The plaintext of a Fernet token, decrypted once per DECRYPTED_TTL_SECONDS."""
        try:
            token = sealed.encode("ascii")
        except UnicodeEncodeError:
            raise self._undecryptable() from None
        digest = hashlib.sha256(token).digest()
        with self._decrypted_lock:
            data = self._decrypted.get(digest)
        if data is not None:
            return data
        try:
            data = self._fernet.decrypt(token)
        except InvalidToken:
            raise self._undecryptable() from None
        with self._decrypted_lock:
            self._decrypted[digest] = data
        return data

    def _undecryptable(self) -> EncryptionError:
        return EncryptionError(
            f"none of the {self.key_count} keys in CLOSESYNC_ENCRYPTION_KEYS can decrypt this "
            "secret: was the key that sealed it removed from the list?"
        )

    def rotate(self, sealed: str, *, owner: str, seal_plaintext: bool = False) -> str:
        """`sealed` re-sealed under the first key, bound to `owner`.

        A value sealed before the binding gets bound; one sealed for another owner raises
        EncryptionError (it is not re-sealed as if it were ours). A PlainBox secret is
        encrypted only with `seal_plaintext` (the operator's explicit choice), else refused.
        """
        if sealed.startswith(PLAIN_PREFIX):
            if not seal_plaintext:
                raise EncryptionError(
                    "an unencrypted secret is left as it is: `closesync keys rotate "
                    "--seal-plaintext` encrypts it"
                )
            return self.seal(PlainBox().open(sealed, owner=owner), owner=owner)
        return self.seal(self.open(sealed, owner=owner), owner=owner)


class PlainBox:
    """No encryption, on explicit choice only. Sealed strings are `plain:` + base64."""

    def seal(self, plaintext: bytes, *, owner: str) -> str:
        # Bound like a FernetBox value: no defence against a Redis writer here (they can write
        # any plaintext), but a value moved by mistake still fails loudly.
        return PLAIN_PREFIX + base64.b64encode(_bind(plaintext, owner)).decode("ascii")

    def open(self, sealed: str, *, owner: str) -> bytes:
        if not sealed.startswith(PLAIN_PREFIX):
            raise EncryptionError(
                "this secret is encrypted; set CLOSESYNC_ENCRYPTION_KEYS to the key that sealed it"
            )
        try:
            data = base64.b64decode(sealed[len(PLAIN_PREFIX) :], validate=True)
        except binascii.Error:
            raise EncryptionError("this unencrypted secret is corrupt (not base64)") from None
        return _unbind(data, owner).plaintext


class NoKeyBox:
    """No key and no plaintext allowance: every seal and open fails, naming the setting.

    Handed out instead of raising at startup, so that what reads only public records works.
    """

    def seal(self, plaintext: bytes, *, owner: str) -> str:
        raise ConfigError(_NO_KEY_HELP)

    def open(self, sealed: str, *, owner: str) -> bytes:
        raise ConfigError(_NO_KEY_HELP)


def box_from_settings(settings: Settings) -> SecretBox:
    """FernetBox from CLOSESYNC_ENCRYPTION_KEYS; else PlainBox when CLOSESYNC_ALLOW_PLAINTEXT_TOKENS
    is true (with a warning, every time); else NoKeyBox. Where the API URLs point plays no part."""
    keys = settings.encryption_keys()
    if keys:
        return FernetBox(keys, require_bound=settings.closesync_require_bound_grants)
    if settings.closesync_allow_plaintext_tokens:
        log.warning(_PLAINTEXT_WARNING)
        return PlainBox()
    return NoKeyBox()


def require_key(box: SecretBox) -> None:
    """ConfigError naming CLOSESYNC_ENCRYPTION_KEYS unless `box` can store tokens.

    Checked at the start of whatever will store or use a token (the web process, the worker,
    `connect`, `connections add`, an inline sync), so it fails before doing anything else.
    """
    if isinstance(box, NoKeyBox):
        raise ConfigError(_NO_KEY_HELP)
