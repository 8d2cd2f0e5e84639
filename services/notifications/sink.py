"""A local SMTP sink and SMS-webhook receiver for development and tests.

    python -m services.notifications.sink

- SMTP (aiosmtpd) on CLMS_SMTP_SINK_PORT keeps every mail it receives (in memory, last 1000);
- HTTP on CLMS_SMTP_SINK_HTTP_PORT: `GET /` (HTML list), `GET /messages` (JSON),
  `POST /sms` (an SMS-gateway stand-in: verifies the X-CLMS-Signature HMAC over the webhook id,
  timestamp and body, 401 if it does not verify or the timestamp is outside the window, 409 for
  an id it already accepted within the window), `GET /sms` (JSON list of the verified SMS).

Stops cleanly on SIGTERM or SIGINT. Development only: it keeps officers' work addresses in memory.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import html
import weakref
import logging
import signal
import time
from collections.abc import Mapping
from email import message_from_bytes, policy
from typing import Any

import orjson
from aiosmtpd.smtp import SMTP

from services.notifications.signing import ReplayGuard

log = logging.getLogger("clms.sink")
HTTP_IDLE_S = 60.0  # a kept-alive HTTP connection with no request for this long is closed


class _Handler:
    def __init__(self, sink: "Sink"):
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.sink.receiving += 1  # a mail is taken only when answered (a cut connection cancels this)
        try:
            return await self._take(envelope)
        finally:
            self.sink.receiving -= 1

    async def _take(self, envelope: Any) -> str:
        if self.sink.delay_s:
            await asyncio.sleep(self.sink.delay_s)  # a slow server: it answers the DATA this late
        self.sink._seq += 1
        self.sink.messages.append(_Mail(self.sink._seq, time.time(), envelope.mail_from, list(envelope.rcpt_tos),
                                        envelope.content))
        self.sink.changed.set()
        return "250 Message accepted for delivery"


class _Mail(Mapping):
    """A received mail as the dict /messages shows, parsed when first read: the sink stands in
    for a mail relay, and parsing every mail as it arrives cost the machine's CPU that the
    services under test need (bench/README.md)."""

    def __init__(self, seq: int, received_at: float, mail_from: str, rcpt_tos: list[str], raw: bytes):
        self._head = {"id": seq, "received_at": received_at, "mail_from": mail_from, "rcpt_tos": rcpt_tos}
        self._raw = raw

    @functools.cached_property
    def _fields(self) -> dict[str, Any]:
        mail = message_from_bytes(self._raw, policy=policy.default)
        body = mail.get_body(preferencelist=("plain", "html"))
        return {
            **self._head,
            "to": str(mail.get("To", "")),
            "subject": str(mail.get("Subject", "")),
            "language": str(mail.get("Content-Language", "")),
            "notification_id": str(mail.get("X-CLMS-Notification-Id", "")),
            "recipient": str(mail.get("X-CLMS-Recipient", "")),
            "body": body.get_content() if body is not None else "",
        }

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self):  # noqa: ANN204
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class Sink:
    """SMTP + HTTP sink on the running event loop (`await start()`, `await stop()`)."""

    def __init__(self, *, smtp_port: int, http_port: int, webhook_secret: str | None,
                 host: str = "127.0.0.1", keep: int = 1000, delay_s: float = 0.0):
        self.host = host
        self.delay_s = delay_s  # tests: seconds before each mail is accepted (a slow SMTP server)
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.webhook_secret = webhook_secret
        self._replay = ReplayGuard(webhook_secret) if webhook_secret else None
        self.messages: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=keep)
        self.sms: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.rejected_sms = 0
        self.receiving = 0  # DATA commands taken and not answered yet
        self.changed = asyncio.Event()
        self._seq = 0
        self._smtp: asyncio.base_events.Server | None = None
        self._sessions: weakref.WeakSet = weakref.WeakSet()
        self._http: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()  # open HTTP connections (keep-alive)
        self.http_connections = 0  # HTTP connections accepted so far

    async def start(self) -> "Sink":
        await self.start_smtp()
        self._http = await asyncio.start_server(self._serve_http, self.host, self.http_port)
        return self

    async def start_smtp(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        def session() -> SMTP:
            proto = SMTP(handler, hostname="clms-sink", data_size_limit=1_000_000, loop=loop)
            self._sessions.add(proto)
            return proto

        self._smtp = await loop.create_server(session, self.host, self.smtp_port, reuse_address=True)

    async def stop_smtp(self) -> None:
        """Stop accepting mail (tests use it to simulate an SMTP outage)."""
        if self._smtp is not None:
            self._smtp.close()
            await self._smtp.wait_closed()
            self._smtp = None
        # An outage drops open connections too (senders keep one open between messages).
        for proto in list(self._sessions):
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.close()
        self._sessions.clear()

    async def stop(self) -> None:
        await self.stop_smtp()
        if self._http is not None:
            self._http.close()
            for writer in list(self._clients):  # kept-alive connections end with the sink
                writer.close()
            await self._http.wait_closed()
            self._http = None

    # --- HTTP ----------------------------------------------------------------------------------
    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 with keep-alive, as an SMS gateway's API would answer: requests on one
        connection until the client closes it, asks `Connection: close`, or stays silent for
        HTTP_IDLE_S (the SMS sender keeps its connection between messages; a connection per SMS
        cost the delivery process a TCP connect and teardown each: bench/README.md)."""
        self._clients.add(writer)
        self.http_connections += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_IDLE_S)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip()] = v.strip()
                lowered = {k.lower(): v for k, v in headers.items()}
                length = int(lowered.get("content-length", "0") or 0)
                body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
                status, ctype, payload = self.route(method, target.split("?")[0], headers, body)
                close = lowered.get("connection", "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                    f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + payload
                )
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError,
                ValueError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, str, bytes]:
        as_json = "application/json"
        if method == "GET" and path == "/messages":
            return "200 OK", as_json, orjson.dumps([dict(m) for m in self.messages])
        if method == "GET" and path == "/sms":
            return "200 OK", as_json, orjson.dumps(list(self.sms))
        if method == "POST" and path == "/sms":
            why = self._replay.accept(body, headers) if self._replay else "no WEBHOOK_SECRET configured"
            if why:
                self.rejected_sms += 1
                replayed = "already received" in why
                return (("409 Conflict" if replayed else "401 Unauthorized"), as_json,
                        orjson.dumps({"detail": why}))
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                return "400 Bad Request", as_json, b'{"detail":"body: invalid JSON"}'
            self.sms.append({"received_at": time.time(), **payload})
            self.changed.set()
            return "202 Accepted", as_json, b'{"status":"accepted"}'
        if method == "GET" and path == "/":
            return "200 OK", "text/html; charset=utf-8", self._html().encode()
        return "404 Not Found", as_json, b'{"detail":"not found"}'

    def _html(self) -> str:
        rows = "".join(
            f"<tr><td>{m['id']}</td><td>{html.escape(m['to'])}</td><td>{html.escape(m['language'])}</td>"
            f"<td><details><summary>{html.escape(m['subject'])}</summary><pre>{html.escape(m['body'])}</pre>"
            "</details></td></tr>"
            for m in reversed(self.messages)
        )
        sms = "".join(
            f"<tr><td>{html.escape(str(s.get('to', '')))}</td><td>{html.escape(str(s.get('text', '')))}</td></tr>"
            for s in reversed(self.sms)
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>CLMS mail sink</title>"
            "<meta http-equiv='refresh' content='5'><style>body{font-family:sans-serif}"
            "td{border-bottom:1px solid #ddd;padding:4px;vertical-align:top}</style></head><body>"
            f"<h1>CLMS mail sink</h1><p>{len(self.messages)} e-mail(s), {len(self.sms)} SMS. "
            "JSON: <a href='/messages'>/messages</a>, <a href='/sms'>/sms</a></p>"
            f"<table><tr><th>#</th><th>to</th><th>lang</th><th>subject</th></tr>{rows}</table>"
            f"<h2>SMS</h2><table><tr><th>to</th><th>text</th></tr>{sms}</table></body></html>"
        )


async def _run() -> None:
    from shared.settings import Settings

    settings = Settings()
    sink = await Sink(smtp_port=settings.smtp_sink_port, http_port=settings.smtp_sink_http_port,
                      webhook_secret=settings.webhook_secret.get_secret_value(), host="127.0.0.1").start()
    log.info("mail sink: SMTP on 127.0.0.1:%d, web on http://127.0.0.1:%d/",
             settings.smtp_sink_port, settings.smtp_sink_http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sink.stop()
        log.info("mail sink stopped")


def main() -> None:
    from shared.logs import configure_logging
    from shared.settings import Settings

    s = Settings()
    configure_logging("mail-sink", level=s.log_level, json=s.log_json)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command at INFO
    asyncio.run(_run())


if __name__ == "__main__":
    main()
