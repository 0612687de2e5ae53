"""A seeded synthetic workload of chat clients, for `tally run`, tests and benchmarks.

The same seed gives the same events, byte for byte, whatever the machine. Its population is
a realistic mix: browser clients (desktop and mobile web, with referrers) and desktop apps,
several versions on the stable, beta and nightly channels, consent choices, login failures,
and a share of clients on poor networks whose calls have high latency and loss and drop more
often. ``sender_of`` says which real path an event takes: login outcomes come from the auth
server (the Kafka SDK), everything else from the client (HTTP to the collector).
"""

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schemas.events import (
    ClientInfoV1,
    Envelope,
    LoginV1,
    LogoutV1,
    QualitySampleV2,
    SessionEndV1,
    SessionStartV1,
)

USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/16.6 Mobile/15E148 Safari/604.1",
)
PUBLIC_IPS = (
    "81.2.69.160", "8.8.8.8", "1.1.1.1", "5.9.0.1", "185.60.216.35", "133.11.0.1",
    "41.0.0.1", "195.154.0.1", "91.198.174.192", "190.0.0.1", "2a00:1450:4001:82a::200e",
)  # fmt: skip
REFERRERS = (
    None, None, "https://www.example.org/blog/post?id=7", "https://news.example.com/a/b",
    "https://search.example.net/?q=video+chat",
)  # fmt: skip
PLATFORMS = ("windows", "macos", "linux", "ios", "android", "ios")
KINDS = ("desktop", "desktop", "desktop", "browser", "browser", "browser")
"""What each user agent above is: the first three are the desktop app's hosts, the rest
mobile browsers; desktop user agents are also used by browser clients (see make_clients)."""
VERSIONS = ("4.2.1", "4.2.0", "4.1.7", "4.3.0-beta.2", "4.4.0-nightly.20261128")
APP_IDS = {"browser": "conferendo.web", "desktop": "conferendo.desktop"}
"""The app each kind of client is: one key each at the collector."""
POOR_NETWORK_SHARE = 0.15


def channel_of(version: str) -> str:
    """The release channel a version string belongs to."""
    for channel in ("beta", "nightly"):
        if channel in version:
            return channel
    return "stable"


def sender_of(event: Envelope) -> str:
    """``"server"`` for events the auth server sends (login outcomes, over Kafka), else
    ``"client"`` (over HTTP to the collector)."""
    return "server" if event.event_type == "login" else "client"


@dataclass(frozen=True)
class Client:
    """One simulated installation: what it runs on, where it is, what its user allows."""

    user_id: str
    kind: str
    """``"browser"`` or ``"desktop"``."""
    user_agent: str
    platform: str
    ip: str
    referrer: str | None
    version: str
    consent: str
    poor_network: bool


def make_clients(rng: random.Random, count: int) -> list[Client]:
    clients = []
    for n in range(count):
        ua = rng.randrange(len(USER_AGENTS))
        consent = rng.choices(("full", "anonymous", "none"), weights=(80, 15, 5))[0]
        kind = KINDS[ua] if rng.random() < 0.6 else "browser"
        clients.append(
            Client(
                user_id=f"user-{n:05d}",
                kind=kind,
                user_agent=USER_AGENTS[ua],
                platform=PLATFORMS[ua] if kind == "desktop" else "web",
                ip=rng.choice(PUBLIC_IPS),
                referrer=rng.choice(REFERRERS) if kind == "browser" else None,
                version=rng.choices(VERSIONS, weights=(40, 25, 15, 12, 8))[0],
                consent=consent,
                poor_network=rng.random() < POOR_NETWORK_SHARE,
            )
        )
    return clients


def _client_events(rng: random.Random, client: Client, start_ms: int) -> Iterator[Envelope]:
    """One client's visit: start-up, login (sometimes failing first), calls, logout."""
    envelope = {
        "schema_version": 1,
        "app_id": APP_IDS[client.kind],
        "channel": channel_of(client.version),
        "software_version": client.version,
        "consent": client.consent,
        "user_id": None if client.consent == "none" else client.user_id,
        "user_agent": client.user_agent,
        "ip": client.ip,
        "referrer": None if client.consent == "none" else client.referrer,
    }

    def make(model: type[Envelope], at_ms: int, **fields: Any) -> Envelope:
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return model.model_validate(
            {**envelope, "event_id": event_id, "client_time_ms": at_ms, **fields}
        )

    t = start_ms
    yield make(ClientInfoV1, t, event_type="client_info", platform=client.platform,
               screen_class=rng.choice(("medium", "large", "xlarge")))  # fmt: skip
    if rng.random() < 0.12:
        t += rng.randrange(2_000, 30_000)
        yield make(LoginV1, t, event_type="login", outcome="failure", auth_method="password",
                   failure_reason=rng.choice(("bad_credentials", "mfa_failed", "network_error",
                                              "locked")))  # fmt: skip
    t += rng.randrange(2_000, 30_000)
    yield make(LoginV1, t, event_type="login", outcome="success",
               auth_method=rng.choice(("password", "sso", "token")))  # fmt: skip
    for _ in range(rng.randrange(0, 3)):
        session_id = f"s-{rng.getrandbits(48):012x}"
        kind = rng.choices(("video", "audio", "text"), weights=(60, 25, 15))[0]
        t += rng.randrange(5_000, 120_000)
        started = t
        yield make(SessionStartV1, t, event_type="session_start", session_id=session_id,
                   session_kind=kind,
                   participants_bucket=rng.choice(("2", "3-5", "6-10", "11+")))  # fmt: skip
        poor = client.poor_network
        base_rtt = rng.uniform(150, 600) if poor else rng.uniform(20, 180)
        for _ in range(rng.randrange(1, 5)):
            t += 10_000
            yield make(
                QualitySampleV2, t, event_type="quality_sample", schema_version=2,
                session_id=session_id,
                rtt_ms=round(base_rtt * rng.uniform(0.8, 1.5), 1),
                jitter_ms=round(rng.uniform(20, 120) if poor else rng.uniform(1, 30), 1),
                packet_loss_pct=round(min(100.0, rng.expovariate(0.2 if poor else 1.5)), 2),
                bitrate_kbps=round(rng.uniform(300, 2500) if kind == "video" else 48.0, 0),
                frame_rate=30.0 if kind == "video" else None,
                resolution_class=rng.choice(("360p", "720p", "1080p")) if kind == "video" else None,
                network_type=rng.choice(("wifi", "cellular") if poor
                                        else ("wifi", "ethernet", "cellular")),
                mos=round(rng.uniform(2.5, 4.6), 2),
                codec=rng.choice(("vp9", "h264", "av1")) if kind == "video" else "opus",
            )  # fmt: skip
        t += rng.randrange(5_000, 600_000)
        dropped = rng.random() < (0.25 if poor else 0.04)
        yield make(SessionEndV1, t, event_type="session_end", session_id=session_id,
                   end_reason="dropped" if dropped else "normal",
                   error_code="ICE_TIMEOUT" if dropped else None,
                   duration_ms=t - started)  # fmt: skip
    t += rng.randrange(5_000, 60_000)
    yield make(LogoutV1, t, event_type="logout",
               logout_reason=rng.choice(("user", "user", "timeout")))  # fmt: skip


def generate_workload(
    *, seed: int, clients: int, events: int, end_ms: int, span_ms: int
) -> list[Envelope]:
    """About ``events`` events from ``clients`` clients, with client times spread over the
    ``span_ms`` before ``end_ms``, in client-time order."""
    rng = random.Random(seed)
    population = make_clients(rng, clients)
    out: list[Envelope] = []
    while len(out) < events:
        client = rng.choice(population)
        start = end_ms - span_ms + rng.randrange(span_ms)
        out.extend(e for e in _client_events(rng, client, start) if e.client_time_ms <= end_ms)
    out = out[:events]
    out.sort(key=lambda e: e.client_time_ms)
    return out
