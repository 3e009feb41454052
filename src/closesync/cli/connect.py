"""`closesync connect`: an operator at a terminal connects accounts through the browser.

Prints (and opens, unless `--no-browser` or there is no browser) each authorize URL, takes the
callback on a loopback port (`http://127.0.0.1:PORT/oauth/{close,calendly}/callback`, which must
be a redirect URI of both OAuth applications), and goes from Close to Calendly in one browser
tab: the Close callback redirects straight on to Calendly. `--organization` connects a Calendly
organization's shared credential instead (an owner or admin must authorize; Close is authorized
first there too, to bind the credential to the admin's Close organization).

Binding: each run makes a secret of its own, and the loopback server finishes only the flows
this run started (`oauth_flow.binding_matches`); no cookie is needed, since the browser goes
straight from the printed URL to the provider. A stray local request (an unknown `state`, a
flow started elsewhere) gets an error page and does not end the operator's flow; any other
failure while finishing a callback (Redis down, a missing key or setting) ends the command at
once with its message (exit 2 for configuration and encryption errors, 1 otherwise).

Output names the connection, never a token (`--json` included).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import threading
import webbrowser
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from closesync.cli.common import print_json
from closesync.connect.connector import Connector
from closesync.connect.oauth_flow import Purpose, new_binding
from closesync.connect.steps import FlowError, Step, step_json
from closesync.core.connection import Side
from closesync.core.errors import CloseSyncError, ConfigError, EncryptionError
from closesync.web.pages import Response, page, redirect
from closesync.wiring.logs import redact
from closesync.wiring.services import Services, load_services

# The loopback port both OAuth applications must list in their redirect URIs.
DEFAULT_PORT = 8765
# Seconds to wait for each callback: time to sign in, pick an organization and approve.
DEFAULT_TIMEOUT = 300.0

Announce = Callable[[Side, str], None]
# FlowError kinds of a callback that was not this run's flow: answered, but the run goes on.
_NOT_OURS = ("state", "browser")
_PATHS: dict[str, Side] = {
    "/oauth/close/callback": "close",
    "/oauth/calendly/callback": "calendly",
}


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("connect", help="connect Close and Calendly in the browser")
    parser.add_argument(
        "--organization",
        action="store_true",
        help="connect a Calendly organization (owner or admin) instead",
    )
    parser.add_argument("--name", help="a label for the connection")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"loopback port of the callback (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for each authorization",
    )
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=cmd_connect)


class _Callbacks(ThreadingHTTPServer):
    """The loopback server: each callback is finished in its handler, the result queued."""

    daemon_threads = True

    def __init__(self, port: int, connector_for: Callable[[str], Connector]) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.connector = connector_for(f"http://127.0.0.1:{self.server_address[1]}")
        # The secret binding this run's flows to this run (never leaves the process).
        self.binding = new_binding()
        self.results: queue.Queue[Step | Exception] = queue.Queue()


class _Handler(BaseHTTPRequestHandler):
    server: _Callbacks

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        provider = _PATHS.get(split.path)
        response: Response
        if provider is None:
            response = page(404, "Not found", "This port only takes OAuth callbacks.")
        else:
            params = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            try:
                step = self.server.connector.callback(provider, params, self.server.binding)
            except FlowError as error:
                if error.kind not in _NOT_OURS:
                    self.server.results.put(error)
                response = page(400, "Not connected", str(error))
            except Exception as error:  # ended the flow: the command says why, not a traceback
                self.server.results.put(error)
                response = page(
                    500,
                    "Not connected",
                    "closesync could not finish this authorization; the terminal says why.",
                )
            else:
                self.server.results.put(step)
                response = (
                    redirect(step.next_url)
                    if step.next_url
                    else page(200, "Done", f"{step.message} You can close this tab.")
                )
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # the request line holds the code and state


def run_connect(
    services: Services,
    *,
    purpose: Purpose = "personal",
    name: str | None = None,
    port: int = DEFAULT_PORT,
    timeout: float = DEFAULT_TIMEOUT,
    announce: Announce,
) -> Step:
    """Run the flow to its end; FlowError when it cannot finish, TimeoutError when no one came."""
    server = _Callbacks(port, lambda base: Connector(services, base))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # Both flows start at Close (an organization's to learn the admin's Close organization).
        announce("close", server.connector.start(purpose, server.binding, name))
        while True:
            try:
                result = server.results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"no authorization arrived within {timeout:g} s; nothing was stored"
                ) from None
            if isinstance(result, Exception):
                raise result
            if result.next_url is None:
                return result
            announce("calendly", result.next_url)
    finally:
        server.shutdown()
        server.server_close()


def _announcer(open_browser: bool) -> Announce:
    label = {"close": "Close", "calendly": "Calendly"}

    def announce(provider: Side, url: str) -> None:
        sys.stderr.write(f"Authorize {label[provider]} in your browser:\n  {url}\n")
        sys.stderr.flush()
        if open_browser:
            # No browser here (a server, CI): the printed URL is enough.
            with contextlib.suppress(webbrowser.Error):
                webbrowser.open(url)

    return announce


def cmd_connect(args: argparse.Namespace) -> int:
    services = load_services()
    services.require_key()
    purpose: Purpose = "organization" if args.organization else "personal"
    # Both apps, for either flow: a missing one must not surface after Close was approved.
    Connector(services, "http://127.0.0.1").require_apps("close", "calendly")
    try:
        step = run_connect(
            services,
            purpose=purpose,
            name=args.name,
            port=args.port,
            timeout=args.timeout,
            announce=_announcer(not args.no_browser),
        )
    except (FlowError, TimeoutError) as error:
        return _failed(args, str(error), 1)
    except (ConfigError, EncryptionError) as error:
        return _failed(args, str(error), 2)
    except CloseSyncError as error:
        return _failed(args, str(error), 1)
    except Exception as error:  # a bug while finishing a callback: one line, nothing secret
        return _failed(args, redact(f"finishing the authorization failed: {error!r}"), 1)
    if args.json:
        print_json(step_json(step))
    else:
        sys.stdout.write(
            step.message + (f" ({step.connection.id})" if step.connection else "") + "\n"
        )
    return 0


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    if args.json:
        print_json({"outcome": "failed", "message": message})
    sys.stderr.write(f"closesync: {message}\n")
    return code
