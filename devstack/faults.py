"""Fault injection for the devstack: a flaky or unreachable AWS endpoint, a restarting PostgreSQL. Local stack only.

``python -m devstack faults aws --rate 0.2`` makes that share of the AWS endpoint's answers fail, each one at random
(or among ``--kinds``) as one of:

- ``throttle``: the throttling error of the request's protocol, as AWS sends it and botocore parses it, so that its
  retry modes classify it as throttling: HTTP 400 ``ThrottlingException`` for JSON (ECS, ECR), CBOR and query
  (``Throttling``) protocols, with ``x-amzn-query-error: Throttling;Sender`` for the query-compatible ones
  (CloudWatch); HTTP 503 ``SlowDown`` for S3, which is how S3 throttles;
- ``503``: HTTP 503 ``ServiceUnavailable``;
- ``drop``: the connection closed without an answer (botocore: ``ConnectionClosedError``).

``--rate 0`` clears it. ``python -m devstack faults aws --outage 20`` makes the endpoint unreachable for 20 s, then
back by itself: its listening socket is closed, so a new connection is refused (botocore:
``EndpointConnectionError``), and a request that got in before is dropped (``ConnectionClosedError``).
Refusing is what a client sees of an endpoint that is down, and it is the case that proves a retry is safe: the
request never reached AWS. ``--clear`` ends both.

``python -m devstack faults postgres --restart`` restarts the devstack's PostgreSQL in fast mode (every session is
dropped) and returns once it accepts connections again.

How it reaches the running stack: the faults are a small JSON file in the state folder (``faults.json``), written
atomically by the command; the endpoint (devstack/aws.py) reads it again whenever it changed, before each request
and every 0.1 s. Only the endpoint that clients use is affected: the devstack's own calls (the sample services'
metrics) go to a listener of their own, and the ECS simulator runs inside moto.

The same is a Python API for tests: ``set_aws_faults(state_dir, rate=..., outage_seconds=...)``,
``clear_aws_faults(state_dir)``, ``restart_postgres(state_dir)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FAULTS_FILE = "faults.json"
KINDS = ("throttle", "503", "drop")
MAX_OUTAGE_SECONDS = 3600.0
OUTAGE_START_TIMEOUT = 5.0  # seconds for the running endpoint to close its socket once an outage was asked for
WATCH_INTERVAL = 0.1  # how often the endpoint looks for a changed faults file and an outage's end

log = logging.getLogger("devstack.faults")


class DevstackNotRunning(RuntimeError):
    """The state folder names no running devstack."""


@dataclass(frozen=True)
class AwsFaults:
    """What the AWS endpoint does wrong: ``rate`` of its answers fail as one of ``kinds``; until ``outage_until``
    (seconds since the epoch: the command and the endpoint are separate processes) it is unreachable."""

    rate: float = 0.0
    kinds: tuple[str, ...] = KINDS
    outage_until: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be between 0 and 1 (a share of the answers), not {self.rate}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be some of {', '.join(KINDS)}, not {', '.join(self.kinds) or 'none'}")

    def in_outage(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.outage_until

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        parts = []
        if self.rate:
            parts.append(f"{self.rate:.0%} of the answers fail ({', '.join(self.kinds)})")
        if self.in_outage(now):
            until = datetime.fromtimestamp(self.outage_until, timezone.utc).strftime("%H:%M:%S UTC")
            parts.append(f"unreachable for {self.outage_until - now:.0f}s more (until {until}), then back by itself")
        return "; ".join(parts) or "no faults"

    @classmethod
    def from_json(cls, text: str) -> AwsFaults:
        data = json.loads(text)
        return cls(rate=float(data.get("rate", 0.0)), kinds=tuple(data.get("kinds", KINDS)),
                   outage_until=float(data.get("outage_until", 0.0)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# ---- the Python API (and the command's work) ---------------------------------------------------------------------
def set_aws_faults(state_dir: Path | str, rate: float | None = None, outage_seconds: float | None = None,
                   kinds: Iterable[str] | None = None) -> AwsFaults:
    """Set the running devstack's AWS faults and return them.

    ``rate`` (0 clears it) replaces the share of failing answers, with ``kinds`` (default: all); ``outage_seconds``
    makes the endpoint unreachable from now on for that long, and returns once it refuses connections. What is not
    given stays as it was. Raises DevstackNotRunning, or ValueError naming the bad argument (nothing changed then).
    """
    state_dir = Path(state_dir).resolve()
    if outage_seconds is not None and not 0 < outage_seconds <= MAX_OUTAGE_SECONDS:
        raise ValueError(f"outage must be more than 0 and at most {MAX_OUTAGE_SECONDS:.0f} seconds, "
                         f"not {outage_seconds}")
    aws_port = _running_stack_port(state_dir, "aws")
    current = aws_faults(state_dir)
    faults = AwsFaults(
        rate=current.rate if rate is None else rate,
        kinds=tuple(kinds) if kinds is not None else (KINDS if rate is not None else current.kinds),
        outage_until=time.time() + outage_seconds if outage_seconds is not None else current.outage_until,
    )
    _write_atomically(state_dir / FAULTS_FILE, faults.to_json())
    if outage_seconds is not None:
        _wait_until_refused(aws_port, state_dir)
    return faults


def clear_aws_faults(state_dir: Path | str) -> None:
    """End every AWS fault of the devstack in ``state_dir``: no failing answers, no outage (one under way ends)."""
    state_dir = Path(state_dir).resolve()
    aws_port = _running_stack_port(state_dir, "aws")
    _write_atomically(state_dir / FAULTS_FILE, AwsFaults().to_json())
    deadline = time.monotonic() + OUTAGE_START_TIMEOUT
    while not _accepts(aws_port) and time.monotonic() < deadline:  # an outage under way ends within a poll
        time.sleep(0.05)


def aws_faults(state_dir: Path | str) -> AwsFaults:
    """Return the AWS faults set for the devstack in ``state_dir`` (none when no file is there)."""
    path = Path(state_dir) / FAULTS_FILE
    try:
        return AwsFaults.from_json(path.read_text())
    except FileNotFoundError:
        return AwsFaults()


def restart_postgres(state_dir: Path | str, timeout: float = 60) -> float:
    """Restart the devstack's PostgreSQL in fast mode, which ends every session; return the seconds it took, once a
    new connection works."""
    import psycopg2

    from devstack.postgres import LocalPostgres
    from devstack.stack import read_env

    state_dir = Path(state_dir).resolve()
    port = _running_stack_port(state_dir, "postgres")
    admin_dsn = read_env(state_dir / "env")["OMNI_PG_ADMIN_DSN"]
    started = time.monotonic()
    LocalPostgres(state_dir, port).restart(timeout)
    deadline = started + timeout
    while True:  # pg_ctl -w waits for the server to accept connections; prove it with a session of our own
        try:
            psycopg2.connect(admin_dsn, connect_timeout=2).close()
            return time.monotonic() - started
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _running_stack_port(state_dir: Path, part: str) -> int:
    from devstack import stack

    if not stack.is_running(state_dir):
        raise DevstackNotRunning(f"the devstack is not running (state folder {state_dir}): start it with "
                                 f"`make devstack`")
    return int(json.loads((state_dir / "state.json").read_text())["ports"][part])


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)  # the endpoint never reads half a file


def _accepts(port: int) -> bool:
    from devstack.net import port_is_open

    return port_is_open(port)


def _wait_until_refused(port: int, state_dir: Path) -> None:
    deadline = time.monotonic() + OUTAGE_START_TIMEOUT
    while _accepts(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the AWS endpoint on port {port} still accepts connections {OUTAGE_START_TIMEOUT:.0f}s "
                               f"after the outage was set: see {state_dir / 'devstack.log'}")
        time.sleep(0.05)


# ---- inside the devstack: reading the faults, and acting them out ------------------------------------------------
class FaultState:
    """The faults file as the endpoint sees it: read again whenever it changed (one stat per look)."""

    def __init__(self, path: Path, on_change: Callable[[AwsFaults], None] | None = None) -> None:
        self.path = path
        self.on_change = on_change
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._faults = AwsFaults()
        self._random = random.Random()

    def current(self) -> AwsFaults:
        try:
            stat = self.path.stat()
            seen: tuple[int, int, int] | None = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen == self._seen:
                return self._faults
            try:
                faults = AwsFaults.from_json(self.path.read_text()) if seen else AwsFaults()
            except (OSError, ValueError, TypeError):  # keep the last good faults; the command validates what it writes
                log.exception("cannot read the AWS faults in %s; keeping %s", self.path, self._faults.describe())
                faults = self._faults
            self._seen, changed = seen, faults != self._faults
            self._faults = faults
        if changed:
            log.warning("AWS faults now: %s", faults.describe())
            if self.on_change:
                self.on_change(faults)
        return faults

    def pick(self) -> str | None:
        """Return the fault for the next request: ``outage``, one of KINDS, or None (answer it)."""
        faults = self.current()
        if faults.in_outage():
            return "outage"
        if faults.rate and self._random.random() < faults.rate:
            return self._random.choice(faults.kinds)
        return None


class FaultInjector:
    """WSGI middleware in front of moto: fails the requests that FaultState picks, answers the others."""

    def __init__(self, app: Callable[..., Any], faults: FaultState) -> None:
        self.app = app
        self.faults = faults

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        fault = self.faults.pick()
        if fault is None:
            return self.app(environ, start_response)
        service, operation = request_names(environ)
        log.info("fault injected: %s for %s %s", fault, service, operation)
        if fault in ("drop", "outage"):
            _discard_body(environ)  # or the server would read what is left of it as the next request
            connection = environ.get("werkzeug.socket")
            if connection is not None:
                with contextlib.suppress(OSError):  # the client may have gone first
                    connection.shutdown(socket.SHUT_RDWR)  # the client reads the end of the stream, and no answer
            raise ConnectionAbortedError(f"devstack fault: {fault}")  # werkzeug ends the request quietly
        status, headers, body = error_response(environ, THROTTLING if fault == "throttle" else UNAVAILABLE)
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]


def _discard_body(environ: dict[str, Any]) -> None:
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):  # chunked: the stream ends with the body
        while stream.read(65536):
            pass
        return
    left = int(environ.get("CONTENT_LENGTH") or 0)
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            return
        left -= len(chunk)


# ---- error answers, as AWS sends them in each protocol -----------------------------------------------------------
@dataclass(frozen=True)
class AwsError:
    status: int
    code: str  # JSON, CBOR and rest-json (``__type``)
    query_code: str  # query protocol, and x-amzn-query-error for the query-compatible services
    fault_type: str  # Sender or Receiver
    message: str
    s3: tuple[int, str, str]  # (status, code, message) of S3 (rest-xml), which throttles with 503 SlowDown


THROTTLING = AwsError(400, "ThrottlingException", "Throttling", "Sender", "Rate exceeded",
                      s3=(503, "SlowDown", "Please reduce your request rate."))
UNAVAILABLE = AwsError(503, "ServiceUnavailableException", "ServiceUnavailable", "Receiver",
                       "Service is unavailable, please try again later",
                       s3=(503, "ServiceUnavailable", "Service is unable to handle request."))


def error_response(environ: dict[str, Any], error: AwsError) -> tuple[str, list[tuple[str, str]], bytes]:
    """Return (status line, headers, body) of ``error`` in the protocol of the request in ``environ``."""
    request_id = str(uuid.uuid4())
    headers = [("x-amzn-RequestId", request_id)]
    service, _ = request_names(environ)
    query_compatible = environ.get("HTTP_X_AMZN_QUERY_MODE", "").lower() == "true"
    if query_compatible:
        headers.append(("x-amzn-query-error", f"{error.query_code};{error.fault_type}"))
    document = {"__type": f"com.amazon.coral.availability#{error.code}", "message": error.message}
    if environ.get("HTTP_SMITHY_PROTOCOL") == "rpc-v2-cbor":
        headers += [("Content-Type", "application/cbor"), ("smithy-protocol", "rpc-v2-cbor")]
        return _status(error.status), headers, _cbor_text_map(document)
    if environ.get("HTTP_X_AMZ_TARGET"):  # awsJson1_0 / awsJson1_1
        headers.append(("Content-Type", environ.get("CONTENT_TYPE") or "application/x-amz-json-1.1"))
        return _status(error.status), headers, json.dumps(document).encode()
    if service == "s3":
        status, code, message = error.s3
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>{request_id}</RequestId></Error>")
        return _status(status), [*headers, ("Content-Type", "application/xml")], body.encode()
    if "json" in environ.get("CONTENT_TYPE", ""):  # rest-json
        headers += [("Content-Type", "application/json"), ("x-amzn-ErrorType", error.code)]
        return _status(error.status), headers, json.dumps({"message": error.message}).encode()
    body = (f"<ErrorResponse><Error><Type>{error.fault_type}</Type><Code>{error.query_code}</Code>"
            f"<Message>{error.message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>")
    return _status(error.status), [*headers, ("Content-Type", "text/xml")], body.encode()


def request_names(environ: dict[str, Any]) -> tuple[str, str]:
    """Return (signing service, operation) of a request, for the log: ``("ecs", "DescribeServices")``."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    scope = authorization.partition("Credential=")[2].split(",", 1)[0].split("/")
    service = scope[3] if len(scope) >= 5 else "unknown"
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return service, target.rsplit(".", 1)[-1]
    if "Action=" in environ.get("QUERY_STRING", ""):
        return service, environ["QUERY_STRING"].partition("Action=")[2].split("&", 1)[0]
    return service, f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')}"


def _status(code: int) -> str:
    return {400: "400 Bad Request", 503: "503 Service Unavailable"}[code]


def _cbor_text_map(document: dict[str, str]) -> bytes:
    """Encode a map of text to text as CBOR (RFC 8949), all that an error body needs."""
    def head(major: int, length: int) -> bytes:
        if length < 24:
            return bytes([major << 5 | length])
        if length < 0x100:
            return bytes([major << 5 | 24, length])
        return bytes([major << 5 | 25]) + struct.pack(">H", length)

    encoded = head(5, len(document))
    for key, value in document.items():
        for text in (key.encode(), value.encode()):
            encoded += head(3, len(text)) + text
    return encoded


# ---- the command -------------------------------------------------------------------------------------------------
def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Return the parser of ``python -m devstack faults`` and that of its ``aws`` target."""
    from devstack.stack import DEFAULT_STATE_DIR

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="the devstack to act on (default: .devstack)")
    parser = argparse.ArgumentParser(
        prog="python -m devstack faults",
        description="Inject faults into the running devstack (local stack only).",
        epilog="examples: faults aws --rate 0.2 | faults aws --rate 0 | faults aws --outage 20 | "
               "faults postgres --restart")
    targets = parser.add_subparsers(dest="target", required=True, metavar="aws|postgres")
    aws = targets.add_parser("aws", parents=[common], help="make the AWS endpoint flaky or unreachable",
                             description="Make the devstack's AWS endpoint flaky (--rate) or unreachable (--outage).")
    aws.add_argument("--rate", type=_rate, help="share of answers that fail, 0 to 1; 0 clears it")
    aws.add_argument("--kinds", type=_kinds, help=f"with --rate: the failures to pick from, comma-separated "
                                                  f"(default: {','.join(KINDS)})")
    aws.add_argument("--outage", type=_seconds, metavar="SECONDS",
                     help="make the endpoint unreachable for SECONDS, then back by itself")
    aws.add_argument("--clear", action="store_true", help="end every AWS fault, an outage under way included")
    postgres = targets.add_parser("postgres", parents=[common], help="restart the service PostgreSQL",
                                  description="Restart the devstack's PostgreSQL, dropping every connection.")
    postgres.add_argument("--restart", action="store_true", required=True,
                          help="fast-mode restart; returns when it accepts connections again")
    return parser, aws


def main(argv: list[str]) -> int:
    parser, aws_parser = build_parser()
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    try:
        if args.target == "postgres":
            print(f"restarting PostgreSQL of the devstack in {state_dir} (fast mode: every session is dropped)",
                  flush=True)
            seconds = restart_postgres(state_dir)
            print(f"PostgreSQL restarted; it accepts connections again after {seconds:.1f}s")
            return 0
        if args.clear and (args.rate is not None or args.outage is not None or args.kinds):
            aws_parser.error("--clear ends every fault: give it alone")
        if args.kinds and args.rate is None:
            aws_parser.error("--kinds goes with --rate")
        if not args.clear and args.rate is None and args.outage is None:
            aws_parser.error("say what to do: --rate SHARE, --outage SECONDS or --clear")
        if args.clear:
            clear_aws_faults(state_dir)
            print("AWS endpoint: no faults")
            return 0
        faults = set_aws_faults(state_dir, rate=args.rate, outage_seconds=args.outage, kinds=args.kinds)
        print(f"AWS endpoint: {faults.describe()}" + ("; clear with --rate 0" if faults.rate else ""))
        return 0
    except DevstackNotRunning as exc:
        print(exc, file=sys.stderr)
        return 1


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}; give a share between 0 and 1, e.g. 0.2") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate is a share of the answers between 0 and 1 (e.g. 0.2), not {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_OUTAGE_SECONDS:
        raise argparse.ArgumentTypeError(f"an outage lasts more than 0 and at most {MAX_OUTAGE_SECONDS:.0f} seconds, not {text}")
    return value


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kind {', '.join(unknown) or text!r}: use some of "
                                         f"{','.join(KINDS)}")
    return kinds
