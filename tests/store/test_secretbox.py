"""SecretBox: Fernet with rotation, the sandbox's PlainBox, and the settings that choose one."""

from __future__ import annotations

import base64
import logging

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from closesync.core.errors import ConfigError, EncryptionError
from closesync.settings import Settings
from closesync.store.secretbox import (
    FernetBox,
    Opened,
    PlainBox,
    box_from_settings,
    generate_key,
    require_key,
)

KEY_A = generate_key()
KEY_B = generate_key()
OWNER = "connection:conn_aaaaaaaaaaaa"
OTHER = "connection:conn_bbbbbbbbbbbb"


@given(st.binary())
def test_fernetbox_any_bytes_round_trip(plaintext: bytes) -> None:
    """What a FernetBox seals it opens again, byte for byte."""
    box = FernetBox([KEY_A])
    assert box.open(box.seal(plaintext, owner=OWNER), owner=OWNER) == plaintext


def test_fernetbox_sealed_text_does_not_contain_plaintext() -> None:
    """The sealed string does not show the secret."""
    assert "tok_secret" not in FernetBox([KEY_A]).seal(b"tok_secret", owner=OWNER)


def test_fernetbox_old_key_listed_second_still_decrypts() -> None:
    """After rotation to a new first key, secrets sealed under the old one still open."""
    old = FernetBox([KEY_A]).seal(b"x", owner=OWNER)
    assert FernetBox([KEY_B, KEY_A]).open(old, owner=OWNER) == b"x"


def test_fernetbox_rotate_reseals_under_first_key() -> None:
    """A rotated secret opens with the first key alone."""
    old = FernetBox([KEY_A]).seal(b"x", owner=OWNER)
    rotated = FernetBox([KEY_B, KEY_A]).rotate(old, owner=OWNER)
    assert FernetBox([KEY_B]).open(rotated, owner=OWNER) == b"x"


def test_fernetbox_unknown_key_raises_encryption_error() -> None:
    """A secret sealed under a key no longer listed fails with a clear EncryptionError."""
    sealed = FernetBox([KEY_A]).seal(b"x", owner=OWNER)
    with pytest.raises(EncryptionError, match="none of the 1 keys"):
        FernetBox([KEY_B]).open(sealed, owner=OWNER)


def test_fernetbox_plain_secret_refused_loudly() -> None:
    """A PlainBox secret is refused with a message naming the plaintext allowance and the fix."""
    with pytest.raises(EncryptionError, match=r"unencrypted \(CLOSESYNC_ALLOW_PLAINTEXT_TOKENS"):
        FernetBox([KEY_A]).open(PlainBox().seal(b"x", owner=OWNER), owner=OWNER)


def test_fernetbox_rotate_plain_secret_with_seal_plaintext_encrypts_it() -> None:
    """Rotation asked to seal plaintext upgrades a PlainBox secret to an encrypted one."""
    plain = PlainBox().seal(b"x", owner=OWNER)
    rotated = FernetBox([KEY_A]).rotate(plain, owner=OWNER, seal_plaintext=True)
    assert not rotated.startswith("plain:")
    assert FernetBox([KEY_A]).open(rotated, owner=OWNER) == b"x"


def test_fernetbox_rotate_plain_secret_without_seal_plaintext_refuses() -> None:
    """Without the explicit choice a `plain:` value (anyone may write one) is never sealed."""
    with pytest.raises(EncryptionError, match="--seal-plaintext"):
        FernetBox([KEY_A]).rotate(PlainBox().seal(b"x", owner=OWNER), owner=OWNER)


def test_fernetbox_plain_secret_refusal_does_not_tell_to_rotate_it() -> None:
    """The run's error for a `plain:` value says it may be planted, not just "run rotate"."""
    with pytest.raises(EncryptionError) as refused:
        FernetBox([KEY_A]).open(PlainBox().seal(b"x", owner=OWNER), owner=OWNER)
    assert "run `closesync keys rotate`" not in str(refused.value)
    assert "connect again" in str(refused.value)


def test_fernetbox_requiring_bound_values_refuses_one_sealed_before_binding() -> None:
    """With require_bound (CLOSESYNC_REQUIRE_BOUND_GRANTS) an unbound value neither opens nor
    rotates; bound values are unaffected."""
    legacy = Fernet(KEY_A).encrypt(b'{"access_token": "t"}').decode()
    strict = FernetBox([KEY_A], require_bound=True)
    for attempt in (strict.open, strict.rotate):
        with pytest.raises(EncryptionError, match="CLOSESYNC_REQUIRE_BOUND_GRANTS"):
            attempt(legacy, owner=OWNER)
    assert strict.open(strict.seal(b"x", owner=OWNER), owner=OWNER) == b"x"


def test_box_from_settings_require_bound_grants_reaches_the_fernetbox() -> None:
    """CLOSESYNC_REQUIRE_BOUND_GRANTS=true gives a FernetBox that refuses unbound values."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, closesync_encryption_keys=KEY_A, closesync_require_bound_grants=True
    )
    box = box_from_settings(settings)
    assert isinstance(box, FernetBox)
    assert box.require_bound


@pytest.mark.parametrize("box", [FernetBox([KEY_A]), PlainBox()], ids=["fernet", "plain"])
def test_box_opened_for_another_owner_fails_naming_both(box: FernetBox | PlainBox) -> None:
    """A value sealed for one owner, opened for another, raises naming both, never the secret."""
    sealed = box.seal(b"tok_secret", owner=OWNER)
    with pytest.raises(EncryptionError, match="sealed for another owner") as refused:
        box.open(sealed, owner=OTHER)
    assert OWNER in str(refused.value)
    assert OTHER in str(refused.value)
    assert "tok_secret" not in str(refused.value)


def test_fernetbox_value_sealed_before_binding_opens_unbound_and_rotate_binds_it() -> None:
    """A Fernet token of the bare secret (the format before binding) opens, and rotate binds it."""
    legacy = Fernet(KEY_A).encrypt(b'{"access_token": "t"}').decode()
    box = FernetBox([KEY_B, KEY_A])
    assert box.unseal(legacy, owner=OWNER) == Opened(b'{"access_token": "t"}', bound=False)
    rotated = box.rotate(legacy, owner=OWNER)
    assert FernetBox([KEY_B]).unseal(rotated, owner=OWNER).bound
    with pytest.raises(EncryptionError, match="sealed for another owner"):
        box.rotate(rotated, owner=OTHER)


def test_plainbox_value_sealed_before_binding_still_opens() -> None:
    """`plain:` + base64 of the bare secret (the format before binding) still opens."""
    assert PlainBox().open("plain:" + base64.b64encode(b"abc").decode(), owner=OWNER) == b"abc"


def test_fernetbox_invalid_key_names_position_not_value() -> None:
    """A bad key is named by its position; its value never appears in the message."""
    with pytest.raises(ConfigError, match="key 2 of 2") as raised:
        FernetBox([KEY_A, "not-a-key-zzz"])
    assert "not-a-key-zzz" not in str(raised.value)


def test_plainbox_round_trip_carries_prefix() -> None:
    """PlainBox seals to `plain:`… and opens it again."""
    sealed = PlainBox().seal(b"abc", owner=OWNER)
    assert sealed.startswith("plain:")
    assert PlainBox().open(sealed, owner=OWNER) == b"abc"


def test_plainbox_encrypted_secret_refused() -> None:
    """PlainBox cannot open a Fernet token and says a key is needed."""
    with pytest.raises(EncryptionError, match="CLOSESYNC_ENCRYPTION_KEYS"):
        PlainBox().open(FernetBox([KEY_A]).seal(b"x", owner=OWNER), owner=OWNER)


def test_box_from_settings_no_key_refuses_every_seal_and_open() -> None:
    """Without a key or the allowance, sealing and opening fail with how to make a key."""
    settings = Settings(_env_file=None, closesync_encryption_keys=None)
    box = box_from_settings(settings)
    with pytest.raises(ConfigError, match="closesync keys generate"):
        box.seal(b"x", owner=OWNER)
    with pytest.raises(ConfigError, match="CLOSESYNC_ENCRYPTION_KEYS is not set"):
        box.open(PlainBox().seal(b"x", owner=OWNER), owner=OWNER)
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
        box_from_settings(settings).seal(b"x", owner=OWNER)


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


def test_fernet_box_opened_again_still_checks_owner_and_follows_new_seals() -> None:
    """A value opened before (kept decrypted) still refuses another owner, and a value sealed
    anew opens to its new secret, never to the one kept for the old value."""
    box = FernetBox([Fernet.generate_key().decode()])
    first = box.seal(b"token one", owner="connection:a")
    assert box.open(first, owner="connection:a") == b"token one"
    assert box.open(first, owner="connection:a") == b"token one"
    with pytest.raises(EncryptionError):
        box.open(first, owner="connection:b")
    second = box.seal(b"token two", owner="connection:a")
    assert box.open(second, owner="connection:a") == b"token two"
    assert box.open(first, owner="connection:a") == b"token one"


def test_fernet_box_kept_value_never_opens_under_a_box_without_its_key() -> None:
    """What one box keeps decrypted is its own: a box without the sealing key still fails."""
    sealing = FernetBox([Fernet.generate_key().decode()])
    sealed = sealing.seal(b"secret", owner="connection:a")
    assert sealing.open(sealed, owner="connection:a") == b"secret"
    with pytest.raises(EncryptionError, match="none of the 1 keys"):
        FernetBox([Fernet.generate_key().decode()]).open(sealed, owner="connection:a")
