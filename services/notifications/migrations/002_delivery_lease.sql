-- The delivery lease: the replica delivering a notification holds it under a token until
-- next_attempt_at (renewed while the send is in flight). A result is recorded only by the holder
-- of the token (a success by anyone: the message went out).
alter table notifications add column lease_token uuid;
