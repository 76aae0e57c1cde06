"""The request guard's rules, on ASGI scopes (the real servers are tested in tests/host/test_loopback_security.py)."""

from __future__ import annotations

import pytest

from lemonade_inferos.http.guard import GuardPolicy, RequestGuard, TokenRule, guard_policy_from_env

TOKEN = TokenRule("t0ken-abcdefghijklmnop", "x-inferos-token", needs=lambda method, path: method == "POST")


def _refusal(method="GET", path="/v1/health", policy=GuardPolicy(token=TOKEN), **headers):
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}
    response = RequestGuard(None, policy).refusal(scope)
    return None if response is None else (response.status_code, response.body)


@pytest.mark.parametrize("host", ["127.0.0.1:13305", "localhost", "LOCALHOST:1", "[::1]:8000", "app.localhost",
                                  "192.168.1.20:13305", "10.0.0.5"])
def test_loopback_names_and_ip_addresses_are_served(host):
    assert _refusal(host=host) is None


@pytest.mark.parametrize("host", ["evil.example", "evil.example:13305", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_other_host_names_are_refused_as_dns_rebinding(host):
    status, body = _refusal(host=host)
    assert status == 400 and b"invalid_host" in body


def test_configured_hosts_are_served():
    policy = guard_policy_from_env({"LEMONADE_ALLOWED_HOSTS": "box.lan, Other.LAN"}, bind_host="bound.lan")
    assert all(_refusal(host=h, policy=policy) is None for h in ("box.lan", "other.lan:80", "bound.lan"))
    assert _refusal(host="evil.example", policy=policy)[0] == 400


def test_cross_site_writes_are_refused_and_reads_are_not():
    assert _refusal("POST", "/v1/baseline", origin="http://evil.example", x_inferos_token=TOKEN.token)[0] == 403
    assert _refusal("POST", "/v1/baseline", origin="null", x_inferos_token=TOKEN.token)[0] == 403
    assert _refusal("POST", "/v1/baseline", sec_fetch_site="cross-site", x_inferos_token=TOKEN.token)[0] == 403
    assert _refusal("GET", "/v1/metrics", origin="http://evil.example") is None
    assert _refusal("POST", "/v1/baseline", origin="http://localhost:3000", x_inferos_token=TOKEN.token) is None


def test_form_bodies_a_page_can_send_without_a_preflight_are_refused():
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, body = _refusal("POST", "/v1/baseline", content_type=content_type, content_length="2",
                                x_inferos_token=TOKEN.token)
        assert status == 415 and b"application/json" in body
    assert _refusal("POST", "/v1/baseline", content_type="application/json", content_length="2",
                    x_inferos_token=TOKEN.token) is None
    assert _refusal("POST", "/v1/config", content_type="application/yaml", content_length="9",
                    x_inferos_token=TOKEN.token) is None


def test_the_token_is_checked_before_anything_about_the_body_and_exactly():
    assert _refusal("POST", "/v1/config", content_type="text/plain", content_length="2")[0] == 401
    for wrong in (TOKEN.token + "x", TOKEN.token[:-1], TOKEN.token + " x", "", TOKEN.token.upper()):
        assert _refusal("POST", "/v1/baseline", x_inferos_token=wrong)[0] == 401
    assert _refusal("POST", "/v1/baseline", x_inferos_token=TOKEN.token) is None


def test_a_bearer_key_needs_the_scheme_and_the_exact_key():
    policy = GuardPolicy(token=TokenRule("k3y-0123456789abcdef", "authorization", lambda m, p: p != "/live",
                                         scheme="Bearer"))
    assert _refusal("GET", "/api/v1/health", policy, authorization="Bearer k3y-0123456789abcdef") is None
    assert _refusal("GET", "/api/v1/health", policy, authorization="bearer k3y-0123456789abcdef") is None
    for wrong in ("k3y-0123456789abcdef", "Bearer  k3y-0123456789abcdef", "Basic k3y-0123456789abcdef"):
        assert _refusal("GET", "/api/v1/health", policy, authorization=wrong)[0] == 401
    assert _refusal("GET", "/live", policy) is None
