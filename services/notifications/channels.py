"""Delivery channels behind one small interface: `await channel.send(message)` returns when the
channel accepted the message and raises `DeliveryError` (retryable) or `PermanentDeliveryError`
(no point retrying) otherwise.

- e-mail: SMTP via aiosmtplib (SMTP_HOST/SMTP_PORT; the local sink by default);
- sms: a signed JSON webhook to an SMS gateway (SMS_WEBHOOK_URL; see `signing.py`);
- in-app: the inbox row is written in the same transaction that records the notification
  (`service.record_event`), so it needs no sender here.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.mime.text import MIMEText
from email.utils import make_msgid
from typing import Protocol

import aiohttp
import aiosmtplib
import orjson

from services.notifications import signing
from shared.settings import Settings


# EHLO name: the host name, without aiosmtplib's default per-connection getfqdn() DNS lookup.
_LOCAL_HOSTNAME = socket.gethostname() or "localhost"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    notification_id: str
    recipient: str  # officer subject
    channel: str
    address: str | None  # e-mail address or phone number, from the directory
    language: str
    subject: str
    body: str
    link: str | None


class DeliveryError(Exception):
    """The channel did not take the message; a later attempt may succeed."""


class PermanentDeliveryError(DeliveryError):
    """The message can never be delivered on this channel (e.g. the officer has no address)."""


class ChannelSender(Protocol):
    name: str

    async def send(self, message: OutgoingMessage) -> None: ...


def _describe(exc: BaseException) -> str:
    """Error class and message, never message content or addresses."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in the raw message, unlike base64


def render_email(message: OutgoingMessage, *, sender: str) -> MIMEText:
    """The MIME message of one notification. `MIMEText` and the compat32 policy, not
    `EmailMessage`: the modern policy parses every header it is given back through its header
    registry, five times the CPU for the same bytes (it was a fifth of the delivery process).
    compat32 does not refuse a line break in a header value as the modern policy did, so this
    does: a value with CR or LF could add headers (a Bcc) to the mail."""
    for value in (sender, message.address, message.subject, message.notification_id, message.recipient,
                  message.language):
        if value and ("\r" in value or "\n" in value):
            raise ValueError("a header value of the e-mail contains a line break")
    mail = MIMEText(message.body, "plain", _UTF8_QP)
    mail["From"] = sender
    mail["To"] = message.address
    mail["Subject"] = message.subject if message.subject.isascii() else Header(message.subject, "utf-8")
    mail["Message-ID"] = make_msgid(idstring=message.notification_id, domain="clms.example.invalid")
    mail["X-CLMS-Notification-Id"] = message.notification_id
    mail["X-CLMS-Recipient"] = message.recipient
    mail["Content-Language"] = message.language
    return mail


class EmailSender:
    """SMTP over one kept-open connection (opened on first use, reopened after any error).

    A connection per e-mail cost a TCP connect, EHLO (with a `getfqdn()` DNS lookup in a
    worker thread) and QUIT per message on both ends; under load that was most of the delivery
    loop's CPU (bench/README.md, Performance). Messages on the connection go one at a time."""

    name = "email"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host, port=s.smtp_port, timeout=s.smtp_timeout_s,
            start_tls=s.smtp_starttls or None, local_hostname=_LOCAL_HOSTNAME,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
        )
        await smtp.connect()
        self._smtp = smtp
        return smtp

    async def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def send(self, message: OutgoingMessage) -> None:
        if not message.address:
            raise PermanentDeliveryError("officer has no e-mail address")
        s = self.settings
        mail = render_email(message, sender=s.smtp_from)
        async with self._lock:
            try:
                smtp = await self._connected()
                await smtp.send_message(mail)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                await self._drop()  # the transaction is half-done: start clean next time
                raise PermanentDeliveryError(_describe(exc)) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                await self._drop()
                raise DeliveryError(_describe(exc)) from None
            except BaseException:
                await self._drop()
                raise

    async def aclose(self) -> None:
        async with self._lock:
            smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), 2)
            except Exception:  # noqa: BLE001 - closing anyway
                smtp.close()


class SmsWebhookSender:
    """A signed JSON POST per SMS to the gateway, over aiohttp's kept-alive connections (opened
    on first use). aiohttp, not httpx: the same POST cost the delivery process 575 us of CPU with
    httpx against 122 with aiohttp, sink included (bench/README.md)."""

    name = "sms"

    def __init__(self, settings: Settings, session: aiohttp.ClientSession | None = None):
        self.settings = settings
        self._session = session

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.smtp_timeout_s))
        return self._session

    async def send(self, message: OutgoingMessage) -> None:
        if not message.address:
            raise PermanentDeliveryError("officer has no phone number")
        body = orjson.dumps({
            "notification_id": message.notification_id,
            "to": message.address,
            "language": message.language,
            "text": f"{message.subject} {message.link or ''}".strip(),
        })
        headers = {"Content-Type": "application/json",
                   **signing.sign(body, self.settings.webhook_secret.get_secret_value())}
        try:
            async with self._client().post(self.settings.sms_webhook_url, data=body, headers=headers) as resp:
                status = resp.status
                await resp.read()  # the whole answer, so the connection can carry the next SMS
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a malformed URL
            raise DeliveryError(_describe(exc)) from None
        if status >= 500 or status in (408, 429):
            raise DeliveryError(f"SMS gateway answered HTTP {status}")
        if status >= 400:
            raise PermanentDeliveryError(f"SMS gateway refused the message: HTTP {status}")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def open_senders(settings: Settings) -> dict[str, ChannelSender]:
    """The senders of the delivery loop, by channel (`close_senders` when done)."""
    return {"email": EmailSender(settings), "sms": SmsWebhookSender(settings)}


async def close_senders(senders: dict[str, ChannelSender]) -> None:
    for sender in senders.values():
        try:
            await sender.aclose()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - closing anyway
            pass
