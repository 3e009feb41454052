"""Sealing secrets (the OAuth grants) before they reach Redis, and opening them again.

A stolen Redis dump or a `MONITOR` session must not yield a usable token, so the store only ever
writes what a `SecretBox` sealed. `FernetBox` is the real one (decisions.md: the first key of
`CLOSESYNC_ENCRYPTION_KEYS` encrypts, all of them decrypt, so keys can rotate). `PlainBox` exists
only for the sandbox demo, which must run without any setup: what it seals carries a `plain:`
prefix so that a FernetBox refuses it loudly instead of mistaking it for a bad token, and so that
`rotate` can encrypt it later.

No message raised here ever contains a key or a secret; a bad key is named by its position.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from closesync.core.errors import ConfigError, EncryptionError
from closesync.settings import Settings

PLAIN_PREFIX = "plain:"

_NO_KEY_HELP = (
    "CLOSESYNC_ENCRYPTION_KEYS is not set: stored OAuth tokens are encrypted with it. "
    "Run `closesync keys generate` and set CLOSESYNC_ENCRYPTION_KEYS to the key it prints"
)


class SecretBox(Protocol):
    """Turns secret bytes into a string safe to store, and back."""

    def seal(self, plaintext: bytes) -> str: ...

    def open(self, sealed: str) -> bytes: ...


def generate_key() -> str:
    """A new Fernet key (url-safe base64 of 32 random bytes)."""
    return Fernet.generate_key().decode("ascii")


class FernetBox:
    """Fernet with key rotation: `keys[0]` encrypts, every key decrypts."""

    def __init__(self, keys: list[str]) -> None:
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

    def seal(self, plaintext: bytes) -> str:
        return self._fernet.encrypt(plaintext).decode("ascii")

    def open(self, sealed: str) -> bytes:
        if sealed.startswith(PLAIN_PREFIX):
            raise EncryptionError(
                "this secret was stored unencrypted by the sandbox (PlainBox); run "
                "`closesync keys rotate` with CLOSESYNC_ENCRYPTION_KEYS set to encrypt it"
            )
        try:
            return self._fernet.decrypt(sealed.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise EncryptionError(
                f"none of the {self.key_count} keys in CLOSESYNC_ENCRYPTION_KEYS can decrypt this "
                "secret: was the key that sealed it removed from the list?"
            ) from None

    def rotate(self, sealed: str) -> str:
        """`sealed` re-encrypted under the first key; a PlainBox secret is encrypted."""
        if sealed.startswith(PLAIN_PREFIX):
            return self.seal(PlainBox().open(sealed))
        try:
            return self._fernet.rotate(sealed.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeEncodeError):
            raise EncryptionError(
                f"none of the {self.key_count} keys in CLOSESYNC_ENCRYPTION_KEYS can decrypt this "
                "secret, so it cannot be re-encrypted: was its key removed from the list?"
            ) from None


class PlainBox:
    """No encryption: the sandbox demo only. Sealed strings are `plain:` + base64."""

    def seal(self, plaintext: bytes) -> str:
        return PLAIN_PREFIX + base64.b64encode(plaintext).decode("ascii")

    def open(self, sealed: str) -> bytes:
        if not sealed.startswith(PLAIN_PREFIX):
            raise EncryptionError(
                "this secret is encrypted; set CLOSESYNC_ENCRYPTION_KEYS to the key that sealed it"
            )
        try:
            return base64.b64decode(sealed[len(PLAIN_PREFIX) :], validate=True)
        except binascii.Error:
            raise EncryptionError("this unencrypted secret is corrupt (not base64)") from None


def box_from_settings(settings: Settings, allow_plain: bool) -> SecretBox:
    """FernetBox from CLOSESYNC_ENCRYPTION_KEYS; PlainBox when none is set and `allow_plain`."""
    keys = settings.encryption_keys()
    if keys:
        return FernetBox(keys)
    if allow_plain:
        return PlainBox()
    raise ConfigError(_NO_KEY_HELP)
