"""A URL's credentials are masked one way wherever a URL is shown (`fsm.text.masked`): the
whole userinfo, up to the authority's last `@`, becomes `***@`, whatever it holds (a
password with an unescaped `@`, a token as the user, percent-escapes) and whatever the
host (an IPv6 address in brackets). Each entry point is checked: the start-up line of
`serve` and `worker`, `db upgrade`'s line, the relay's AMQP destination as `webhooks
list` and the events page show it, and an error's text as stored and logged."""

from __future__ import annotations

import pytest

from fsm import subscriptions
from fsm.destinations import transient
from fsm.relay import FailureWatch, register_amqp
from fsm.store import Store
from fsm.text import masked, storable
from order_saga.console import running_with
from tests.support.processes import run_cli
from tests.support.settings import cli_settings, saga_settings

# (userinfo, host): the URL is SCHEME://<userinfo><host>/<path>; its secret must not show.
URLS = [
    pytest.param("app:hunter@2@", "127.0.0.1:1", id="password-with-@"),
    pytest.param("t0ken@", "127.0.0.1:1", id="token-only"),
    pytest.param("", "127.0.0.1:1", id="no-userinfo"),
    pytest.param("app:hunter2@", "[::1]:1", id="ipv6-host"),
    pytest.param("app:p%40ss%3Aw0rd@", "127.0.0.1:1", id="percent-encoded"),
]
SECRETS = ("hunter", "t0ken", "p%40ss", "w0rd")


def _expected(scheme: str, userinfo: str, host: str, path: str) -> str:
    return f"{scheme}://{'***@' if userinfo else ''}{host}/{path}"


def _no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


@pytest.mark.parametrize(("userinfo", "host"), URLS)
def test_the_one_mask(userinfo: str, host: str) -> None:
    url = f"amqp://{userinfo}{host}/"
    assert masked(url) == _expected("amqp", userinfo, host, "")
    said = f"broker: AMQPConnectionError: {url} refused"
    assert storable(said) == f"broker: AMQPConnectionError: {masked(url)} refused"
    _no_secret(storable(said))


@pytest.mark.parametrize(("userinfo", "host"), URLS)
def test_the_start_line_masks_the_database_url(userinfo: str, host: str) -> None:
    url = f"postgresql+psycopg://{userinfo}{host}/saga"
    line = running_with(cli_settings(url), keys=False, embedded="embedded")
    assert f"running with database {_expected('postgresql+psycopg', userinfo, host, 'saga')};" in (
        line
    )
    _no_secret(line)


@pytest.mark.parametrize(("userinfo", "host"), URLS)
def test_db_upgrade_masks_the_database_url(userinfo: str, host: str) -> None:
    url = f"postgresql+psycopg://{userinfo}{host}/x"  # nothing listens on port 1
    result = run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 1, result
    shown = _expected("postgresql+psycopg", userinfo, host, "x")
    assert result.stderr.startswith(f"order-saga: cannot migrate {shown}: "), result.stderr
    _no_secret(result.stdout + result.stderr)


@pytest.mark.parametrize(("userinfo", "host"), URLS)
async def test_the_relay_shows_its_amqp_destination_masked(
    db_url: str, store: Store, userinfo: str, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"amqp://{userinfo}{host}/"
    await register_amqp(store, saga_settings(db_url, amqp_url=url))
    (destination,) = subscriptions.destinations(store)
    assert destination.url == _expected("amqp", userinfo, host, "")  # as listed and shown
    FailureWatch("amqp", lambda: 0.0).see([transient(f"broker: E: {url} refused")])
    assert f"last error: broker: E: {destination.url} refused" in caplog.text
    _no_secret(destination.url + caplog.text)


# A password given as a query parameter (libpq reads ?password= and ?sslpassword=).
QUERY_SECRETS = [
    pytest.param("?application_name=x&password=hunter3", id="password-param"),
    pytest.param("?sslpassword=hunter3&sslmode=prefer", id="sslpassword-param"),
    pytest.param("?PASSWORD=hunter3", id="upper-case-name"),
    pytest.param("?password=ab'hunter3", id="quote-in-password"),
]


@pytest.mark.parametrize("query", QUERY_SECRETS)
def test_a_secret_query_parameter_is_masked(query: str) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:1/x{query}"
    assert "hunter3" not in masked(url) and "=***" in masked(url)
    assert masked(url).startswith("postgresql+psycopg://***@127.0.0.1:1/x?")
    assert masked("http://svc/a?passwordless=1&tokens=2") == "http://svc/a?passwordless=1&tokens=2"
    line = running_with(cli_settings(url), keys=False, embedded="embedded")
    assert "hunter3" not in line and f"running with database {masked(url)};" in line


@pytest.mark.parametrize("query", QUERY_SECRETS)
def test_db_upgrade_masks_a_password_query_parameter(query: str) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:1/x{query}"  # nothing listens on port 1
    result = run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"order-saga: cannot migrate {masked(url)}: "), result.stderr
    assert "hunter3" not in result.stdout + result.stderr
