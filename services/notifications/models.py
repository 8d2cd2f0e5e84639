"""Response schemas of the inbox API."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field


class Alert(BaseModel):
    id: UUID = Field(description="Alert id (= the in-app notification id)")
    event_type: str = Field(description="What the alert is about, e.g. referral.created")
    referral_id: UUID | None
    case_id: UUID | None
    priority: str | None
    subject: str
    body: str = Field(description="Rendered in the officer's language; never carries personal data")
    link: str | None
    created_at: datetime
    acked_at: datetime | None
    recipient: str = Field(description="Officer subject the alert is for (the caller)")


class Inbox(BaseModel):
    items: list[Alert]
    unacked: int = Field(description="How many of the caller's alerts are not acknowledged")
