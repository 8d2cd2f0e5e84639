"""Settings for every service, read from the environment (and an optional `.env`).

One model, one table in the README. Every service builds its own `Settings()` in its
composition root; nothing here performs I/O at import.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PLACEHOLDER = "dev-only-change-me"
# The inbox keeps dedupe rows at least this much longer than the outbox keeps events.
RETENTION_MARGIN_HOURS = 1.0


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Environment = Field(Environment.development, alias="CLMS_ENV")

    # --- infrastructure -------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(None, alias="KAFKA_BOOTSTRAP_SERVERS")
    database_url: str | None = Field(None, alias="DATABASE_URL")
    # The schema owner's connection, used only to apply migrations (deploy/postgres/roles.sql:
    # `intake` owns the schema, `intake_app` is the runtime role of DATABASE_URL); unset: DATABASE_URL.
    database_migration_url: str | None = Field(None, alias="DATABASE_MIGRATION_URL")
    # Which broker answers: "kafka" (Apache Kafka, production) or "tansu" (the Java-less
    # development fallback). Every Tansu workaround keys off this, in shared/tansu.py.
    kafka_broker_kind: Literal["kafka", "tansu"] = Field("kafka", alias="CLMS_BROKER_KIND")
    # Consumer long-poll wait. Apache Kafka answers a waiting fetch as soon as data arrives, so
    # Kafka's default (500) costs no latency there; unset = 500 on Kafka, 20 on Tansu.
    kafka_fetch_max_wait_ms_override: int | None = Field(None, alias="KAFKA_FETCH_MAX_WAIT_MS", ge=1, le=10_000)
    # Idempotent producer (no duplicates from producer retries); unset = on, except on Tansu.
    kafka_enable_idempotence_override: bool | None = Field(None, alias="KAFKA_ENABLE_IDEMPOTENCE")
    kafka_security_protocol: str = Field("PLAINTEXT", alias="KAFKA_SECURITY_PROTOCOL")
    kafka_sasl_mechanism: str | None = Field(None, alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, alias="KAFKA_SASL_PASSWORD")
    kafka_ssl_cafile: str | None = Field(None, alias="KAFKA_SSL_CAFILE")
    kafka_rebalance_timeout_s: float = Field(3.0, alias="KAFKA_REBALANCE_TIMEOUT_S", gt=0)
    kafka_session_timeout_s: float = Field(10.0, alias="KAFKA_SESSION_TIMEOUT_S", gt=0)
    # retention.ms of the event topics on the broker, in hours, when it is finite; unset means
    # kept forever (the registry's retention.ms=-1). Known, it bounds INBOX_RETENTION_HOURS below.
    kafka_topic_retention_hours: float | None = Field(None, alias="KAFKA_TOPIC_RETENTION_HOURS", gt=0)
    # Prefix prepended to every topic and consumer-group name (tests isolate themselves with it).
    topic_prefix: str = Field("", alias="CLMS_TOPIC_PREFIX")
    db_pool_min: int = Field(2, alias="DB_POOL_MIN", ge=1)
    db_pool_max: int = Field(10, alias="DB_POOL_MAX", ge=1)

    # --- embedded development infrastructure ----------------------------------------------
    data_dir: Path = Field(Path(".clms"), alias="CLMS_DATA_DIR")
    embedded_kafka_port: int = Field(9092, alias="CLMS_KAFKA_PORT")
    embedded_postgres_port: int = Field(5433, alias="CLMS_POSTGRES_PORT")
    smtp_sink_port: int = Field(1025, alias="CLMS_SMTP_SINK_PORT")
    smtp_sink_http_port: int = Field(8025, alias="CLMS_SMTP_SINK_HTTP_PORT")

    # --- service ports ----------------------------------------------------------------------
    host: str = Field("127.0.0.1", alias="CLMS_HOST")
    intake_port: int = Field(8001, alias="INTAKE_PORT")
    referral_port: int = Field(8002, alias="REFERRAL_PORT")
    notifications_port: int = Field(8003, alias="NOTIFICATIONS_PORT")
    analytics_port: int = Field(8004, alias="ANALYTICS_PORT")
    workspace_port: int = Field(8005, alias="WORKSPACE_PORT")
    notifications_delivery_port: int = Field(8013, alias="NOTIFICATIONS_DELIVERY_PORT")  # /healthz, /readyz only
    # Where people open the workspace (links in alert e-mails and SMS); unset: http://host:port.
    workspace_url_override: str | None = Field(None, alias="WORKSPACE_URL")
    # The public APIs the workspace calls with the signed-in user's token; unset: host and port.
    workspace_intake_url: str | None = Field(None, alias="WORKSPACE_INTAKE_URL")
    workspace_referral_url: str | None = Field(None, alias="WORKSPACE_REFERRAL_URL")
    workspace_notifications_url: str | None = Field(None, alias="WORKSPACE_NOTIFICATIONS_URL")
    workspace_analytics_url: str | None = Field(None, alias="WORKSPACE_ANALYTICS_URL")
    # Prometheus /metrics is served on its own monitoring port, never on the public API port
    # (exact operational counts are no business of API clients). Unset: API port + 1000
    # (9001-9005); 0: no metrics endpoint at all.
    intake_metrics_port: int | None = Field(None, alias="INTAKE_METRICS_PORT", ge=0, le=65535)
    referral_metrics_port: int | None = Field(None, alias="REFERRAL_METRICS_PORT", ge=0, le=65535)
    notifications_metrics_port: int | None = Field(None, alias="NOTIFICATIONS_METRICS_PORT", ge=0, le=65535)
    notifications_delivery_metrics_port: int | None = Field(None, alias="NOTIFICATIONS_DELIVERY_METRICS_PORT",
                                                            ge=0, le=65535)
    analytics_metrics_port: int | None = Field(None, alias="ANALYTICS_METRICS_PORT", ge=0, le=65535)
    workspace_metrics_port: int | None = Field(None, alias="WORKSPACE_METRICS_PORT", ge=0, le=65535)
    metrics_host: str | None = Field(None, alias="METRICS_HOST")  # unset: CLMS_HOST
    public_base_url: str = Field("http://127.0.0.1", alias="CLMS_PUBLIC_BASE_URL")
    # faust table store of the analytics service: "memory://" (rebuilt from the changelog at
    # start) or "rocksdb://" (needs the rocksdict package, not installed by default).
    analytics_store: str = Field("memory://", alias="ANALYTICS_STORE")
    # faust app id (consumer group and changelog topic names) of the analytics service; a new
    # value is a new deployment that rebuilds every table from the beginning of the topics.
    analytics_app_id: str = Field("analytics", alias="ANALYTICS_APP_ID")
    # The public analytics view (services/analytics/disclosure.py): published every
    # ANALYTICS_PUBLISH_EVERY_S (periods aligned to the epoch: daily = 00:00 UTC), describing the
    # events folded by the period's start, ANALYTICS_PUBLISH_LAG_S after it; never live.
    analytics_publish_every_s: float = Field(86400.0, alias="ANALYTICS_PUBLISH_EVERY_S", gt=0)
    analytics_publish_lag_s: float = Field(3600.0, alias="ANALYTICS_PUBLISH_LAG_S", ge=0)
    # counts 1..SMALL suppressed ("c"), others rounded to a multiple of ROUNDING_BASE, no
    # breakdowns for a municipality with fewer than BREAKDOWN_MIN children
    analytics_small_count: int = Field(5, alias="ANALYTICS_SMALL_COUNT", ge=1)
    analytics_rounding_base: int = Field(5, alias="ANALYTICS_ROUNDING_BASE", ge=1)
    analytics_breakdown_min: int = Field(20, alias="ANALYTICS_BREAKDOWN_MIN", ge=2)

    # --- secrets ----------------------------------------------------------------------------
    jwt_secret: SecretStr = Field(SecretStr(DEV_PLACEHOLDER + "-jwt-secret-32-bytes!"), alias="JWT_SECRET")
    jwt_issuer: str = Field("clms-dev", alias="JWT_ISSUER")
    jwt_audience: str = Field("clms", alias="JWT_AUDIENCE")
    oidc_jwks_url: str | None = Field(None, alias="OIDC_JWKS_URL")
    # The `aud` each service requires; unset: "<JWT_AUDIENCE>-<service>" (clms-intake, ...).
    # Development tokens (`clms token`) carry all four; an OIDC issuer must put the audiences of
    # the services a client calls into its access tokens (the workspace calls all four).
    intake_jwt_audience: str | None = Field(None, alias="INTAKE_JWT_AUDIENCE")
    referral_jwt_audience: str | None = Field(None, alias="REFERRAL_JWT_AUDIENCE")
    notifications_jwt_audience: str | None = Field(None, alias="NOTIFICATIONS_JWT_AUDIENCE")
    analytics_jwt_audience: str | None = Field(None, alias="ANALYTICS_JWT_AUDIENCE")
    # A token whose exp - iat is longer than this is refused (and one without iat).
    max_token_lifetime_s: int = Field(12 * 3600, alias="MAX_TOKEN_LIFETIME_S", ge=60)
    # The issuer's keys are fetched in the background every JWKS_REFRESH_S; a token naming an
    # unknown `kid` triggers at most one extra fetch per JWKS_MIN_REFRESH_S.
    jwks_refresh_s: float = Field(300.0, alias="JWKS_REFRESH_S", gt=0)
    jwks_min_refresh_s: float = Field(30.0, alias="JWKS_MIN_REFRESH_S", ge=0)
    # Verified tokens are remembered (by hash) until they expire, at most this many.
    token_cache_size: int = Field(10_000, alias="TOKEN_CACHE_SIZE", ge=0)
    # --- request guards (shared.guard) -------------------------------------------------------------
    # Bodies over these sizes are refused with 413 before they are read.
    identification_body_limit: int = Field(64 * 1024, alias="IDENTIFICATION_BODY_LIMIT", ge=1024)
    body_limit: int = Field(32 * 1024, alias="BODY_LIMIT", ge=1024)
    # Rate limits (the `limits` library's notation, e.g. "20/minute"; in memory: each replica
    # counts on its own). Failed logins per client address; writes per principal and per address.
    auth_failure_rate_limit: str = Field("20/minute", alias="AUTH_FAILURE_RATE_LIMIT")
    write_rate_limit_principal: str = Field("600/minute", alias="WRITE_RATE_LIMIT_PRINCIPAL")
    write_rate_limit_address: str = Field("3000/minute", alias="WRITE_RATE_LIMIT_ADDRESS")
    # Live streams (SSE): open connections per user and per service process, and how long a
    # stream ticket (POST .../ticket) may wait before it is used (once).
    sse_max_per_user: int = Field(5, alias="SSE_MAX_PER_USER", ge=1)
    stream_ticket_ttl_s: float = Field(30.0, alias="STREAM_TICKET_TTL_S", gt=0, le=300)
    # Workspace sign-in (OpenID Connect authorization code + PKCE); on when issuer and client id are set.
    oidc_issuer: str | None = Field(None, alias="OIDC_ISSUER")
    oidc_client_id: str | None = Field(None, alias="OIDC_CLIENT_ID")
    oidc_client_secret: SecretStr | None = Field(None, alias="OIDC_CLIENT_SECRET")
    oidc_scope: str = Field("openid", alias="OIDC_SCOPE")
    # Keyed HMAC for child_ref pseudonyms; the same key must be used by every intake replica.
    child_ref_key: SecretStr = Field(SecretStr(DEV_PLACEHOLDER + "-child-ref-key"), alias="CHILD_REF_KEY")
    # Master key (urlsafe base64, 32 bytes) wrapping the per-case data keys.
    encryption_master_key: SecretStr = Field(
        SecretStr("ZGV2LW9ubHktY2hhbmdlLW1lLW1hc3Rlci1rZXktMzI="), alias="ENCRYPTION_MASTER_KEY"
    )
    # Several master keys with key ids, "kid:key,kid:key" (the newest last; it wraps new data
    # keys, the older ones still unwrap theirs until `clms keys rotate` re-wrapped them). When
    # set it replaces ENCRYPTION_MASTER_KEY. README, Privacy: rotating the master key.
    encryption_master_keys: SecretStr | None = Field(None, alias="ENCRYPTION_MASTER_KEYS")
    webhook_secret: SecretStr = Field(SecretStr(DEV_PLACEHOLDER + "-webhook"), alias="WEBHOOK_SECRET")
    # Keys the HMAC-SHA256 in intake.idempotency_keys.request_hash, so a dumped row cannot be
    # matched by hashing guessed identifications (names, birth dates). Its own secret: rotating
    # it only makes retries of the last IDEMPOTENCY_RETENTION_H hours look like new bodies.
    idempotency_hmac_key: SecretStr = Field(SecretStr(DEV_PLACEHOLDER + "-idempotency-hmac"),
                                            alias="IDEMPOTENCY_HMAC_KEY")

    # clms.agency-inbound (services/intake/inbound.py, README "Agency systems"): intake's private
    # EC P-256 key (JWK JSON or PEM) for the JWE-encrypted personal part of inbound
    # identifications; required in production, elsewhere derived from ENCRYPTION_MASTER_KEY.
    inbound_jwe_private_key: SecretStr | None = Field(None, alias="INBOUND_JWE_PRIVATE_KEY")
    # YAML registry `senders: {<agency>/<municipality>: [<public JWK>, ...]}` of the keys agency
    # systems sign inbound events with; required in production, elsewhere unset = development
    # keys (shared.inbound.dev_sender_key) for every office.
    inbound_senders_file: Path | None = Field(None, alias="INBOUND_SENDERS_FILE")

    # --- behaviour --------------------------------------------------------------------------
    outbox_poll_interval_s: float = Field(0.05, alias="OUTBOX_POLL_INTERVAL_S", gt=0)
    outbox_batch_size: int = Field(500, alias="OUTBOX_BATCH_SIZE", ge=1)
    # Retention (shared.outbox.run_retention): published outbox rows and inbox dedupe rows older
    # than these windows are removed; 0 keeps them forever. Unpublished outbox rows are never
    # removed. The inbox window must outlast every way an event can be delivered again (see
    # _retention_windows_are_safe and the README, "Outbox and inbox retention").
    outbox_retention_hours: float = Field(168.0, alias="OUTBOX_RETENTION_HOURS", ge=0)
    inbox_retention_hours: float = Field(192.0, alias="INBOX_RETENTION_HOURS", ge=0)
    retention_interval_s: float = Field(3600.0, alias="RETENTION_INTERVAL_S", gt=0)
    retention_batch_size: int = Field(1000, alias="RETENTION_BATCH_SIZE", ge=1, le=100_000)
    log_level: str = Field("INFO", alias="LOG_LEVEL")
    log_json: bool = Field(True, alias="LOG_JSON")

    # --- referral service -------------------------------------------------------------------
    # Routing rule file (YAML); unset = the packaged services/referral/rules.yaml.
    referral_rules_file: Path | None = Field(None, alias="REFERRAL_RULES_FILE")
    # How often the deadline scanner looks for overdue referrals (seconds).
    referral_deadline_poll_s: float = Field(1.0, alias="REFERRAL_DEADLINE_POLL_S", gt=0)

    # --- notifications service ----------------------------------------------------------------
    # SMTP relay for e-mail alerts; SMTP_PORT unset means the local sink (CLMS_SMTP_SINK_PORT).
    smtp_host: str = Field("127.0.0.1", alias="SMTP_HOST")
    smtp_port_override: int | None = Field(None, alias="SMTP_PORT")
    smtp_username: str | None = Field(None, alias="SMTP_USERNAME")
    smtp_password: SecretStr | None = Field(None, alias="SMTP_PASSWORD")
    smtp_starttls: bool = Field(False, alias="SMTP_STARTTLS")
    smtp_timeout_s: float = Field(5.0, alias="SMTP_TIMEOUT_S", gt=0)
    smtp_from: str = Field("CLMS alerts <alerts@clms.example.invalid>", alias="SMTP_FROM")
    # SMS gateway webhook; unset means the local sink's `POST /sms`.
    sms_webhook_url_override: str | None = Field(None, alias="SMS_WEBHOOK_URL")
    notify_max_attempts: int = Field(5, alias="NOTIFY_MAX_ATTEMPTS", ge=1, le=50)
    notify_backoff_base_s: float = Field(1.0, alias="NOTIFY_BACKOFF_BASE_S", gt=0)
    notify_backoff_max_s: float = Field(300.0, alias="NOTIFY_BACKOFF_MAX_S", gt=0)
    # The longest the delivery and re-alert loops sleep: a safety net only. They sleep until the
    # earliest retry, lease end or re-alert falls due, and a commit that records one wakes them.
    notify_poll_interval_s: float = Field(60.0, alias="NOTIFY_POLL_INTERVAL_S", gt=0)
    # How long a replica holds an e-mail/SMS it is delivering before another replica may take it;
    # renewed every third of it while the delivery is in flight, so a slow server never lets a
    # second replica send the same message. A replica that dies frees its deliveries after this.
    notify_lease_s: float = Field(30.0, alias="NOTIFY_LEASE_S", ge=0.3)
    # An unacknowledged referral.created alert is re-sent once, to the office supervisor, after this.
    realert_after_s: float = Field(900.0, alias="REALERT_AFTER_S", gt=0)
    # false: the notifications API/worker process does not send e-mail/SMS; its own process does
    # (`python -m services.notifications.delivery`, started by `clms dev` beside it; issue 18).
    notify_delivery_in_process: bool = Field(True, alias="NOTIFY_DELIVERY_IN_PROCESS")

    # --- intake: Idempotency-Key rows ------------------------------------------------------------
    # A retry with the same Idempotency-Key is recognised for this long; older rows are purged
    # in batches by a background task every IDEMPOTENCY_PURGE_EVERY_S.
    idempotency_retention_h: float = Field(48.0, alias="IDEMPOTENCY_RETENTION_H", gt=0)
    idempotency_purge_every_s: float = Field(300.0, alias="IDEMPOTENCY_PURGE_EVERY_S", gt=0)
    idempotency_purge_batch: int = Field(1000, alias="IDEMPOTENCY_PURGE_BATCH", ge=1)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_safe(cls, v: str) -> str:
        if v and not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("CLMS_TOPIC_PREFIX may contain only letters, digits, '.', '_' and '-'")
        return v

    @model_validator(mode="after")
    def _retention_windows_are_safe(self) -> "Settings":
        """A consumer must never see an event again after its dedupe (inbox) row is gone.

        Events come again (1) when an empty broker is refilled from the outbox (`make run` on
        Tansu replays the outbox rows still kept), so the inbox must keep its rows at least an
        hour longer than the outbox keeps its own (the hour covers an event applied just before
        its outbox row was marked published, and clock skew between databases); (2) when a
        group's offsets go back to the start of a topic, so with a finite topic retention the
        inbox must keep its rows longer than the broker keeps the events."""
        inbox, outbox = self.inbox_retention_hours, self.outbox_retention_hours
        if inbox == 0:
            return self  # dedupe rows kept forever: always safe
        if outbox == 0:
            raise ValueError(
                "INBOX_RETENTION_HOURS must be 0 (keep forever) when OUTBOX_RETENTION_HOURS is 0: every "
                "outbox row can be replayed into an empty broker, so every dedupe row must be kept; "
                f"set OUTBOX_RETENTION_HOURS to at most {inbox - RETENTION_MARGIN_HOURS:g} or INBOX_RETENTION_HOURS=0"
            )
        if inbox < outbox + RETENTION_MARGIN_HOURS:
            raise ValueError(
                f"INBOX_RETENTION_HOURS ({inbox:g}) must be at least OUTBOX_RETENTION_HOURS ({outbox:g}) + "
                f"{RETENTION_MARGIN_HOURS:g}: events replayed from the outbox need their dedupe rows; "
                f"set INBOX_RETENTION_HOURS={outbox + RETENTION_MARGIN_HOURS:g} or more"
            )
        topic = self.kafka_topic_retention_hours
        if topic is not None and inbox <= topic:
            raise ValueError(
                f"INBOX_RETENTION_HOURS ({inbox:g}) must be longer than the broker's topic retention "
                f"(KAFKA_TOPIC_RETENTION_HOURS={topic:g}): a consumer reset to the start of a topic would "
                f"apply events again whose dedupe rows are gone; set INBOX_RETENTION_HOURS above {topic:g}"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_production(self) -> "Settings":
        if self.environment is Environment.production:
            for name in ("jwt_secret", "child_ref_key", "encryption_master_key", "webhook_secret",
                         "idempotency_hmac_key"):
                value = getattr(self, name).get_secret_value()
                if DEV_PLACEHOLDER in value or value == "ZGV2LW9ubHktY2hhbmdlLW1lLW1hc3Rlci1rZXktMzI=":
                    raise ValueError(
                        f"{name.upper()} still holds the development placeholder; set a real secret "
                        "before running with CLMS_ENV=production"
                    )
            keys = self.encryption_master_keys
            if keys is not None and "ZGV2LW9ubHktY2hhbmdlLW1lLW1hc3Rlci1rZXktMzI=" in keys.get_secret_value():
                raise ValueError("ENCRYPTION_MASTER_KEYS still holds the development master key; "
                                 "give every kid a real key before running with CLMS_ENV=production")
        return self

    # --- derived ----------------------------------------------------------------------------
    @property
    def kafka_fetch_max_wait_ms(self) -> int:
        from shared import tansu

        return self.kafka_fetch_max_wait_ms_override or tansu.fetch_max_wait_ms(self)

    @property
    def kafka_enable_idempotence(self) -> bool:
        from shared import tansu

        if self.kafka_enable_idempotence_override is not None:
            return self.kafka_enable_idempotence_override
        return tansu.idempotence_supported(self)

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise RuntimeError(
                "KAFKA_BOOTSTRAP_SERVERS is not set. Start the embedded stack with `make run` "
                "(or `clms dev`), or point KAFKA_BOOTSTRAP_SERVERS at a Kafka broker."
            )
        return self.kafka_bootstrap_servers

    def require_database(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "DATABASE_URL is not set. Start the embedded stack with `make run` "
                "(or `clms dev`), or point DATABASE_URL at a PostgreSQL database."
            )
        return self.database_url

    def metrics_port_for(self, service: str) -> int:
        """The monitoring port of `service` (0 = metrics off)."""
        explicit = getattr(self, f"{service}_metrics_port", None)
        if explicit is not None:
            return explicit
        port = getattr(self, f"{service}_port") + 1000
        return port if port <= 65535 else 0

    def group_id(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def jwt_audience_for(self, service: str) -> str:
        """The `aud` the service `service` requires of a token."""
        return getattr(self, f"{service}_jwt_audience", None) or f"{self.jwt_audience}-{service}"

    @property
    def jwt_audiences(self) -> list[str]:
        """The audiences of the four APIs (development tokens carry them all)."""
        return [self.jwt_audience_for(s) for s in ("intake", "referral", "notifications", "analytics")]

    @property
    def workspace_url(self) -> str:
        return (self.workspace_url_override or f"http://{self.host}:{self.workspace_port}").rstrip("/")

    def api_url(self, service: str) -> str:
        """Base URL of a public API (intake, referral, notifications, analytics) as the workspace
        calls it."""
        given = getattr(self, f"workspace_{service}_url")
        return (given or f"http://{self.host}:{getattr(self, f'{service}_port')}").rstrip("/")

    @property
    def smtp_port(self) -> int:
        return self.smtp_port_override or self.smtp_sink_port

    @property
    def sms_webhook_url(self) -> str:
        return self.sms_webhook_url_override or f"http://127.0.0.1:{self.smtp_sink_http_port}/sms"


def operator_settings() -> Settings:
    """Settings for operator commands (`clms ...` and each service's `cli.app`): the environment,
    else the embedded broker and database that `make run` starts."""
    s = Settings()
    updates = {}
    if not s.kafka_bootstrap_servers:
        updates["kafka_bootstrap_servers"] = f"127.0.0.1:{s.embedded_kafka_port}"
    if not s.database_url:
        updates["database_url"] = f"postgresql://postgres@127.0.0.1:{s.embedded_postgres_port}/postgres"
    return s.model_copy(update=updates) if updates else s
