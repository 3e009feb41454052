"""The API sessions read the proxy environment once per host, and still honour it."""

from __future__ import annotations

import pytest
import requests

from closesync.apis.http import new_session

URL = "https://api.close.com/api/v1/scheduling_link/"
BYPASSED = "http://127.0.0.1:8080/event_types"


@pytest.fixture
def proxied(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")


@pytest.mark.usefixtures("proxied")
@pytest.mark.parametrize("url", [URL, BYPASSED])
def test_new_session_environment_settings_match_requests_own(url: str) -> None:
    """Per host, the settings are what a plain requests session finds, on every call."""
    plain = requests.Session().merge_environment_settings(url, {}, None, None, None)
    session = new_session()
    first = session.merge_environment_settings(url, {}, None, None, None)
    again = session.merge_environment_settings(url, {}, None, None, None)
    assert first == plain
    assert again == plain
    assert (first["proxies"] == {}) == (url == BYPASSED)
    assert first["verify"] == "/etc/ssl/corp.pem"


@pytest.mark.usefixtures("proxied")
def test_new_session_settings_of_one_call_are_not_kept_for_the_next() -> None:
    """A call's own verify is honoured, and neither it nor a mutation of the answer sticks."""
    session = new_session()
    assert session.merge_environment_settings(URL, {}, None, False, None)["verify"] is False
    answer = session.merge_environment_settings(URL, {}, None, None, None)
    answer["proxies"]["https"] = "http://elsewhere:1"
    fresh = session.merge_environment_settings(URL, {}, None, None, None)
    assert fresh["verify"] == "/etc/ssl/corp.pem"
    assert fresh["proxies"]["https"] == "http://proxy.internal:3128"
