"""SecretBox: Fernet with rotation, the sandbox's PlainBox, and the settings that choose one."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from closesync.core.errors import ConfigError, EncryptionError
from closesync.settings import Settings
from closesync.store.secretbox import (
    FernetBox,
    PlainBox,
    box_from_settings,
    generate_key,
    require_key,
)

KEY_A = generate_key()
KEY_B = generate_key()


@given(st.binary())
def test_fernetbox_any_bytes_round_trip(plaintext: bytes) -> None:
    """What a FernetBox seals it opens again, byte for byte."""
    box = FernetBox([KEY_A])
    assert box.open(box.seal(plaintext)) == plaintext


def test_fernetbox_sealed_text_does_not_contain_plaintext() -> None:
    """The sealed string does not show the secret."""
    assert "tok_secret" not in FernetBox([KEY_A]).seal(b"tok_secret")


def test_fernetbox_old_key_listed_second_still_decrypts() -> None:
    """After rotation to a new first key, secrets sealed under the old one still open."""
    old = FernetBox([KEY_A]).seal(b"x")
    assert FernetBox([KEY_B, KEY_A]).open(old) == b"x"


def test_fernetbox_rotate_reseals_under_first_key() -> None:
    """A rotated secret opens with the first key alone."""
    old = FernetBox([KEY_A]).seal(b"x")
    rotated = FernetBox([KEY_B, KEY_A]).rotate(old)
    assert FernetBox([KEY_B]).open(rotated) == b"x"


def test_fernetbox_unknown_key_raises_encryption_error() -> None:
    """A secret sealed under a key no longer listed fails with a clear EncryptionError."""
    sealed = FernetBox([KEY_A]).seal(b"x")
    with pytest.raises(EncryptionError, match="none of the 1 keys"):
        FernetBox([KEY_B]).open(sealed)


def test_fernetbox_plain_secret_refused_loudly() -> None:
    """A PlainBox secret is refused with a message naming the plaintext allowance and the fix."""
    with pytest.raises(EncryptionError, match=r"unencrypted \(CLOSESYNC_ALLOW_PLAINTEXT_TOKENS"):
        FernetBox([KEY_A]).open(PlainBox().seal(b"x"))


def test_fernetbox_rotate_plain_secret_encrypts_it() -> None:
    """Rotation upgrades a PlainBox secret to an encrypted one."""
    rotated = FernetBox([KEY_A]).rotate(PlainBox().seal(b"x"))
    assert not rotated.startswith("plain:")
    assert FernetBox([KEY_A]).open(rotated) == b"x"


def test_fernetbox_invalid_key_names_position_not_value() -> None:
    """A bad key is named by its position; its value never appears in the message."""
    with pytest.raises(ConfigError, match="key 2 of 2") as raised:
        FernetBox([KEY_A, "not-a-key-zzz"])
    assert "not-a-key-zzz" not in str(raised.value)


def test_plainbox_round_trip_carries_prefix() -> None:
    """PlainBox seals to `plain:`… and opens it again."""
    sealed = PlainBox().seal(b"abc")
    assert sealed.startswith("plain:")
    assert PlainBox().open(sealed) == b"abc"


def test_plainbox_encrypted_secret_refused() -> None:
    """PlainBox cannot open a Fernet token and says a key is needed."""
    with pytest.raises(EncryptionError, match="CLOSESYNC_ENCRYPTION_KEYS"):
        PlainBox().open(FernetBox([KEY_A]).seal(b"x"))


def test_box_from_settings_no_key_refuses_every_seal_and_open() -> None:
    """Without a key or the allowance, sealing and opening fail with how to make a key."""
    settings = Settings(_env_file=None, closesync_encryption_keys=None)
    box = box_from_settings(settings)
    with pytest.raises(ConfigError, match="closesync keys generate"):
        box.seal(b"x")
    with pytest.raises(ConfigError, match="CLOSESYNC_ENCRYPTION_KEYS is not set"):
        box.open(PlainBox().seal(b"x"))
    with pytest.raises(ConfigError, match="CLOSESYNC_ALLOW_PLAINTEXT_TOKENS"):
        require_key(box)


def test_box_from_settings_loopback_urls_alone_never_give_plainbox() -> None:
    """Loopback API URLs (a sidecar, a proxy, the sandbox) are no reason to store in the clear."""
    local = "http://127.0.0.1:9"
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        closesync_encryption_keys=None,
        close_api_url=local,
        close_oauth_url=local,
        calendly_api_url=local,
        calendly_auth_url=local,
    )
    with pytest.raises(ConfigError, match="CLOSESYNC_ENCRYPTION_KEYS is not set"):
        box_from_settings(settings).seal(b"x")


def test_box_from_settings_plaintext_allowed_gives_plainbox_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CLOSESYNC_ALLOW_PLAINTEXT_TOKENS=true stores in the clear, and says so each time."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, closesync_encryption_keys=None, closesync_allow_plaintext_tokens=True
    )
    with caplog.at_level(logging.WARNING):
        box = box_from_settings(settings)
    assert isinstance(box, PlainBox)
    require_key(box)
    assert "stored unencrypted" in caplog.text


def test_box_from_settings_keys_give_fernetbox_even_with_plaintext_allowed() -> None:
    """Configured keys are always used."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        closesync_encryption_keys=f"{KEY_A}, {KEY_B}",
        closesync_allow_plaintext_tokens=True,
    )
    box = box_from_settings(settings)
    assert isinstance(box, FernetBox)
    assert box.key_count == 2
