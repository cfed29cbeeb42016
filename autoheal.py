"""autoheal: a self-healing companion for Prometheus and Alertmanager.

Alertmanager posts its webhook to autoheal.  For each alert that opted in (annotation
``autoheal: "true"``) and whose alertname is in the action map (the allowlist), autoheal
respects a per-alertname cooldown and a global hourly budget, then runs the remediation, in
dry-run unless told otherwise.  One click on an "Acknowledge 30m | 2h | 24h" link in a Slack
alert becomes an exact silence in Alertmanager.  Everything is counted as Prometheus metrics
and recorded in an audit history.

Usage:
    python3 autoheal.py            serve on AUTOHEAL_HOST:AUTOHEAL_PORT
    python3 autoheal.py --check    exit 0 if the local instance answers "status": "ok" (health check)
    python3 autoheal.py --smoke [--url URL] [--alertmanager URL] [--prometheus URL]
                                   check a live deployment, one PASS/FAIL line per check
    python3 autoheal.py --control "<command>" [--reason TEXT] [--url URL]
                                   send one runtime control command (token from AUTOHEAL_ADMIN_TOKEN)
    python3 autoheal.py --notify-test   send a test message to each notification channel
    python3 autoheal.py --help     this text
    python3 autoheal.py --version

Environment (booleans take true/false/1/0/yes/no/on/off in any case; a bad value stops the start
with exit status 2 and one line naming the variable):
    AUTOHEAL_ENABLED=false               master switch
    AUTOHEAL_DRY_RUN=true                log and count, never execute
    ALERTMANAGER_URL=http://alertmanager:9093   where silences are created (a cluster: its members,
                                         comma-separated; each call goes to the first that answers)
    AUTOHEAL_PUBLIC_URL=http://localhost:9009   base of the ack links it reports
    AUTOHEAL_ALERTMANAGER_PUBLIC_URL=unset   where people reach Alertmanager's UI (ack pages link
                                         there); unset: ALERTMANAGER_URL
    AUTOHEAL_HOST=0.0.0.0                listen address
    AUTOHEAL_PORT=9009                   listen port (0: any free port, logged at start)
    AUTOHEAL_DEFAULT_COOLDOWN_SEC=600    cooldown of an action with none of its own
    COOLDOWN_TCP_DOWN_SEC=default        cooldown of TcpEndpointDownFast
    COOLDOWN_UPTIME_FAIL_SEC=default     cooldown of UptimeProbeFailing
    COOLDOWN_SCRAPE_STALE_SEC=default    cooldown of CrmMetricsScrapeStale
    AUTOHEAL_ACTIONS_FILE=unset          JSON (or, on Python 3.11+, .toml) file replacing the action map
    AUTOHEAL_ACTION_TIMEOUT_SEC=60       timeout of an action with none of its own
    AUTOHEAL_MAX_ACTIONS_PER_HOUR=20     global budget of runs (dry-run included) per rolling hour; 0 = off
    AUTOHEAL_MAX_CONCURRENT_ACTIONS=8    commands running at once, across all requests
    AUTOHEAL_STATE_FILE=autoheal-state.db   SQLite file for cooldowns and history; empty = memory only
    AUTOHEAL_HISTORY_MAX_EVENTS=100000   events kept in each retention class of the history
    AUTOHEAL_HISTORY_MAX_BYTES=default   bytes the history may hold (half per class): 268435456 in the
                                         state file, 33554432 in memory only
    AUTOHEAL_WEBHOOK_TOKEN=unset         when set, POST /alert needs "Authorization: Bearer <token>"
    AUTOHEAL_ACK_TOKEN=unset             when set, /ack needs token=<token> in its query
    AUTOHEAL_HEAL_GRACE_SEC=600          after an action ran, how long autoheal waits for its alert to resolve
                                         before it records that it did not heal
    AUTOHEAL_ADMIN_TOKEN=unset           when set, POST /control takes "Authorization: Bearer <token>";
                                         unset, runtime control over HTTP is off (403)
    AUTOHEAL_SLACK_SIGNING_SECRET=unset  when set, POST /slack/command verifies Slack's signature with it;
                                         unset, the Slack door is off (403)
    AUTOHEAL_SLACK_ADMINS=unset          Slack user ids (comma-separated) that may change settings;
                                         anyone else in the workspace may run status and help
    AUTOHEAL_SLACK_RESPONSE_URL_PREFIX=https://hooks.slack.com/   the only response_url answers go to
    AUTOHEAL_ALLOWED_HOSTS=unset         host names a browser may reach autoheal by, comma-separated, beside
                                         IP addresses, localhost and AUTOHEAL_PUBLIC_URL's host (else 421)
    AUTOHEAL_ACK_MAX_DURATION=7d         longest silence an ack may create
    AUTOHEAL_ALERTMANAGER_TIMEOUT_SEC=5  bound on each call to Alertmanager
    AUTOHEAL_MAX_BODY_BYTES=1048576      larger request bodies get 413
    AUTOHEAL_REQUEST_TIMEOUT_SEC=10      a request must arrive whole within this; idle connections close
    AUTOHEAL_MAX_CONNECTIONS=512         open connections; past it the longest-idle one is dropped
    AUTOHEAL_WORKERS=16                  webhooks handled at once (acks, control and the rest: pools of their own)
    AUTOHEAL_MAX_EVENT_LISTENERS=16      GET /events streams at once
    AUTOHEAL_EVENTS_HEARTBEAT_SEC=15     comment line sent to idle /events listeners
    AUTOHEAL_SHUTDOWN_GRACE_SEC=10       on SIGTERM, how long in-flight actions may finish
    AUTOHEAL_ETCD_ENDPOINTS=unset        replicas: etcd v3 members (http:// or https://, comma-separated)
                                         that share cooldowns, the budget and runtime control; unset:
                                         one process, its state in AUTOHEAL_STATE_FILE
    AUTOHEAL_ETCD_PREFIX=/autoheal/      the keys of this deployment in etcd
    AUTOHEAL_ETCD_TIMEOUT_SEC=2          bound on each exchange with etcd, all members together; past it
                                         (or without quorum) alerts get error/coordination_unavailable
    AUTOHEAL_ETCD_CA_FILE=unset          CA bundle that signs the members' certificates (https://)
    AUTOHEAL_ETCD_CERT_FILE=unset        client certificate, for etcd's --client-cert-auth
    AUTOHEAL_ETCD_KEY_FILE=unset         its private key (unset: in the certificate file)
    AUTOHEAL_ETCD_USER=unset             etcd user (its token is taken again when it expires)
    AUTOHEAL_ETCD_PASSWORD=unset         that user's password
    AUTOHEAL_REPLICA=<host name>         this replica's name, in each event of its history ("replica")
    DOCKER_HOST=unix:///var/run/docker.sock   Docker Engine API of docker_api actions (or tcp://host:port)
    DOCKER_TLS_VERIFY=unset              set: tcp:// Docker hosts over TLS, with DOCKER_CERT_PATH's
    DOCKER_CERT_PATH=~/.docker           ca.pem (verifies the daemon), cert.pem and key.pem (ours)
    COMPOSE_PROJECT_NAME=unset           docker compose restart acts within this project only
    AUTOHEAL_NOTIFY_SLACK_URL=unset      a Slack incoming webhook told what autoheal did (a secret)
    AUTOHEAL_NOTIFY_WEBHOOK_URLS=unset   JSON receivers, comma-separated, told the same (secrets)
    AUTOHEAL_NOTIFY_ON=unset             only these kinds or results (run, heal, control, not_healed, ...)
    AUTOHEAL_NOTIFY_MAX_PENDING=1000     messages waiting per channel; past it the oldest are dropped
    AUTOHEAL_APPROVAL_TIMEOUT_SEC=900    an approval nobody answers within this closes as expired

Endpoints:
    GET  /                 status: enabled, dry_run, actions, cooldowns, public_base_url, version
    GET  /metrics          Prometheus text exposition 0.0.4
    POST /alert            Alertmanager webhook (version 4); one result per alert, in payload order
    GET  /ack              ?labels=<JSON object>&duration=30m&comment=<text>[&runbook=<url>][&token=]
                           creates (or reuses) an exact-match silence; HEAD and link previews create nothing
    POST /ack/undo         silence_id=<id> (or id=<history id of an ack>)[&token=]: expires a
                           silence that autoheal created
    GET  /history          ?limit=N&alertname=X&kind=K&result=R&since=<unix, RFC 3339 or age such as 10m>:
                           recorded events, newest first; an unknown parameter is a 400
    POST /control          {"command": "disable 1h", "reason": "...", "by": "..."} with the admin token:
                           runtime control (commands: status, help, enable, disable [DURATION],
                           dry-run on|off, cooldown NAME DURATION|default, rearm NAME [LABELS],
                           disable NAME [DURATION], enable NAME, undo [ID], reset)
    POST /slack/command    the same commands as a Slack slash command (/autoheal <command>)
    POST /slack/interact   Slack's buttons on autoheal's messages (Ack 30m/2h/24h, Pause NAME 1h)
    GET  /events           Server-Sent Events: "id: <history id>" and "data: <JSON>" per new event;
                           a client reconnecting with Last-Event-ID first gets what it missed

Actions with "docker_api": true (the built-in ones) are "docker restart NAME..." or "docker
compose restart SERVICE..." carried out through the Docker Engine API (API 1.41, no docker CLI
needed).  Every other action runs as an argument vector, never through a shell; the alert
reaches the command only through environment variables: AUTOHEAL_ALERTNAME,
AUTOHEAL_FINGERPRINT, AUTOHEAL_LABEL_<NAME>, AUTOHEAL_ANNOTATION_<NAME> (names upper-cased,
every character outside A-Z0-9_ turned into _).  A command past its timeout is killed with its
whole process group.

Run from bytecode (python3 -m autoheal, as the Docker image does) it starts about 30 ms faster:
a script given by path is compiled at every start.
"""
from __future__ import annotations

# Where things go (the seams), for whoever adds the next feature (the tests of "The module's shape"
# check what can be checked):
#   a new endpoint      one row in ROUTES (methods, pool, token, cross-site guard, HTML errors, answered
#                       inline) and a Handler.route_<name> that turns HTTP into typed arguments for the
#                       app; the app's parts answer in domain terms (Unknown, Forbidden, PeerError),
#                       never HttpError.  A pool is a row of POOLS.
#   a new setting       a Config field parsed in Config.from_env (bounded, named in --help and the
#                       README).  If it may change at runtime: a field of Settings, built in
#                       Control._build_settings (from the overrides), planned in Control._plan (a verb
#                       of COMMAND_PARSERS), read through Control.effective, shown by App.status.
#   a new gate          judge() when it reads only the alert and the settings; anything exclusive
#                       (a cooldown, a budget slot) behind one claim() of the claims object
#                       (LocalClaims in one process; EtcdClaims for replicas, which answer the same
#                       way, or raise CoordinationUnavailable: the alert fails closed).  A claim lost
#                       for a new reason: a row of CLAIM_REASONS and its branch in Decision.settle.
#   shared state        replicas share through etcd only what must agree (claims; the control state
#                       under compare-and-swap, SharedControl); the rest stays per replica in its Store.
#   a new job           a class of its own with its own lock (Journal, EventFeed, Control, HealTracker,
#                       Acknowledgements, Notifier, Exposition), wired together in App.__init__.
#   a new metric        one row in METRICS.  A counter's values live in App.counters (Counters) under
#                       the family's name, its preset series in the row, its samples come by its
#                       labels; any other family's samples are named in Exposition._samples.
#   a new event kind    a row of EVENT_KINDS (its results), events built by make_event (which refuses
#                       an unknown kind) and recorded through Journal.record; retention_class says
#                       if a storm may evict it.
#   a new storage       a Store subclass (MemoryStore, SqliteStore): every abstract method of Store;
#                       App._open_store picks it.
#
# Contents (the banners below, in this order; test_the_contents_match_the_banners checks it):
#    1. Constants
#    2. Configuration
#    3. Errors
#    4. Pure helpers: time, JSON input, environment names, logging
#    5. The exposition: metric families, counters and the text format
#    6. The action runner
#    7. Outgoing HTTP and Docker actions
#    8. The state store: cooldowns and the audit history
#    9. Alertmanager's silences API
#   10. The command language: one for POST /control, --control and the Slack slash command
#   11. Claims: cooldowns and the hourly budget
#   12. Coordination in etcd: replicas share cooldowns, the budget and runtime control
#   13. Judging and recording: decisions, events, the journal, the /events feed
#   14. Runtime control: overrides, undo, lapses
#   15. Did it heal? Verdicts on runs, and escalation
#   16. Acknowledgements: silences in Alertmanager
#   17. Telling people: notifications to Slack and webhooks, and Slack's buttons
#   18. The application: the parts, wired together, and the webhook's path through them
#   19. Pages for people
#   20. Reading requests: HTTP/1.1 framing and parsing
#   21. The HTTP handler: routes, and what each answers
#   22. The server
#   23. Command line

__version__ = "0.1.0"

import os
import sys

DEFAULT_PORT = 9009


def check(env: "Mapping[str, str]", timeout: float = 2.0) -> int:
    """--check: 0 when the local instance answers GET / with "status": "ok", else 1."""
    raw_port = env.get("AUTOHEAL_PORT", str(DEFAULT_PORT)).strip()
    if not (raw_port.isascii() and raw_port.isdigit() and len(raw_port) <= 5) or not 1 <= int(raw_port) <= 65535:
        print("unhealthy: AUTOHEAL_PORT is not a port", file=sys.stderr)
        return 1
    port = int(raw_port)
    host = env.get("AUTOHEAL_HOST", "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "::1" if host in ("::", "[::]") else "127.0.0.1"
    # socket's C half, as socket.create_connection uses it: the socket module's own imports
    # (selectors, enum) were a fifth of the whole probe (7 ms).
    import _socket

    chunks: list = []
    try:
        addresses = _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)
        for index, (family, kind, proto, _name, address) in enumerate(addresses):
            sock = _socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
            except OSError:
                sock.close()
                if index == len(addresses) - 1:
                    raise  # the last address's error is the answer
                continue
            try:
                sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: autoheal-check\r\n\r\n".encode("ascii"))
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            finally:
                sock.close()
            break
    except OSError as exc:
        print(f"unhealthy: {host}:{port}: {exc}", file=sys.stderr)
        return 1
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    # autoheal's own answer starts so (App.status, written by json.dumps); reading it without
    # importing json keeps the check within its budget.
    healthy = head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")) and body.startswith(b'{"status": "ok"')
    if not healthy:
        print(f"unhealthy: {host}:{port} did not answer \"status\": \"ok\"", file=sys.stderr)
    return 0 if healthy else 1


# The Docker health check runs every few seconds and asks one question, so it is answered here,
# before the imports only the server needs: the whole process has a budget of 40 ms (issue 8),
# most of which goes to starting the interpreter and compiling this file.
if __name__ == "__main__" and sys.argv[1:2] == ["--check"]:
    raise SystemExit(check(os.environ))

import abc  # noqa: E402 - after the health check's early exit, on purpose (loaded by collections anyway)
import collections  # noqa: E402
import contextlib
import gc
import itertools
import json
import math
import operator
import queue
import re
import selectors
import shlex
import socket
import signal
import sqlite3
import threading
import time

TYPE_CHECKING = False  # importing typing costs every start 2 ms and 0.6 MiB: type checkers only
if TYPE_CHECKING:
    import subprocess  # imported for real where commands run (run_command)
    from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple, Union


def record_type(cls: type) -> type:
    """typing.NamedTuple's class syntax without typing: the annotated names are the fields, in
    order, their values the defaults (trailing ones only, as there); methods and the docstring stay."""
    namespace = dict(vars(cls))
    fields = tuple(cls.__annotations__)
    defaults = [namespace.pop(name) for name in fields if name in namespace]
    if any(name in vars(cls) for name in fields[:len(fields) - len(defaults)]):
        raise TypeError(f"{cls.__name__}: a field without a default follows one with a default")
    for name in ("__dict__", "__weakref__"):
        namespace.pop(name, None)
    base = collections.namedtuple(cls.__name__, fields, defaults=defaults, module=cls.__module__)
    return type(cls.__name__, (base,), dict(namespace, __slots__=()))

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

DEFAULT_STATE_FILE = "autoheal-state.db"

# The results a decision can have once the alert reached its action (README: "What happens to each alert"),
# plus rate_limited (the global budget).  Every allow-listed alertname has a counter for each.
ACTION_RESULTS = ("executed", "failed", "dry_run", "cooldown_skip", "error", "rate_limited", "awaiting_approval")
APPROVAL_RESULTS = ("approved", "denied", "expired")  # how an approval closes (it opens "opened")
SKIP_REASONS = ("resolved", "not_opted_in", "not_allowlisted", "disabled", "missing_label", "target_refused")
ACK_OUTCOMES = ("created", "existing", "extended", "previewed", "error")
HEAL_RESULTS = ("healed", "not_healed", "acknowledged", "unknown")
# A dry-run decision's verdict: what healing would have addressed (never counted as a heal).
DRY_RUN_VERDICTS = {"healed": "resolved_by_itself", "not_healed": "still_firing", "acknowledged": "still_firing",
                    "unknown": "unknown"}
PRESET_REJECTIONS = (("/alert", 400), ("/alert", 401), ("/alert", 413), ("/ack", 400), ("/ack", 403))
CONTROL_RESULTS = ("applied", "refused", "invalid", "throttled", "unavailable")
CONTROL_SOURCES = ("http", "slack", "page", "cli", "autoheal")

BUILTIN_ACTIONS = (
    # alertname, command, environment variable holding its cooldown
    ("CrmMetricsScrapeStale", "docker restart crm-api", "COOLDOWN_SCRAPE_STALE_SEC"),
    ("TcpEndpointDownFast", "docker restart crm-api", "COOLDOWN_TCP_DOWN_SEC"),
    ("UptimeProbeFailing", "docker compose restart grafana prometheus", "COOLDOWN_UPTIME_FAIL_SEC"),
)

# Docker 20.10 speaks API 1.41, and every newer engine still serves it.
DOCKER_API_VERSION = "1.41"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DEFAULT_COOLDOWN_BY = ("alertname",)
DOCKER_IDLE_MAX = 4  # kept connections per Docker daemon
DOCKER_IDLE_SEC = 30.0  # a kept connection unused this long is closed
DOCKER_HOSTS_MAX = 256  # Docker daemons with a client kept
# {label:NAME} in a command's argument or an action's docker_host: that label's value, checked.
PLACEHOLDER = re.compile(r"\{label:([a-zA-Z_][a-zA-Z0-9_]*)\}")
TARGET_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # what a substituted value may hold

OUTPUT_TAIL_BYTES = 4096
MAX_REQUEST_LINE = 8192
MAX_HEAD_BYTES = 16384
HISTORY_LIMIT_MAX = 1000
HISTORY_PARAMETERS = ("limit", "alertname", "kind", "result", "since", "before")
HISTORY_MAX_BYTES = 4 << 20  # a /history answer stops before this, with a cursor to go on (before)
REPLAY_EVENTS = 64  # events one /events listener replays from the history at a time (at most 1 MiB)
FEED_MAX_BYTES = 4 << 20  # the /events feed in memory keeps the newest events up to this many bytes
# The history's retention classes (Store): routine decisions, which a storm repeats, are kept
# apart from everything that matters, so that they can never evict it.
KEPT, ROUTINE = 0, 1
RETENTION_CLASSES = ("kept", "routine")
ROUTINE_RESULTS = ("cooldown_skip", "skipped", "rate_limited")
MAX_EVENT_BYTES = 16384  # a recorded event larger than this has its long values cut (bound_event)
MAX_VALUE_CHARS = 1024
MAX_EVENT_LABELS = 64
MEMORY_ROW_OVERHEAD = 300  # bytes a memory-only history row costs beside its text
FOLD_KEYS_MAX = 4096  # routine decisions whose repeats are being folded, at most
RECORD_CHUNK = 500
CHECKPOINT_BYTES = 1 << 17  # history committed to the WAL that starts a checkpoint (SqliteStore)
CHECKPOINT_BULK_ROWS = 100  # a commit of this many events starts none (SqliteStore._commit)
TRIM_AFTER_BYTES = 1 << 20  # a request this large gives its memory back once answered (Server._work)
INLINE_MAX_BYTES = 65536  # a dry-run webhook up to this size is answered by the selector thread (Server)
BUDGET_WINDOW_SEC = 3600  # the global action budget counts runs in a rolling hour
COORDINATION_POLL_SEC = 0.25  # replicas: how often each reads the shared state in etcd
CONTROL_CAS_ATTEMPTS = 5  # replicas: a change planned again when another replica's landed first
MAX_UNDOABLE_CHANGES = 1000  # the control state keeps the last changes undo can take back, no more
RUNS_PER_TXN = 64  # replicas: run records written in one etcd transaction (etcd takes 128 operations)
LEASE_REUSE_SEC = 0.5  # replicas: a lease asked for this recently serves further claims of its length
KEEPALIVE_SKIP_SEC = 1.0  # replicas: an action starting this soon after its lease was asked for needs no keepalive
CHANGE_UIDS_KEPT = 100  # replicas: the unique ids of the latest changes, by which a retry finds its own
REFUSALS_PER_MINUTE = 3  # refused attempts (a wrong token) one client may make before it gets 429

# The level of a recorded event's log line, by its result; everything else is "info".
_EVENT_LEVELS = {"failed": "warning", "error": "error", "not_healed": "warning"}

# One compact encoder for every recorded event: json.dumps with separators would build a new
# encoder for each call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def _compact_encoder() -> Callable[[Any], str]:
    """_COMPACT_JSON.encode without its Python frames around the C encoder, which it makes anew
    for every call: 2.6 instead of 3.6 us an event, 5 ms of a storm of 5,000.  The same text
    (checked here once); _COMPACT_JSON.encode itself where the C encoder is missing."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _COMPACT_JSON.encode
    encoder = make(None, _COMPACT_JSON.default, json.encoder.encode_basestring_ascii, None, ":", ",", False,
                   False, True)
    sample = {"a": [1, 2.5, None, True, "\u00e9\n"], "b": {"c": ""}}

    def encode(document: Any) -> str:
        chunks = encoder(document, 0)
        return chunks if isinstance(chunks, str) else "".join(chunks)

    return encode if encode(sample) == _COMPACT_JSON.encode(sample) else _COMPACT_JSON.encode


compact_json = _compact_encoder()
# A string as JSON (ASCII, as compact_json writes it), straight from the C function where there is one.
_json_string: Callable[[str], str] = (getattr(json.encoder, "c_encode_basestring_ascii", None)
                                      or json.encoder.encode_basestring_ascii)

# Link-preview robots fetch every URL posted in a chat to render a card.  They must never
# create a silence.  Slack identifies itself as "Slackbot-LinkExpanding" (and "Slackbot" for
# others), Teams as "SkypeUriPreview" or "MicrosoftPreview", and so on.  Only robots' names:
# the in-app browsers of Slack ("Slack/...") and Teams ("Teams/...") are people clicking.
PREVIEW_AGENTS = re.compile(
    r"slackbot|slack-imgproxy|skypeuripreview|microsoftpreview|discordbot|telegrambot|"
    r"facebookexternalhit|facebot|twitterbot|whatsapp|linkedinbot|mattermost-bot|"
    r"embedly|iframely|redditbot|applebot|bingpreview",
    re.IGNORECASE,
)

_DURATION = re.compile(
    r"^(?:([0-9]{1,9})y)?(?:([0-9]{1,9})w)?(?:([0-9]{1,9})d)?(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})s)?"
    r"(?:([0-9]{1,9})ms)?$"
)
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# Upper bounds of every duration setting, checked at start: a value past them would overflow a
# timer or a date at run time (1e10 s of timeout is an OverflowError in socket.settimeout).
MAX_COOLDOWN_SEC = 366 * 86400.0
MAX_ACTION_TIMEOUT_SEC = 86400.0
MAX_PEER_TIMEOUT_SEC = 3600.0
MAX_DURATION_SEC = 366 * 86400.0
MAX_ACTIONS_FILE_BYTES = 1 << 20
_RFC3339 = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?(Z|z|[+-][0-9]{2}:[0-9]{2})$"
)
_ENV_NAME_UNSAFE = re.compile(r"[^A-Z0-9_]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The environment or the actions file is invalid; the message names every problem."""


@record_type
class Action:
    """One entry of the action map: what to run for an alertname."""

    alertname: str
    argv: Tuple[str, ...]
    display: str
    cooldown_sec: float
    timeout_sec: float
    docker_api: bool = False
    escalate: Tuple[Any, ...] = ()  # further steps (Action each) when a run does not heal
    give_up_after: Optional[int] = None  # not_healed verdicts in a row that switch the action off
    cooldown_by: Tuple[str, ...] = ("alertname",)  # the labels whose values key a cooldown (a target)
    targets: Tuple[str, ...] = ()  # glob patterns every {label:NAME} value of the command must match
    docker_host: Optional[str] = None  # this action's Docker engine (else DOCKER_HOST), maybe a template
    docker_hosts: Tuple[str, ...] = ()  # glob patterns a {label:NAME} value in docker_host must match
    approve: bool = False  # a person approves each run first (approve ID / deny ID, Slack's buttons)
    fleet: bool = False  # per_target or templated: judge() reads the target from the labels

    @property
    def per_target(self) -> bool:
        """Whether its cooldowns are per target (cooldown_by names more than the alertname)."""
        return self.cooldown_by != DEFAULT_COOLDOWN_BY

    @property
    def templated(self) -> bool:
        """Whether its command or Docker host takes values from the alert's labels."""
        return bool(self.targets or self.docker_hosts)

    @property
    def stop_timeout_sec(self) -> int:
        """Docker's stop timeout for a restart: min(10, timeout - 5), so the timeout always exceeds it."""
        return max(0, min(10, int(self.timeout_sec) - 5))


@record_type
class Config:
    """Every setting of autoheal, parsed and validated once from the environment.

    A named tuple (record_type) rather than a frozen dataclass: as immutable and as typed, without
    importing dataclasses (which imports inspect, about 12 ms of a 70 ms start-up budget).
    """

    enabled: bool = False
    dry_run: bool = True
    alertmanager_url: str = "http://alertmanager:9093"
    public_url: str = "http://localhost:9009"
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    default_cooldown_sec: float = 600.0
    action_timeout_sec: float = 60.0
    actions_file: Optional[str] = None
    actions: Mapping[str, Action] = {}
    max_actions_per_hour: int = 20
    max_concurrent_actions: int = 8
    state_file: str = DEFAULT_STATE_FILE
    state_file_explicit: bool = False
    history_max_events: int = 100000
    history_max_bytes: Optional[int] = None  # None: 256 MiB in the state file, 32 MiB in memory
    webhook_token: Optional[str] = None
    ack_token: Optional[str] = None
    ack_max_duration_sec: float = 7 * 86400.0
    alertmanager_timeout_sec: float = 5.0
    max_body_bytes: int = 1048576
    request_timeout_sec: float = 10.0
    max_connections: int = 512
    workers: int = 16
    max_event_listeners: int = 16
    events_heartbeat_sec: float = 15.0
    shutdown_grace_sec: float = 10.0
    docker_host: str = DEFAULT_DOCKER_HOST
    docker_tls: Optional[Tuple[str, str, str]] = None  # DOCKER_TLS_VERIFY: ca.pem, cert.pem, key.pem
    compose_project: Optional[str] = None
    heal_grace_sec: float = 600.0
    alertmanager_public_url: Optional[str] = None
    admin_token: Optional[str] = None
    slack_signing_secret: Optional[str] = None
    slack_admins: Tuple[str, ...] = ()
    slack_response_prefix: str = "https://hooks.slack.com/"
    allowed_hosts: Tuple[str, ...] = ()  # host names browsers may reach autoheal by (DNS rebinding)
    # Telling people (section "Telling people"): the receivers' URLs are secrets.
    notify_slack_url: Optional[str] = None
    notify_webhook_urls: Tuple[str, ...] = ()
    notify_on: Optional[FrozenSet[str]] = None  # kinds and results to send (None: every one of NOTIFY_RESULTS)
    notify_max_pending: int = 1000
    approval_timeout_sec: float = 900.0
    # Replicas (section "Running more than one"): empty endpoints is one process on its own.
    etcd_endpoints: Tuple[str, ...] = ()
    etcd_prefix: str = "/autoheal/"
    etcd_timeout_sec: float = 2.0
    etcd_ca_file: Optional[str] = None
    etcd_cert_file: Optional[str] = None
    etcd_key_file: Optional[str] = None
    etcd_user: Optional[str] = None
    etcd_password: Optional[str] = None
    replica: str = ""  # "" until from_env: the host name

    @property
    def executes(self) -> bool:
        """Real actions run only when enabled and not in dry-run."""
        return self.enabled and not self.dry_run

    def __repr__(self) -> str:
        # Tokens never reach a log line, even through a repr.
        shown = {name: ("<set>" if value and (name.endswith(("_token", "_secret", "_password"))
                                              or name.startswith("notify_") and name.endswith(("_url", "_urls")))
                        else value)
                 for name, value in zip(self._fields, self) if name != "actions"}
        return f"Config({', '.join(f'{name}={value!r}' for name, value in shown.items())}, actions={sorted(self.actions)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Config":
        """Parse every variable, collect every problem, raise one ConfigError naming each."""
        problems: List[str] = []
        values: Dict[str, Any] = {}

        def take(key: str, name: str, parse: Callable[[str], Any], into: Dict[str, Any] = values) -> None:
            raw = env.get(name)
            if raw is None:
                return
            try:
                into[key] = parse(raw)
            except ValueError as exc:
                if parse in (parse_token, parse_secret_urls, parse_secret_url):  # a secret: the
                    # variable is named, its value never shown
                    problems.append(f"{name}: {exc} (the value is a secret: not shown)")
                    return
                shown = raw if len(raw) <= 60 else raw[:60] + f"... ({len(raw)} characters)"
                problems.append(f"{name}: {exc}, got {shown!r}")

        take("enabled", "AUTOHEAL_ENABLED", parse_bool)
        take("dry_run", "AUTOHEAL_DRY_RUN", parse_bool)
        take("alertmanager_url", "ALERTMANAGER_URL", parse_urls)
        take("public_url", "AUTOHEAL_PUBLIC_URL", parse_url)
        take("host", "AUTOHEAL_HOST", parse_host)
        take("port", "AUTOHEAL_PORT", lambda raw: parse_int(raw, 0, 65535))
        take("default_cooldown_sec", "AUTOHEAL_DEFAULT_COOLDOWN_SEC", parse_seconds)
        take("action_timeout_sec", "AUTOHEAL_ACTION_TIMEOUT_SEC", seconds_up_to(MAX_ACTION_TIMEOUT_SEC))
        take("max_actions_per_hour", "AUTOHEAL_MAX_ACTIONS_PER_HOUR", lambda raw: parse_int(raw, 0, 10**9))
        take("max_concurrent_actions", "AUTOHEAL_MAX_CONCURRENT_ACTIONS", lambda raw: parse_int(raw, 1, 1024))
        take("history_max_events", "AUTOHEAL_HISTORY_MAX_EVENTS", lambda raw: parse_int(raw, 1, 10**9))
        take("history_max_bytes", "AUTOHEAL_HISTORY_MAX_BYTES", lambda raw: parse_int(raw, 1 << 16, 1 << 40))
        take("webhook_token", "AUTOHEAL_WEBHOOK_TOKEN", parse_token)
        take("ack_token", "AUTOHEAL_ACK_TOKEN", parse_token)
        take("admin_token", "AUTOHEAL_ADMIN_TOKEN", parse_token)
        take("heal_grace_sec", "AUTOHEAL_HEAL_GRACE_SEC", seconds_up_to(MAX_ACTION_TIMEOUT_SEC))
        take("alertmanager_public_url", "AUTOHEAL_ALERTMANAGER_PUBLIC_URL", parse_url)
        take("slack_signing_secret", "AUTOHEAL_SLACK_SIGNING_SECRET", parse_token)
        take("slack_admins", "AUTOHEAL_SLACK_ADMINS", parse_slack_admins)
        take("slack_response_prefix", "AUTOHEAL_SLACK_RESPONSE_URL_PREFIX", parse_url)
        take("allowed_hosts", "AUTOHEAL_ALLOWED_HOSTS", parse_allowed_hosts)
        take("ack_max_duration_sec", "AUTOHEAL_ACK_MAX_DURATION", parse_duration)
        take("alertmanager_timeout_sec", "AUTOHEAL_ALERTMANAGER_TIMEOUT_SEC", seconds_up_to(MAX_PEER_TIMEOUT_SEC))
        take("max_body_bytes", "AUTOHEAL_MAX_BODY_BYTES", lambda raw: parse_int(raw, 1, 1 << 30))
        take("request_timeout_sec", "AUTOHEAL_REQUEST_TIMEOUT_SEC", seconds_up_to(MAX_PEER_TIMEOUT_SEC))
        take("max_connections", "AUTOHEAL_MAX_CONNECTIONS", lambda raw: parse_int(raw, 1, 100000))
        take("workers", "AUTOHEAL_WORKERS", lambda raw: parse_int(raw, 1, 1024))
        take("max_event_listeners", "AUTOHEAL_MAX_EVENT_LISTENERS", lambda raw: parse_int(raw, 0, 10000))
        take("events_heartbeat_sec", "AUTOHEAL_EVENTS_HEARTBEAT_SEC", seconds_up_to(MAX_PEER_TIMEOUT_SEC))
        take("shutdown_grace_sec", "AUTOHEAL_SHUTDOWN_GRACE_SEC", seconds_up_to(MAX_PEER_TIMEOUT_SEC, positive=False))
        take("docker_host", "DOCKER_HOST", parse_docker_host)
        take("etcd_endpoints", "AUTOHEAL_ETCD_ENDPOINTS", parse_etcd_endpoints)
        take("etcd_prefix", "AUTOHEAL_ETCD_PREFIX", parse_etcd_prefix)
        take("etcd_timeout_sec", "AUTOHEAL_ETCD_TIMEOUT_SEC", seconds_up_to(MAX_PEER_TIMEOUT_SEC))
        for key, name in (("etcd_ca_file", "AUTOHEAL_ETCD_CA_FILE"), ("etcd_cert_file", "AUTOHEAL_ETCD_CERT_FILE"),
                          ("etcd_key_file", "AUTOHEAL_ETCD_KEY_FILE")):
            take(key, name, parse_readable_file)
        take("etcd_user", "AUTOHEAL_ETCD_USER", parse_token)
        take("etcd_password", "AUTOHEAL_ETCD_PASSWORD", parse_token)
        values["replica"] = (env.get("AUTOHEAL_REPLICA") or "").strip()[:100] or socket.gethostname()
        if values.get("etcd_key_file") and not values.get("etcd_cert_file"):
            problems.append("AUTOHEAL_ETCD_KEY_FILE: set AUTOHEAL_ETCD_CERT_FILE too "
                            "(the key belongs to a certificate)")
        if bool(values.get("etcd_user")) != bool(values.get("etcd_password")):
            problems.append("AUTOHEAL_ETCD_USER and AUTOHEAL_ETCD_PASSWORD: set both or neither")
        values["compose_project"] = env.get("COMPOSE_PROJECT_NAME") or None
        take("notify_slack_url", "AUTOHEAL_NOTIFY_SLACK_URL", parse_secret_url)
        take("notify_webhook_urls", "AUTOHEAL_NOTIFY_WEBHOOK_URLS", parse_secret_urls)
        take("notify_on", "AUTOHEAL_NOTIFY_ON", parse_notify_on)
        take("notify_max_pending", "AUTOHEAL_NOTIFY_MAX_PENDING", lambda raw: parse_int(raw, 1, 1_000_000))
        take("approval_timeout_sec", "AUTOHEAL_APPROVAL_TIMEOUT_SEC", seconds_up_to(MAX_DURATION_SEC))
        if env.get("DOCKER_TLS_VERIFY"):  # as the docker CLI: set to anything at all, TLS is on
            values["docker_tls"] = docker_tls_files(env, problems)
        if "AUTOHEAL_STATE_FILE" in env:
            values["state_file"] = env["AUTOHEAL_STATE_FILE"]
            values["state_file_explicit"] = True

        default_cooldown = values.get("default_cooldown_sec", cls._field_defaults["default_cooldown_sec"])
        default_timeout = values.get("action_timeout_sec", cls._field_defaults["action_timeout_sec"])
        named_cooldowns: Dict[str, float] = {}
        for alertname, _command, variable in BUILTIN_ACTIONS:
            take(alertname, variable, parse_seconds, named_cooldowns)

        actions_file = env.get("AUTOHEAL_ACTIONS_FILE") or None
        if actions_file:
            values["actions_file"] = actions_file
            try:
                table = load_actions_file(actions_file)
                values["actions"] = build_actions(table, default_cooldown, default_timeout, named_cooldowns)
            except ValueError as exc:
                problems.append(f"AUTOHEAL_ACTIONS_FILE: {exc} ({actions_file})")
        else:
            table = {name: {"command": command, "docker_api": True} for name, command, _variable in BUILTIN_ACTIONS}
            values["actions"] = build_actions(table, default_cooldown, default_timeout, named_cooldowns)

        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**values)


def parse_bool(raw: str) -> bool:
    """true/false/1/0/yes/no/on/off in any case."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true/false/1/0/yes/no/on/off")


def parse_int(raw: str, low: int, high: int) -> int:
    """A whole number within [low, high], in ASCII digits (int() would take '٣' and '３')."""
    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", text):
        raise ValueError(f"expected a whole number {low}-{high}")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"expected {low}-{high}")
    return value


def parse_seconds(raw: str, high: float = MAX_COOLDOWN_SEC) -> float:
    """A number of seconds from 0 to high, in ASCII digits: no exponent, nan, inf or sign."""
    text = raw.strip()
    if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", text):
        raise ValueError("expected a non-negative number of seconds" if text.startswith("-")
                         else "expected a number of seconds")
    value = float(text)
    if value > high:
        raise ValueError(f"expected at most {format_value(high)} seconds")
    return value


def seconds_up_to(high: float, positive: bool = True) -> Callable[[str], float]:
    """A parser of a number of seconds bounded by high (and above zero when positive)."""

    def parse(raw: str) -> float:
        value = parse_seconds(raw, high)
        if positive and value <= 0:
            raise ValueError(f"expected a positive number of seconds, up to {format_value(high)}")
        return value

    return parse


def parse_url(raw: str, receiver: bool = False) -> str:
    """An http(s) URL with a host; the trailing slash is dropped.  receiver: a notification
    receiver's, kept as given, which may have a query (its key) and must be printable ASCII
    without spaces; the error never shows the URL (it is a secret)."""
    text = raw.strip()
    match = _SIMPLE_URL.fullmatch(text)
    if match and int(match.group(1) or 0) <= 65535:  # what urlsplit takes too, without its import
        return text if receiver else text.rstrip("/")
    import urllib.parse  # where needed (0.4 MiB with ipaddress, 2 ms): a plain URL never needs it

    try:
        parts: Any = urllib.parse.urlsplit(text)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment
            or (parts.query and not receiver)
            or receiver and (not (text.isascii() and text.isprintable()) or " " in text)):
        raise ValueError("expected an http:// or https:// URL with a host" + (" (a query is fine)" if receiver else ""))
    try:
        parts.port
    except ValueError:
        raise ValueError("expected a valid port in the URL") from None
    return text if receiver else text.rstrip("/")


# http(s)://host[:port][/path]: nothing in it that urlsplit would read otherwise (no user, query,
# fragment, brackets or spaces), so parse_url takes it as it is.
_SIMPLE_URL = re.compile(r"https?://[A-Za-z0-9._-]+(?::([0-9]{1,5}))?(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?")


def parse_urls(raw: str) -> str:
    """One URL, or the members of a cluster, comma-separated: each an http(s) URL with a host."""
    urls = [parse_url(part) for part in raw.split(",") if part.strip()]
    if not urls:
        raise ValueError("expected an http:// or https:// URL with a host")
    return ",".join(urls)


def parse_secret_urls(raw: str) -> Tuple[str, ...]:
    """Receivers' URLs, comma-separated (a Slack incoming webhook's holds its secret): each an
    http(s) URL; ValueError never shows one (take() shows the value: this says it is a secret)."""
    urls = []
    for index, part in enumerate(part for part in raw.split(",") if part.strip()):
        try:
            urls.append(parse_url(part, receiver=True))
        except ValueError as exc:
            raise ValueError(f"URL {index + 1}: {exc}") from None
    return tuple(urls)


def parse_secret_url(raw: str) -> Optional[str]:
    """One receiver's URL (a secret), or none."""
    urls = parse_secret_urls(raw)
    if len(urls) > 1 or raw.strip() and not urls:
        raise ValueError("expected one http:// or https:// URL")
    return urls[0] if urls else None


def parse_notify_on(raw: str) -> Optional[FrozenSet[str]]:
    """Kinds and results to notify, comma-separated (run, heal, control, approval; executed,
    failed, not_healed, ...); empty: all."""
    words = frozenset(word.strip() for word in raw.split(",") if word.strip())
    known = set(NOTIFY_RESULTS) | {result for results in NOTIFY_RESULTS.values() for result in results} | {"run"}
    unknown = sorted(words - known)
    if unknown:
        raise ValueError(f"unknown kind or result {unknown[0]!r}; expected some of {', '.join(sorted(known))}")
    return words or None


def parse_etcd_endpoints(raw: str) -> Tuple[str, ...]:
    """etcd members, comma-separated http(s) URLs; never with a password in them (it would be in
    every log line that names a member): AUTOHEAL_ETCD_USER and AUTOHEAL_ETCD_PASSWORD say it."""
    import urllib.parse

    if not raw.strip():
        return ()
    urls = tuple(parse_urls(raw).split(","))
    if any("@" in urllib.parse.urlsplit(url).netloc for url in urls):
        raise ValueError("expected URLs without user:password@ (set AUTOHEAL_ETCD_USER and AUTOHEAL_ETCD_PASSWORD)")
    return urls


def parse_etcd_prefix(raw: str) -> str:
    """A key prefix in etcd: starts and ends with "/" (one is added), printable ASCII."""
    text = raw.strip()
    if not text or not (text.isascii() and text.isprintable()) or len(text) > 200:
        raise ValueError("expected a key prefix such as /autoheal/ (printable ASCII, at most 200 characters)")
    return ("/" + text.strip("/") + "/").replace("//", "/")


def parse_readable_file(raw: str) -> Optional[str]:
    """The path of a file autoheal can read (a certificate, a key); empty means unset."""
    path = raw.strip()
    if not path:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    return path


def parse_host(raw: str) -> str:
    """A listen address: a name or an IP literal, without spaces."""
    text = raw.strip()
    if not text or any(ch.isspace() or ch in "/?#@" for ch in text):
        raise ValueError("expected a host name or IP address")
    return text


def parse_docker_host(raw: str) -> str:
    """DOCKER_HOST as the docker CLI takes it: unix:///path or tcp://host:port."""
    import urllib.parse

    text = raw.strip() or DEFAULT_DOCKER_HOST
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == "unix" and parts.path:
        return text
    if parts.scheme == "tcp" and parts.hostname and port:
        return text
    raise ValueError("expected unix:///path/to/docker.sock or tcp://host:port")


def parse_slack_admins(raw: str) -> Tuple[str, ...]:
    """Slack user ids, comma-separated (U0123ABCD, W0123ABCD)."""
    ids = tuple(word.strip() for word in raw.split(",") if word.strip())
    for user_id in ids:
        if not re.fullmatch(r"[UW][A-Z0-9]{2,20}", user_id):
            raise ValueError(f"expected Slack user ids such as U024BE7LH, comma-separated; {user_id[:30]!r} is not one")
    return ids


def parse_allowed_hosts(raw: str) -> Tuple[str, ...]:
    """Host names, comma-separated (no port, no scheme), lower-cased."""
    hosts = tuple(host.strip().lower().rstrip(".") for host in raw.split(",") if host.strip())
    for host in hosts:
        if len(host) > 253 or not re.fullmatch(r"[a-z0-9_.-]+", host):
            raise ValueError(f"expected host names separated by commas (no port or scheme), such as "
                             f"autoheal.example.com; {host[:60]!r} is not one")
    return hosts


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def parse_token(raw: str) -> Optional[str]:
    """A shared secret; empty means unset.  Printable ASCII only: HTTP carries header values as
    Latin-1 bytes, so any other character could never match."""
    if raw and not (raw.isascii() and raw.isprintable()):
        raise ValueError("expected printable ASCII characters only")
    return raw or None


def parse_duration(raw: str, high: float = MAX_DURATION_SEC) -> float:
    """A Prometheus duration (90s, 30m, 1h30m, 1d, 1w) as seconds, above zero and at most high."""
    text = raw.strip()
    match = _DURATION.match(text)
    if not text or not match:
        raise ValueError("expected a duration such as 30m, 2h, 1d or 1h30m")
    seconds = sum(int(group) * unit for group, unit in zip(match.groups(), _DURATION_UNITS) if group)
    if seconds <= 0:
        raise ValueError("expected a duration longer than zero")
    if seconds > high:
        raise ValueError(f"expected a duration of at most {format_duration(high)}")
    return float(seconds)


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for a whole number of seconds: 5400 -> 1h30m."""
    remaining = int(round(seconds))
    if remaining <= 0:
        return "0s"
    out = []
    for unit, suffix in ((7 * 86400, "w"), (86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if remaining >= unit:
            out.append(f"{remaining // unit}{suffix}")
            remaining %= unit
    return "".join(out)


def load_actions_file(path: str) -> Mapping[str, Any]:
    """Read the actions table from a JSON file, or a TOML file where tomllib exists (3.11+)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_ACTIONS_FILE_BYTES + 1)  # bounded: /dev/zero must not read forever
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_ACTIONS_FILE_BYTES:
        raise ValueError(f"larger than {MAX_ACTIONS_FILE_BYTES} bytes")
    if path.lower().endswith(".toml"):
        try:
            import tomllib
        except ImportError:
            raise ValueError("TOML action files need Python 3.11 or newer; use JSON") from None
        try:
            document = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"invalid TOML: {exc}") from None
    else:
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict) or set(document) != {"actions"} or not isinstance(document["actions"], dict):
        raise ValueError('expected one table "actions" mapping alertnames to actions')
    return document["actions"]


def build_actions(
    table: Mapping[str, Any],
    default_cooldown: float,
    default_timeout: float,
    named_cooldowns: Mapping[str, float],
) -> Dict[str, Action]:
    """Validate an actions table and turn it into Action objects."""
    actions: Dict[str, Action] = {}
    for alertname in sorted(table):
        entry = table[alertname]
        where = f"action {alertname!r}"
        if not alertname or not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a table with a command")
        if not ACTION_KEYS.issuperset(entry):
            raise ValueError(f"{where}: unknown key {sorted(set(entry) - ACTION_KEYS)[0]!r}")
        cooldown = _number_field(entry, "cooldown_sec", where, allow_zero=True)
        steps = entry.get("escalate", [])
        if not isinstance(steps, list) or len(steps) > 10:
            raise ValueError(f"{where}: escalate must be a list of at most 10 steps")
        give_up = entry.get("give_up_after")
        if give_up is not None and (isinstance(give_up, bool) or not isinstance(give_up, int) or give_up < 1
                                    or give_up > 1000):
            raise ValueError(f"{where}: give_up_after must be a whole number from 1 to 1000")
        if entry.get("approve") is True and steps:
            raise ValueError(f"{where}: approve and escalate together are not supported yet (a step would run "
                             "without its own approval)")
        fleet = _fleet_fields(alertname, entry, where)
        first = _command_step(alertname, entry, where, cooldown, default_cooldown, default_timeout,
                              named_cooldowns, fleet)
        escalate = tuple(_command_step(alertname, step, f"{where}, escalate step {index}", cooldown,
                                       default_cooldown, default_timeout, named_cooldowns, fleet, step=True)
                         for index, step in enumerate(steps, start=2))
        for index, command in enumerate((first,) + escalate, start=1):
            _check_placeholders(command, where if index == 1 else f"{where}, escalate step {index}")
        actions[alertname] = first._replace(escalate=escalate, give_up_after=give_up) if steps or give_up else first
    return actions


ACTION_KEYS = {"command", "cooldown_sec", "timeout_sec", "docker_api", "docker_host", "escalate", "give_up_after",
               "cooldown_by", "targets", "docker_hosts", "approve"}


def _fleet_fields(alertname: str, entry: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """cooldown_by, targets and docker_hosts of an action (its steps share them), checked."""
    if not any(key in entry for key in PLAIN_FLEET):  # most actions: one per alertname, as always
        return PLAIN_FLEET
    fields: Dict[str, Any] = {}
    by = entry.get("cooldown_by", list(DEFAULT_COOLDOWN_BY))
    if (not isinstance(by, list) or not by or len(by) > 10
            or not all(isinstance(name, str) and _LABEL_NAME.match(name) for name in by) or len(set(by)) != len(by)):
        raise ValueError(f"{where}: cooldown_by must be a list of up to 10 distinct label names")
    by = ["alertname"] + [name for name in by if name != "alertname"]
    if len(by) > 1 and "/" in alertname:
        raise ValueError(f"{where}: an action with cooldown_by by target cannot have '/' in its alertname")
    fields["cooldown_by"] = tuple(by)
    for key in ("targets", "docker_hosts"):
        patterns = entry.get(key, [])
        if (not isinstance(patterns, list) or len(patterns) > 100
                or not all(isinstance(p, str) and 0 < len(p) <= 200 for p in patterns)):
            raise ValueError(f"{where}: {key} must be a list of up to 100 glob patterns")
        fields[key] = tuple(patterns)
    if not isinstance(entry.get("approve", False), bool):
        raise ValueError(f"{where}: approve must be true or false")
    fields["approve"] = entry.get("approve", False)
    fields["fleet"] = len(by) > 1 or bool(fields["targets"] or fields["docker_hosts"])
    return fields


PLAIN_FLEET = {"cooldown_by": DEFAULT_COOLDOWN_BY, "targets": (), "docker_hosts": (), "approve": False,
               "fleet": False}


def _check_placeholders(action: Action, where: str) -> None:
    """A {label:NAME} in a command needs targets; in docker_host, docker_hosts (else the start
    stops, naming the action)."""
    if any(PLACEHOLDER.search(word) for word in action.argv) and not action.targets:
        raise ValueError(f"{where}: its command takes {{label:...}} values, so it must list targets: the glob "
                         "patterns every value must match")
    if action.docker_host and PLACEHOLDER.search(action.docker_host) and not action.docker_hosts:
        raise ValueError(f"{where}: its docker_host takes {{label:...}} values, so it must list docker_hosts: "
                         "the glob patterns every value must match")
    if action.docker_host and not PLACEHOLDER.search(action.docker_host):
        try:
            parse_docker_host(action.docker_host)
        except ValueError as exc:
            raise ValueError(f"{where}: docker_host: {exc}") from None
    if action.docker_host and not action.docker_api:
        raise ValueError(f"{where}: docker_host is for docker_api actions (a command is run as it is)")


def docker_tls_files(env: Mapping[str, str], problems: List[str]) -> Optional[Tuple[str, str, str]]:
    """DOCKER_TLS_VERIFY: ca.pem, cert.pem and key.pem from DOCKER_CERT_PATH (default ~/.docker),
    each readable (else a problem naming the file)."""
    folder = env.get("DOCKER_CERT_PATH") or os.path.join(os.path.expanduser("~"), ".docker")
    files = tuple(os.path.join(folder, name) for name in ("ca.pem", "cert.pem", "key.pem"))
    for path in files:
        try:
            parse_readable_file(path)
        except ValueError as exc:
            problems.append(f"DOCKER_TLS_VERIFY is set, so {path} is needed (DOCKER_CERT_PATH): {exc}")
            return None
    return files  # type: ignore[return-value]


def _command_step(alertname: str, entry: Any, where: str, cooldown: Optional[float], default_cooldown: float,
                  default_timeout: float, named_cooldowns: Mapping[str, float], fleet: Mapping[str, Any],
                  step: bool = False) -> Action:
    """One command of an action (the action itself, or a step of its escalate list), with the
    action's fleet fields (_fleet_fields)."""
    if step:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a table with a command")
        unknown = set(entry) - {"command", "timeout_sec", "docker_api", "docker_host"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (a step takes command, timeout_sec, "
                             "docker_api, docker_host)")
    command = entry.get("command")
    if isinstance(command, str):
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise ValueError(f"{where}: command cannot be split: {exc}") from None
        display = command.strip()
    elif isinstance(command, list) and all(isinstance(word, str) for word in command):
        argv = tuple(command)
        display = shlex.join(argv)
    elif command is None:
        raise ValueError(f"{where}: has no command")
    else:
        raise ValueError(f"{where}: command must be a list of strings or a string")
    if not argv or not argv[0]:
        raise ValueError(f"{where}: command is empty")
    timeout = _number_field(entry, "timeout_sec", where, allow_zero=False)
    docker_api = entry.get("docker_api", False)
    if not isinstance(docker_api, bool):
        raise ValueError(f"{where}: docker_api must be true or false")
    docker_host = entry.get("docker_host")
    if docker_host is not None and (not isinstance(docker_host, str) or not docker_host.strip()):
        raise ValueError(f"{where}: docker_host must be a string such as tcp://host:2376")
    if docker_api:
        try:
            docker_plan(argv)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return Action(
        alertname=alertname,
        argv=argv,
        display=display,
        cooldown_sec=cooldown if cooldown is not None else named_cooldowns.get(alertname, default_cooldown),
        timeout_sec=timeout if timeout is not None else default_timeout,
        docker_api=docker_api,
        docker_host=docker_host.strip() if docker_host else None,
        **fleet,
    )


def _number_field(entry: Mapping[str, Any], key: str, where: str, allow_zero: bool) -> Optional[float]:
    if key not in entry:
        return None
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{where}: {key} must be {'non-negative' if allow_zero else 'positive'}")
    high = MAX_COOLDOWN_SEC if key == "cooldown_sec" else MAX_ACTION_TIMEOUT_SEC
    if value > high:
        raise ValueError(f"{where}: {key} must be at most {format_value(high)}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class HttpError(Exception):
    """An expected failure that becomes a JSON answer {"ok": false, "error": message}."""

    def __init__(self, status: int, message: str, headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class Unknown(Exception):
    """What a request names does not exist (a history id, a silence): the handler answers 404."""


class Forbidden(Exception):
    """What a request asks is not autoheal's to do (another's silence): the handler answers 403."""


class PeerError(Exception):
    """Alertmanager (or another peer) refused (status set) or did not answer (status None)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Pure helpers: time, JSON input, environment names, logging
# ---------------------------------------------------------------------------------------------


_LAST_SECOND: List[Any] = [None, ""]  # the whole second last formatted, and its text


def format_rfc3339(timestamp: float) -> str:
    """Unix time as RFC 3339 in UTC with milliseconds, as Alertmanager writes it.  Every log line
    carries one, so the seconds part is formatted once per second (strftime costs microseconds)."""
    whole = math.floor(timestamp)
    milliseconds = min(999, int((timestamp - whole) * 1000))
    cached = _LAST_SECOND
    if cached[0] != whole:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        cached[0] = whole
    return cached[1] + f".{milliseconds:03d}Z"


def parse_rfc3339(text: str) -> float:
    """RFC 3339 to Unix time; accepts Z and up to 9 fractional digits (Go's format)."""
    from datetime import datetime, timezone  # acks and history filters only

    match = _RFC3339.match(text.strip())
    if not match:
        raise ValueError("expected an RFC 3339 time")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = 0
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=timezone.utc)
    return moment.timestamp() - offset + (float("0." + fraction) if fraction else 0.0)


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body as JSON, raising HttpError 400 with the reason.  A large request's
    body (the bytearray it was read into) is emptied once decoded: a storm's 1.9 MB is not held
    beside its text and its document while they are made and used (the request itself is kept
    until the answer is sent, see Server._work)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if isinstance(raw, bytearray):
        raw.clear()
    try:
        document = json.loads(text)
    except RecursionError:
        # The C decoder counts its depth against the recursion limit and gives up cleanly.
        raise HttpError(400, "body nests too deeply (JSON beyond the parser's recursion limit)") from None
    except ValueError as exc:
        raise HttpError(400, f"body is not JSON: {exc}") from None
    if _may_escape_surrogates(text):  # rare: only then is every string looked at
        where = lone_surrogate_in(document)
        if where is not None:
            raise HttpError(400, f"body holds a lone surrogate escape (\\ud800-\\udfff without its pair) in "
                                 f"{where[:100]}: not a Unicode string")
    return document


def _may_escape_surrogates(text: str) -> bool:
    """Whether a body's text that is JSON may hold an escape of a surrogate (\\ud800-\\udfff).
    The few backslashes of a webhook (its groupKey's quotes) are found by memchr; at a \\u escape
    or past 16 of them the pattern is searched (0.5 ms through a storm's 1.9 MB)."""
    at = text.find("\\")
    for _ in range(16):
        if at < 0:
            return False
        if text[at + 1:at + 2] == "u":
            break
        at = text.find("\\", at + 2)  # past this escape's two characters (JSON: \\ is one escape)
    return _SURROGATE_ESCAPE.search(text) is not None


def lone_surrogate_in(document: Any) -> Optional[str]:
    """Where a JSON document holds a string that is not valid Unicode (a lone surrogate), or None."""
    stack: List[Tuple[str, Any]] = [("body", document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{name}", item) for name, item in value.items())
            stack.extend((f"{where} (a key)", name) for name in value)
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
    return None


def js_tolerant_json(text: str) -> Any:
    """json.loads that also accepts the escape \\' inside strings.

    Alertmanager 0.25's templates have no toJson; the Slack template builds the labels object
    with Go's ``js`` function, which escapes ' as \\' (valid JavaScript, not JSON).
    """
    if "\\'" in text:
        out = []
        index = 0
        while index < len(text):
            char = text[index]
            if char == "\\" and index + 1 < len(text):
                following = text[index + 1]
                out.append("'" if following == "'" else char + following)
                index += 2
                continue
            out.append(char)
            index += 1
        text = "".join(out)
    return json.loads(text)


def env_name(prefix: str, name: str) -> str:
    """AUTOHEAL_LABEL_ + name upper-cased, every character outside A-Z0-9_ turned into _."""
    return prefix + _ENV_NAME_UNSAFE.sub("_", name.upper())


def command_environment(base: Mapping[str, str], alert: Mapping[str, Any]) -> Dict[str, str]:
    """The environment of an action: autoheal's own without its AUTOHEAL_* settings, plus the alert."""
    env = {key: value for key, value in base.items() if not key.startswith("AUTOHEAL_")}
    labels = alert.get("labels") or {}
    annotations = alert.get("annotations") or {}
    for name in sorted(labels):
        env[env_name("AUTOHEAL_LABEL_", name)] = _env_safe(labels[name])
    for name in sorted(annotations):
        env[env_name("AUTOHEAL_ANNOTATION_", name)] = _env_safe(annotations[name])
    env["AUTOHEAL_ALERTNAME"] = _env_safe(labels.get("alertname", ""))
    env["AUTOHEAL_FINGERPRINT"] = _env_safe(alert.get("fingerprint") or "")
    return env


def _env_safe(value: Any) -> str:
    # An environment string cannot hold NUL; everything else passes through untouched.
    return str(value).replace("\0", "")


def log_event(event: Mapping[str, Any], stream: Any = None, lock: Optional[threading.Lock] = None) -> None:
    """One JSON object per line, ASCII only: every control character (and U+2028) is escaped."""
    line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
    target = stream or sys.stdout
    if lock is None:
        target.write(line)
        target.flush()
        return
    with lock:
        target.write(line)
        target.flush()


# ---------------------------------------------------------------------------------------------
# The exposition: metric families, counters and the text format
# ---------------------------------------------------------------------------------------------

def escape_help(text: str) -> str:
    """HELP text escaping of the exposition format: backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(value: str) -> str:
    """Label value escaping of the exposition format: backslash first, then newline and quote."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Mapping[str, str]) -> str:
    """{a="1",b="2"} with names sorted; empty string for no labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(labels[name])}"' for name in sorted(labels)) + "}"


def format_value(value: float) -> str:
    """A sample value as Go formats floats: +Inf, -Inf, NaN, integers without a fraction."""
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is bool:
        return "1" if value else "0"
    if value.is_integer() and -1e15 < value < 1e15:  # the common case first: 0, counts, seconds
        return str(int(value))
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    return repr(value)


def format_family(name: str, kind: str, help_text: str, samples: Any) -> str:
    """One metric family: HELP, TYPE, then samples given as (suffix-and-labels, value) pairs."""
    value_text = format_value
    lines = [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{series} {value_text(value)}" for series, value in samples]
    return "\n".join(lines) + "\n"


@record_type
class Family:
    """One metric family of the exposition, declared once (METRICS)."""

    name: str
    kind: str
    help: str
    labels: Tuple[str, ...] = ()  # a counter's label names, in the order of its label values
    preset: Tuple[Tuple[Any, ...], ...] = ()  # a counter's series that exist (at 0) from the start


# Every family autoheal exposes, in the order of the exposition.  Adding one is a row here; a
# counter's values live in App.counters (Counters) under the family's name, and its samples come
# from there by its labels; any other family's samples are named in Exposition._samples.  Every
# series of preset exists from the start (at 0), so that rate() and increase() see the first
# event; refusals only for the likeliest routes and statuses.  Per-alertname families start
# empty: their zeros come from per_alertname_values (with 1,000 actions, 14,000 preset zeros were
# half a MiB of an idle autoheal, copied at every scrape).
METRICS = (
    Family("autoheal_enabled", "gauge", "1 when autoheal is enabled (AUTOHEAL_ENABLED), else 0."),
    Family("autoheal_dry_run", "gauge", "1 when autoheal only logs and counts (AUTOHEAL_DRY_RUN), else 0."),
    Family("autoheal_build_info", "gauge", "Version of autoheal and of the Python running it."),
    Family("autoheal_alerts_received_total", "counter", "Alerts received in webhooks.", preset=((),)),
    Family("autoheal_alerts_skipped_total", "counter",
           "Alerts skipped before reaching an action, by reason (no alertname label).", ("reason",),
           tuple((reason,) for reason in SKIP_REASONS)),
    Family("autoheal_actions_total", "counter", "Decisions on allow-listed alerts, by alertname and result.",
           ("alertname", "result")),
    Family("autoheal_action_last_timestamp", "gauge",
           "Unix time of the last action of an alertname (dry-run included), 0 before the first."),
    Family("autoheal_cooldown_remaining_seconds", "gauge",
           "Seconds until the next action of an alertname is allowed (per-target: until its last target's)."),
    Family("autoheal_cooldown_targets", "gauge",
           "Targets of an alertname in cooldown now (label sets of its cooldown_by; 0 or 1 without one)."),
    Family("autoheal_cooldown_seconds", "gauge", "Configured cooldown of an alertname's action."),
    Family("autoheal_action_duration_seconds", "summary", "Wall time of commands that ran, by alertname."),
    Family("autoheal_action_budget_limit", "gauge", "Runs allowed per rolling hour across all alertnames (0: no budget)."),
    Family("autoheal_action_budget_remaining", "gauge", "Runs left in the rolling hour's budget (NaN without a budget)."),
    Family("autoheal_action_budget_exhausted", "gauge",
           "1 while the hourly action budget is spent and actions are rate_limited."),
    Family("autoheal_acks_total", "counter", "Acknowledgements through /ack, by outcome.", ("outcome",),
           tuple((outcome,) for outcome in ACK_OUTCOMES)),
    Family("autoheal_silences_expired_total", "counter", "Silences expired through the undo of an acknowledgement.",
           preset=((),)),
    Family("autoheal_state_persistent", "gauge",
           "1 when cooldowns and history are kept in the state file, 0 when in memory only."),
    Family("autoheal_state_write_errors_total", "counter", "Failed commits to the state file."),
    Family("autoheal_state_file_replaced_total", "counter",
           "Times the state file was found moved, deleted or replaced under autoheal, and reopened."),
    Family("autoheal_history_oldest_timestamp", "gauge",
           "Unix time of the oldest event kept, by retention class (kept: runs, acks, changes; "
           "routine: cooldown_skip, skipped, rate_limited); NaN while a class is empty."),
    Family("autoheal_http_rejected_total", "counter",
           "Requests refused with a 4xx or 5xx, by route (other: any unknown path) and status.", ("path", "status"),
           PRESET_REJECTIONS),
    Family("autoheal_state_commits_total", "counter",
           "Transactions committed to the state file (records of concurrent requests share one)."),
    Family("autoheal_heals_total", "counter",
           "Verdicts on executed actions, by alertname: healed (the alert resolved within AUTOHEAL_HEAL_GRACE_SEC) "
           "or not_healed.", ("alertname", "result")),
    Family("autoheal_heal_duration_seconds", "summary", "Seconds from an action to the resolution of its alert."),
    Family("autoheal_action_disabled", "gauge", "1 while an alertname's action is switched off at runtime."),
    Family("autoheal_overrides", "gauge", "Runtime overrides in force (see GET / for who set them)."),
    Family("autoheal_control_commands_total", "counter",
           "Runtime control commands, by source (http, slack) and result (applied, refused, invalid).",
           ("source", "result"), tuple((source, result) for source in CONTROL_SOURCES for result in CONTROL_RESULTS)),
    Family("autoheal_coordination_up", "gauge",
           "1 while etcd answers (replicas: AUTOHEAL_ETCD_ENDPOINTS); 0 while actions fail closed. "
           "Absent without etcd."),
    Family("autoheal_gave_up_total", "counter",
           "Times autoheal switched an action off itself after give_up_after not_healed verdicts in a row.",
           ("alertname",)),
    Family("autoheal_approvals_total", "counter",
           "Approvals closed, by alertname and result: approved, denied, expired.", ("alertname", "result")),
    Family("autoheal_approvals_pending", "gauge", "Approvals open now, waiting for a person."),
    Family("autoheal_notifications_total", "counter",
           "Notifications by channel (slack, webhook1, ...) and result: sent, failed (an attempt), dropped.",
           ("channel", "result")),
    Family("autoheal_notifications_pending", "gauge", "Notifications waiting to be sent, by channel."),
    Family("autoheal_event_listeners", "gauge", "Clients connected to /events."),
    Family("autoheal_connections_dropped_total", "counter",
           "Connections closed with an answer the client did not read: unread_answer (past "
           "AUTOHEAL_REQUEST_TIMEOUT_SEC without reading), unsent_output_bound (the server held too much "
           "unread output already).", ("reason",), (("unread_answer",), ("unsent_output_bound",))),
    Family("autoheal_actions_running", "gauge", "Commands running now."),
    Family("autoheal_start_time_seconds", "gauge", "Unix time autoheal started."),
)


class Counters:
    """Every counter autoheal keeps, by family and label values, behind one lock (client_python's
    habit): add under the lock, snapshot under it, format outside it."""

    def __init__(self, families: Tuple[Family, ...]):
        """A counter for each counter family (its preset series at 0), a _sum and a _count for
        each summary."""
        self._lock = threading.Lock()
        self._families: Dict[str, Dict[Tuple[Any, ...], float]] = {}
        for family in families:
            if family.kind == "counter":
                self._families[family.name] = {labels: 0 for labels in family.preset}
            elif family.kind == "summary":
                self._families[family.name + "_sum"] = {}
                self._families[family.name + "_count"] = {}

    def add(self, family: str, labels: Tuple[Any, ...] = (), amount: float = 1) -> None:
        self.add_all({(family, labels): amount})

    def add_all(self, counts: Mapping[Tuple[str, Tuple[Any, ...]], float]) -> None:
        """Many additions at once, under the lock once (a webhook of thousands of alerts)."""
        with self._lock:
            for (family, labels), amount in counts.items():
                values = self._families.setdefault(family, {})
                values[labels] = values.get(labels, 0) + amount

    def snapshot(self) -> Dict[str, Dict[Tuple[Any, ...], float]]:
        with self._lock:
            return {family: dict(values) for family, values in self._families.items()}


def per_alertname_values(counts: Mapping[Tuple[Any, ...], float], names: List[str],
                         results: Tuple[str, ...] = ()) -> List[float]:
    """A per-alertname counter's values in series order (by alertname, then result), 0 for a
    series that never counted: the counters keep only what happened."""
    if not counts:
        return [0] * (len(names) * max(1, len(results)))
    get = counts.get
    if not results:
        return [get((name,), 0) for name in names]
    return [get((name, result), 0) for name in names for result in results]


class Exposition:
    """What /metrics answers: the samples of every family of METRICS, read from the app's parts
    at each scrape (one snapshot of the counters under their lock) and formatted outside every
    lock.  A counter family's samples come from the counters by its label names; the others are
    named in _samples.  A family with a series per alertname is formatted again only when its
    values changed since the last scrape: with 1,000 alertnames, formatting 16,000 numbers was
    most of the time of a scrape, and between two scrapes most families do not change at all."""

    def __init__(self, app: "App"):
        self.app = app
        # Each alertname's label set, escaped once (at the first scrape: not at start, 2 ms): /metrics
        # must not escape 1,000 label values at every scrape.  The (alertname, result) label sets
        # are built from them when a family is formatted again (_per_alertname_text), not kept:
        # 8,000 strings, 0.8 MiB.
        self._series_labels: Optional[List[str]] = None
        self._texts: Dict[str, Tuple[Any, ...]] = {}  # each per-alertname family's last text
        self._lock = threading.Lock()

    def parts(self) -> List[bytes]:
        """The exposition as the UTF-8 text of each family: sent as it is (one sendmsg), a scrape
        of 1,000 alertnames copies no megabyte into another."""
        samples = self._samples(self.app.clock())
        parts = []
        with self._lock:
            for family in METRICS:
                given = samples[family.name]
                if type(given) is tuple:
                    parts.append(self._per_alertname_text(family, *given))
                elif given is not None:
                    parts.append(format_family(family.name, family.kind, family.help, given).encode("utf-8"))
        return parts

    def _per_alertname_text(self, family: Family, series: Callable[[], List[str]], values: List[float]) -> bytes:
        kept = self._texts.get(family.name)
        if kept is not None and kept[0] == values:
            return kept[1]
        text = format_family(family.name, family.kind, family.help, zip(series(), values)).encode("utf-8")
        self._texts[family.name] = (values, text)
        return text

    def _result_series(self, results: Tuple[str, ...]) -> Callable[[], List[str]]:
        """The label sets of a per-(alertname, result) family, in per_alertname_values' order."""
        return lambda: [f'{label[:-1]},result="{result}"}}' for label in self._labels() for result in results]

    def _labels(self) -> List[str]:
        labels = self._series_labels
        if labels is None:  # two first scrapes at once make the same list: no harm
            labels = self._series_labels = [format_labels({"alertname": name}) for name in self.app.action_names]
        return labels

    def _samples(self, now: float) -> Dict[str, Any]:
        """The samples of each family: (suffix and labels, value) pairs, or for the families with
        a series per alertname, (a function giving their label sets, their values)."""
        app = self.app
        counters = app.counters.snapshot()  # one snapshot under the lock; formatting happens outside it
        settings = app.effective()
        limit = settings.max_actions_per_hour
        budget_used = app.claims.budget_used(now)
        store = app.store
        samples: Dict[str, Any] = self._per_alertname(counters, settings, now)
        samples.update({
            "autoheal_enabled": [("", int(settings.enabled))],
            "autoheal_dry_run": [("", int(settings.dry_run))],
            "autoheal_build_info": [(format_labels({"version": __version__,
                                                    "python_version": sys.version.split()[0]}), 1)],
            "autoheal_action_budget_limit": [("", limit)],
            "autoheal_action_budget_remaining": [("", max(0, limit - budget_used) if limit else math.nan)],
            "autoheal_action_budget_exhausted": [("", int(bool(limit) and budget_used >= limit))],
            "autoheal_state_persistent": [("", int(store.persistent))],
            "autoheal_state_write_errors_total": [("", store.write_errors)],
            "autoheal_state_file_replaced_total": [("", store.replaced)],
            "autoheal_history_oldest_timestamp": [(format_labels({"class": name}), math.nan if ts is None else ts)
                                                  for name, ts in store.oldest().items()],
            "autoheal_state_commits_total": [("", store.commits)],
            "autoheal_overrides": [("", len(settings.overrides))],
            "autoheal_coordination_up": None if app.coordination is None else [("", int(app.coordination.up))],
            "autoheal_event_listeners": [("", app.feed.listeners())],
            "autoheal_approvals_pending": [("", app.approvals.count())],
            "autoheal_notifications_pending": None if app.notifier is None else [
                (format_labels({"channel": name}), count) for name, count in app.notifier.pending().items()],
            "autoheal_actions_running": [("", app.processes.count())],
            "autoheal_start_time_seconds": [("", app.started_at)],
        })
        for family in METRICS:  # every other counter: its series from the counters, by its labels
            if family.kind == "counter" and family.name not in samples:
                samples[family.name] = [(format_labels(dict(zip(family.labels, map(str, key)))), value)
                                        for key, value in sorted(counters[family.name].items())]
        return samples

    def _per_alertname(self, counters: Mapping[str, Mapping[Tuple[Any, ...], float]], settings: Settings,
                       now: float) -> Dict[str, Any]:
        """The families with a series per alertname, on the pre-escaped label sets."""
        names = self.app.action_names
        labels = self._labels()
        started = [moment or 0.0 for moment in self.app.claims.started_of(names)]
        cooldowns = [settings.cooldowns[name] for name in names]
        app = self.app
        remaining, cooling = cooldowns_now(app.claims, app.action_names, app.per_target, settings, now)
        if self.app.per_target:  # per-target actions: the newest start of their targets
            last = self.app.claims.last_target_starts()
            started = [max(started[index], last.get(name, 0.0)) for index, name in enumerate(names)]

        def plain_labels() -> List[str]:
            return labels

        def summary(family: str) -> Any:
            """A summary's _sum and _count series."""
            return (lambda: ["_sum" + label for label in labels] + ["_count" + label for label in labels],
                    per_alertname_values(counters[family + "_sum"], names)
                    + per_alertname_values(counters[family + "_count"], names))

        return {
            "autoheal_actions_total": (self._result_series(ACTION_RESULTS),
                                       per_alertname_values(counters["autoheal_actions_total"], names, ACTION_RESULTS)),
            "autoheal_action_last_timestamp": (plain_labels, started),
            "autoheal_cooldown_remaining_seconds": (plain_labels, remaining),
            "autoheal_cooldown_targets": (plain_labels, [cooling[name][0] if name in cooling else int(left > 0)
                                                         for name, left in zip(names, remaining)]),
            "autoheal_cooldown_seconds": (plain_labels, cooldowns),
            "autoheal_action_duration_seconds": summary("autoheal_action_duration_seconds"),
            "autoheal_heals_total": (self._result_series(HEAL_RESULTS),
                                     per_alertname_values(counters["autoheal_heals_total"], names, HEAL_RESULTS)),
            "autoheal_heal_duration_seconds": summary("autoheal_heal_duration_seconds"),
            "autoheal_action_disabled": (plain_labels, [int(name in settings.disabled) for name in names]),
        }


# ---------------------------------------------------------------------------------------------
# The action runner
# ---------------------------------------------------------------------------------------------


@record_type
class RunOutcome:
    """What became of one command: executed, failed or error, with its evidence."""

    result: str
    exit_status: Optional[int]
    duration_seconds: float
    output_tail: str
    error: Optional[str] = None


class ProcessRegistry:
    """The commands running now, so that shutdown can kill what outlives its grace period."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Dict[int, subprocess.Popen] = {}
        self.killed_for_shutdown = False

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running[process.pid] = process

    def remove(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running.pop(process.pid, None)

    def count(self) -> int:
        with self._lock:
            return len(self._running)

    def kill_all(self) -> int:
        """Kill every running command with its process group; returns how many."""
        with self._lock:
            processes = list(self._running.values())
            self.killed_for_shutdown = True
        for process in processes:
            _kill_group(process)
        return len(processes)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_tail(stream: Any, tail: bytearray) -> None:
    """Read a command's output to its end, keeping only the last OUTPUT_TAIL_BYTES: a chatty
    command cannot grow memory."""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        tail.extend(chunk)
        if len(tail) > OUTPUT_TAIL_BYTES:
            del tail[: len(tail) - OUTPUT_TAIL_BYTES]


def run_command(
    argv: Tuple[str, ...],
    env: Mapping[str, str],
    timeout: float,
    registry: Optional[ProcessRegistry] = None,
) -> RunOutcome:
    """Run argv without a shell in a process group of its own; kill the group past timeout."""
    import subprocess  # here, not at the top: --check and a dry-run-only start never need it

    started = time.monotonic()
    try:
        process = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout can kill grandchildren too
            close_fds=True,
        )
    except (OSError, ValueError) as exc:
        return RunOutcome("error", None, time.monotonic() - started, "", f"could not start: {exc}")
    if registry is not None:
        registry.add(process)
    tail = bytearray()
    reader = threading.Thread(target=_read_tail, args=(process.stdout, tail), name=f"output-{process.pid}",
                              daemon=True)
    reader.start()
    error = None
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        status = process.wait()
        error = f"timed out after {format_value(timeout)}s; process group killed"
    finally:
        if registry is not None:
            registry.remove(process)
    # A grandchild that left the group may still hold the pipe; do not wait on it for long.
    reader.join(timeout=1.0)
    if not reader.is_alive():
        process.stdout.close()
    duration = time.monotonic() - started
    output = bytes(tail).decode("utf-8", "replace")
    if error is None and registry is not None and registry.killed_for_shutdown and status < 0:
        error = "killed: autoheal is shutting down"
    if error is not None:
        return RunOutcome("error", status, duration, output, error)
    if status == 0:
        return RunOutcome("executed", 0, duration, output)
    if status < 0:
        return RunOutcome("error", status, duration, output, f"killed by signal {-status}")
    return RunOutcome("failed", status, duration, output)


# ---------------------------------------------------------------------------------------------
# Outgoing HTTP and Docker actions
# ---------------------------------------------------------------------------------------------


def docker_plan(argv: Tuple[str, ...]) -> Tuple[str, Tuple[str, ...]]:
    """What a Docker action does: ("restart", containers) or ("compose-restart", services)."""
    words = tuple(argv)
    if words[:2] == ("docker", "restart"):
        kind, names = "restart", words[2:]
    elif words[:3] == ("docker", "compose", "restart") or words[:2] == ("docker-compose", "restart"):
        kind, names = "compose-restart", words[3:] if words[0] == "docker" else words[2:]
    else:
        raise ValueError("docker_api actions are 'docker restart NAME...' or 'docker compose restart SERVICE...'")
    if not names or any(not name or name.startswith("-") for name in names):
        raise ValueError("docker_api actions name one or more containers or services, without options")
    return kind, names


def http_request(method: str, url: str, body: Optional[bytes] = None, headers: Optional[Mapping[str, str]] = None,
                 timeout: float = 5.0, unix_path: Optional[str] = None, limit: int = 8 << 20,
                 context: Any = None, whole: bool = False) -> Tuple[int, bytes]:
    """One exchange with a peer (Alertmanager, Docker, Prometheus, etcd, autoheal): (status, body).

    OSError when nothing answers within timeout, or what answers is not HTTP.  With unix_path
    the request goes over that Unix socket (the Docker socket) whatever the URL's host; context
    is the ssl.SSLContext of an https URL (default: the system's CAs).  whole: timeout bounds
    the whole exchange, not each read (a peer that trickles its answer is abandoned at it).
    """
    import http.client  # outgoing calls only: the server itself never needs it (see Handler)
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        import ssl  # only deployments that use https pay for importing ssl

        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=context or ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname or "localhost", parts.port, timeout=timeout)
    try:
        if unix_path is not None:
            connection.sock = _unix_socket(unix_path, timeout)
        if whole:
            _DEADLINE.value = time.monotonic() + timeout
            connection.connect()
            connection.sock.__class__ = _deadline_class(type(connection.sock))
        connection.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=body,
                           headers=dict(headers or {}))
        response = connection.getresponse()
        data = response.read(limit + 1)
        if len(data) > limit:  # a cut answer is an error, never taken for a whole (empty) one
            raise OSError(f"its answer is larger than {limit} bytes")
        return response.status, data
    except http.client.HTTPException as exc:
        raise OSError(f"bad answer: {exc!r}") from None
    finally:
        connection.close()


# The deadline of the exchange this thread is making (http_request(..., whole=True)).
_DEADLINE = threading.local()
_DEADLINE_CLASSES: Dict[type, type] = {}


def _deadline_class(base: type) -> type:
    """A subclass of a socket's class (plain or TLS) whose every read waits only for what is left
    of this thread's deadline: http.client reads with the socket's timeout, which a peer that
    sends a byte at a time would reset at every byte.  Same layout, so a socket can take it."""
    cls = _DEADLINE_CLASSES.get(base)
    if cls is None:
        def recv_into(self: Any, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
            left = _DEADLINE.value - time.monotonic()
            if left <= 0:
                raise socket.timeout("the whole answer did not come within the deadline")
            self.settimeout(left)
            return base.recv_into(self, buffer, nbytes, flags)

        namespace: Dict[str, Any] = {"recv_into": recv_into}
        if "__slots__" in vars(base):  # socket.socket has slots: the subclass must add none
            namespace["__slots__"] = ()
        cls = _DEADLINE_CLASSES[base] = type(f"Deadline{base.__name__}", (base,), namespace)
    return cls


def describe_failure(exc: OSError, timeout: float) -> str:
    """What went wrong talking to a peer, in words: a name that does not resolve, a refused
    connection and a silent peer call for different fixes."""
    if isinstance(exc, socket.gaierror):
        return f"cannot be reached: its host name does not resolve ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "refused the connection: nothing listens at that address and port"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"did not answer within {format_value(timeout)}s"
    return f"could not be talked to: {exc or type(exc).__name__}"


def decode_answer(raw: bytes) -> Any:
    """A peer's answer: its JSON when it is JSON, else its text."""
    try:
        return json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", "replace").strip()


def answer_reason(data: Any) -> Any:
    """The reason in an error answer: Alertmanager and Docker send a bare string or {message}."""
    return data.get("message", data) if isinstance(data, dict) else data


def _unix_socket(path: str, timeout: float) -> socket.socket:
    """A connected Unix socket, handed to http.client as its connection (the Docker socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


class DockerRefused(Exception):
    """The Docker daemon answered with an error (no such container, conflict, ...)."""


class DockerTlsError(OSError):
    """TLS with a Docker daemon failed: its certificate does not verify, or it refused ours."""


class DockerHosts:
    """A DockerClient per daemon: DOCKER_HOST's, and each action's docker_host (templates filled
    per alert, so at most DOCKER_HOSTS_MAX are kept, the least recently used closed first)."""

    def __init__(self, default_host: str, tls: Optional[Tuple[str, str, str]]):
        self.tls = tls
        self.default = DockerClient(default_host, tls)
        self._lock = threading.Lock()
        self._clients: "collections.OrderedDict[str, DockerClient]" = collections.OrderedDict()

    def get(self, host: Optional[str]) -> DockerClient:
        """The client of host (None: DOCKER_HOST's); ValueError when host is not a Docker host."""
        if host is None or host == self.default.docker_host:
            return self.default
        with self._lock:
            client = self._clients.get(host)
            if client is not None:
                self._clients.move_to_end(host)
                return client
        client = DockerClient(parse_docker_host(host), self.tls)
        with self._lock:
            client = self._clients.setdefault(host, client)
            self._clients.move_to_end(host)
            dropped = self._clients.popitem(last=False)[1] if len(self._clients) > DOCKER_HOSTS_MAX else None
        if dropped is not None:
            dropped.close_idle(0)
        return client

    def close_idle(self, older_than: float = DOCKER_IDLE_SEC) -> None:
        """Close every connection unused for older_than seconds (0: all of them, at the end)."""
        with self._lock:
            clients = [self.default] + list(self._clients.values())
        for client in clients:
            client.close_idle(older_than)


class DockerClient:
    """Just enough of the Docker Engine API of one daemon (DOCKER_HOST, or an action's
    docker_host): list containers, restart one.  A tcp:// daemon is spoken to over TLS when
    DOCKER_TLS_VERIFY is set, as the docker CLI does: the daemon verified against ca.pem, and
    cert.pem/key.pem presented.  Connections are kept for reuse, at most DOCKER_IDLE_MAX idle,
    each closed once unused for DOCKER_IDLE_SEC; nothing is shared between daemons, so a slow one
    never holds up calls to another."""

    def __init__(self, docker_host: str, tls: Optional[Tuple[str, str, str]] = None):
        self.docker_host = docker_host
        self.tls = tls if docker_host.startswith("tcp://") else None
        self._context: Any = None
        self._lock = threading.Lock()
        self._idle: List[Tuple[Any, float]] = []  # (connection, when it was last used), newest last

    def _ssl_context(self) -> Any:
        import ssl

        with self._lock:
            if self._context is None:
                assert self.tls is not None
                ca, cert, key = self.tls
                context = ssl.create_default_context(cafile=ca)
                context.load_cert_chain(cert, key)
                self._context = context
            return self._context

    def _connect(self, timeout: float) -> Any:
        import http.client
        import urllib.parse

        parts = urllib.parse.urlsplit(self.docker_host)
        if parts.scheme == "unix":
            connection = http.client.HTTPConnection("docker", timeout=timeout)
            connection.sock = _unix_socket(parts.path, timeout)
        elif self.tls is not None:
            connection = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                                     context=self._ssl_context())
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
        return connection

    def _take(self, timeout: float) -> Tuple[Any, bool]:
        """An idle connection (True: reused) or a new one; idle ones unused too long are closed."""
        self.close_idle()
        with self._lock:
            found = self._idle.pop()[0] if self._idle else None
        if found is not None:
            found.timeout = timeout
            if found.sock is not None:
                found.sock.settimeout(timeout)
            return found, True
        return self._connect(timeout), False

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            if len(self._idle) < DOCKER_IDLE_MAX:
                self._idle.append((connection, time.monotonic()))
                return
        connection.close()

    def close_idle(self, older_than: float = DOCKER_IDLE_SEC) -> None:
        """Close the connections unused for older_than seconds (0: all of them)."""
        now = time.monotonic()
        with self._lock:
            stale = [connection for connection, used in self._idle if now - used >= older_than]
            self._idle = [(connection, used) for connection, used in self._idle if now - used < older_than]
        for connection in stale:
            connection.close()

    def call(self, method: str, path: str, timeout: float) -> Any:
        """One API call; DockerRefused on an error answer, OSError when the daemon does not answer
        (DockerTlsError when TLS with it fails)."""
        import http.client
        import ssl

        for attempt in (1, 2):
            connection, reused = self._take(timeout)
            try:
                connection.request(method, f"/v{DOCKER_API_VERSION}{path}", headers={"Host": "docker"})
                response = connection.getresponse()
                raw = response.read(8 << 20)
            except ssl.SSLError as exc:
                connection.close()
                raise DockerTlsError(self._tls_problem(exc)) from None
            except (http.client.RemoteDisconnected, BrokenPipeError):
                connection.close()
                if reused and attempt == 1:  # a kept connection the daemon had closed: once more, anew
                    continue
                raise
            except http.client.HTTPException as exc:
                connection.close()
                raise OSError(f"bad answer: {exc!r}") from None
            except OSError:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                self._give_back(connection)
            data = decode_answer(raw)
            if response.status >= 400:
                raise DockerRefused(f"Error response from daemon: {answer_reason(data)}")
            return data
        raise OSError("unreachable")  # pragma: no cover - the loop returns or raises

    def _tls_problem(self, exc: Any) -> str:
        """What went wrong in TLS with the daemon, in words that say where to look."""
        ca, cert, _key = self.tls or ("?", "?", "?")
        if getattr(exc, "verify_message", None):
            return (f"the Docker daemon's certificate at {self.docker_host} does not verify against {ca} "
                    f"({exc.verify_message})")
        return (f"TLS with the Docker daemon at {self.docker_host} failed ({getattr(exc, 'reason', None) or exc}); "
                f"does it accept the client certificate {cert}?")

    def service_containers(self, service: str, project: Optional[str], timeout: float) -> List[str]:
        """Names of the containers of a compose service (within a project when given)."""
        import urllib.parse

        labels = [f"com.docker.compose.service={service}"]
        if project:
            labels.append(f"com.docker.compose.project={project}")
        query = urllib.parse.urlencode({"all": "1", "filters": json.dumps({"label": labels})})
        containers = self.call("GET", f"/containers/json?{query}", timeout) or []
        return sorted(c["Names"][0].lstrip("/") if c.get("Names") else c["Id"] for c in containers)

    def restart(self, name: str, stop_timeout: int, timeout: float) -> None:
        import urllib.parse

        self.call("POST", f"/containers/{urllib.parse.quote(name, safe='')}/restart?t={stop_timeout}", timeout)


def run_docker_action(action: Action, client: DockerClient, project: Optional[str]) -> RunOutcome:
    """Carry out docker restart / docker compose restart through the Engine API.

    Outcomes mirror the CLI: restarted = executed (exit status 0); the daemon refusing = failed
    (exit status 1, its message in the output); the daemon unreachable or too slow = error.
    """
    started = time.monotonic()
    deadline = started + action.timeout_sec
    kind, names = docker_plan(action.argv)
    lines: List[str] = []

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout(f"timed out after {format_value(action.timeout_sec)}s")
        return left

    try:
        if kind == "restart":
            targets = list(names)
        else:
            targets = []
            for service in names:
                found = client.service_containers(service, project, remaining())
                if not found:
                    where = f" in project {project!r}" if project else ""
                    raise DockerRefused(f"no container of compose service {service!r}{where}")
                targets.extend(found)
        for name in targets:
            client.restart(name, action.stop_timeout_sec, remaining())
            lines.append(f"restarted {name}")
    except DockerRefused as exc:
        lines.append(str(exc))
        return RunOutcome("failed", 1, time.monotonic() - started, "\n".join(lines) + "\n")
    except DockerTlsError as exc:
        return RunOutcome("error", None, time.monotonic() - started, "\n".join(lines) + "\n" if lines else "",
                          str(exc))
    except OSError as exc:
        reason = str(exc) or type(exc).__name__
        return RunOutcome("error", None, time.monotonic() - started, "\n".join(lines) + "\n" if lines else "",
                          f"Docker daemon at {client.docker_host} did not answer: {reason}")
    return RunOutcome("executed", 0, time.monotonic() - started, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# The state store: cooldowns and the audit history
# ---------------------------------------------------------------------------------------------


class _Pending:
    """Records waiting for their commit (Store.wait); done once they are committed."""

    __slots__ = ("rows", "texts", "cooldowns", "folds", "control", "heals", "done", "woken", "error")

    def __init__(self, rows: List[Tuple[Any, ...]], texts: List[Tuple[int, str]], cooldowns: Mapping[str, float],
                 folds: List[Tuple[int, float]], control: Optional[str], heals: Mapping[str, Optional[str]],
                 held: bool = False):
        self.rows = rows
        self.texts = texts
        self.cooldowns = cooldowns
        self.folds = folds
        self.control = control
        self.heals = heals
        self.done = False
        # A thread that waits (a worker) sleeps until the writer thread commits; held records are
        # committed by the thread that holds them, which needs no waking.
        self.woken = None if held else threading.Event()
        self.error: Optional[str] = None


def first_event_id() -> int:
    """The first event id of a history that starts empty (memory only, or a fresh state file):
    the wall clock in microseconds, so that ids never go back across a restart (a page that
    reconnects with Last-Event-ID misses nothing) as long as fewer than a million events a second
    were recorded before it.  Below 2**53: exact in JavaScript too."""
    return int(time.time() * 1_000_000)


def retention_class(event: Mapping[str, Any]) -> int:
    """ROUTINE for the decisions a storm repeats (cooldown_skip, skipped, rate_limited) and for
    refused or invalid control commands (anyone can make those), else KEPT: each class has its
    own bounds, so routine events can never evict runs, acks or applied changes."""
    kind, result = event["kind"], event.get("result")
    if (kind == "decision" and result in ROUTINE_RESULTS) or (kind == "control" and result in ("refused", "invalid")):
        return ROUTINE
    return KEPT


def bound_event(event: Dict[str, Any], room: int = MAX_EVENT_BYTES) -> Dict[str, Any]:
    """The event made to fit MAX_EVENT_BYTES, whatever arrived: every string in it (label names,
    fingerprints and times included) cut to MAX_VALUE_CHARS, at most MAX_EVENT_LABELS entries in
    each mapping or list, each cut marked; then shorter cuts; at last the labels and annotations
    but alertname dropped, with how many were ("labels_cut").  Changed in place: the history's
    columns (alertname, result) are read from it too."""
    bounded = event
    for limit in (MAX_VALUE_CHARS, 256, 64):
        bounded = _cut(event, limit)
        if len(_COMPACT_JSON.encode(bounded)) <= room:
            break
    else:
        for key in ("labels", "annotations"):
            mapping = bounded.get(key)
            if isinstance(mapping, dict):
                bounded[key] = {name: value for name, value in mapping.items() if name == "alertname"}
                bounded[key + "_cut"] = bounded.get(key + "_cut", 0) + len(mapping) - len(bounded[key])
    event.clear()
    event.update(bounded)
    return event


def _cut(value: Any, limit: int) -> Any:
    """value with every string cut to limit characters and every mapping or list to
    MAX_EVENT_LABELS entries (alertname kept first), each cut marked."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"...[{len(value) - limit} more characters cut]"
    if isinstance(value, list):
        kept = [_cut(item, limit) for item in value[:MAX_EVENT_LABELS]]
        return kept + ([f"...[{len(value) - MAX_EVENT_LABELS} more cut]"] if len(value) > MAX_EVENT_LABELS else [])
    if not isinstance(value, dict):
        return value
    names = list(value)
    if len(names) > MAX_EVENT_LABELS:  # alertname first, then the others by name
        names = sorted(names, key=lambda name: (name != "alertname", str(name)))[:MAX_EVENT_LABELS]
    kept = {_cut(str(name), limit): _cut(value[name], limit) for name in names}
    for key in ("labels", "annotations"):  # how many of them were left out, beside them
        if isinstance(value.get(key), dict) and len(value[key]) > MAX_EVENT_LABELS:
            kept[key + "_cut"] = len(value[key]) - MAX_EVENT_LABELS
    return kept


# What a summary of an event holds (Store.summaries): the columns of the events table of that name.
_SUMMARY = ("id", "ts", "kind", "alertname", "result")


def _folded(text: str, count: int, last_ts: Optional[float]) -> str:
    """An event's text with the count and last_ts of the repeats folded into it."""
    if count <= 1:
        return text
    return text[:-1] + f',"count":{count},"last_ts":{format_value(last_ts or 0.0)}}}'


def _is_sqlite_file(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == b"SQLite format 3\0"
    except OSError:
        return False


class Store(abc.ABC):
    """Cooldowns and the audit history: what MemoryStore and SqliteStore share, and their methods.

    record() is common: each event is serialised once, its id spliced in front under one small
    lock (_order), and handed to _keep under that same lock, so ids are kept and published in
    order (what /events resumes by).  The history has two retention classes (retention_class),
    each bounded in count (max_events) and in bytes (half of max_bytes); repeats of a routine
    decision are folded into the first one (count, last_ts) instead of becoming events of their own.

    Every method a store must have is abstract: a store that forgets one (load_control, say, and
    with it every override at a restart) cannot be made at all.
    """

    persistent = False
    tag = ""  # replicas: '"replica":"<name>",', spliced into every event after its id

    def __init__(self, max_events: int, max_bytes: int, on_commit: Callable[[List[Tuple[int, str]]], None],
                 log: Callable[..., None]):
        self.max_events = max_events
        self.max_class_bytes = max(1, max_bytes // 2)
        self._on_commit = on_commit
        self._log = log
        self._lock = threading.Lock()  # the rows in memory, or the SQLite connection
        self._order = threading.Lock()  # ids and what is kept: in order
        self._next_id = first_event_id()
        self._totals = [[0, 0], [0, 0]]  # per class: [rows, bytes]
        self.write_errors = 0
        self.replaced = 0
        self.commits = 0
        self.recovered: Optional[Dict[str, str]] = None

    def record(self, events: List[Dict[str, Any]], cooldowns: Optional[Mapping[str, float]] = None,
               folds: Optional[List[Tuple[Dict[str, Any], float]]] = None,
               control: Optional[Callable[[int], str]] = None,
               heals: Optional[Mapping[str, Optional[str]]] = None,
               held: Optional[List[_Pending]] = None,
               made: Optional[List[Optional[str]]] = None) -> List[Tuple[int, str]]:
        """Record events, cooldown starts and folded repeats ((event, when)); returns the events'
        (id, JSON text) once they are durable.  control, given the first event's id, returns the
        runtime control state to keep with them, in the same commit; heals are the pending heal
        verdicts to keep (fingerprint: JSON) or drop (fingerprint: None).  With held, the commit
        is not waited for but put in that list: the caller waits for it (wait) before it answers.

        Each event is serialised once, here, outside any lock: the same text goes to the
        database, the log and the /events listeners.  Its id is spliced in front under the order
        lock.  made: an event's JSON text where the caller made it already (Decision.decision_event),
        its event then holding only what the rows and the notifier read (ts, kind, alertname, result).
        """
        encode = compact_json
        room = MAX_EVENT_BYTES - len(self.tag) - 96  # the id, the replica and a fold's count are added
        if made is not None and events and None not in made and max(map(len, made)) <= room:
            bodies: List[str] = made  # every text made already, none too long (a storm's: looked at in C)
        else:
            bodies = []
            for index, event in enumerate(events):
                given = made[index] if made is not None else None
                body = encode(event) if given is None else given
                if len(body) > room:
                    if given is not None:  # the whole event, to be cut as one
                        event.update(json.loads(given))
                        made[index] = None  # the caller's made text no longer says it (Journal.record)
                    body = encode(bound_event(event, room))  # cut in place: the rows' columns are read from it
                bodies.append(body)
        with self._order:
            first = self._next_id
            self._next_id += len(events)
            tag = self.tag
            texts = []
            rows = []
            for event_id, event, body in zip(itertools.count(first), events, bodies):  # one pass: a storm's 5,000
                text = f'{{"id":{event_id},{tag}{body[1:]}'
                texts.append((event_id, text))
                rows.append((event_id, event["ts"], event["kind"], event.get("alertname"), event.get("result"), text,
                             retention_class(event), len(text)))
                event["id"] = event_id
            # A repeat folds into an event recorded before or in this same call (its id is known now).
            # (one whose first event another thread has not recorded yet is left uncounted: rare)
            repeats = [(event["id"], when) for event, when in folds or () if "id" in event]
            pending = _Pending(rows, texts, cooldowns or {}, repeats, control(first) if control else None,
                               heals or {}, held is not None)
            queued = self._keep(pending)
        if queued:
            if held is None:
                self.wait(pending)
            else:
                held.append(pending)
        return texts

    @abc.abstractmethod
    def _keep(self, pending: _Pending) -> bool:
        """Keep records (under the order lock); True when they wait for a commit (wait)."""

    def wait(self, pending: _Pending) -> None:
        """Return once pending is committed; raise if its commit failed."""
        if pending.error:
            raise sqlite3.OperationalError(pending.error)

    def commit_now(self) -> bool:
        """Commit what is queued if that waits on nobody (no other commit under way, no other
        program holding the file's write lock): False when it would have to wait."""
        return True

    @abc.abstractmethod
    def load_control(self) -> Optional[str]:
        """The runtime control state as last kept (JSON), or None."""

    @abc.abstractmethod
    def tidy(self) -> None:
        """Housekeeping for a quiet moment (pruning near the bounds)."""

    @abc.abstractmethod
    def load_heals(self) -> Dict[str, str]:
        """The heal verdicts still pending, by fingerprint (JSON each)."""

    def last_id(self) -> int:
        """The id of the latest event recorded (0: none yet)."""
        with self._order:
            return self._next_id - 1

    @abc.abstractmethod
    def load_cooldowns(self) -> Dict[str, float]:
        """Start time of each alertname's last cooldown, as recorded."""

    @abc.abstractmethod
    def load_budget_times(self, since: float, budget: int) -> List[float]:
        """When the newest runs (real or dry, at most budget of them) since then happened, for the
        global budget."""

    @abc.abstractmethod
    def query(self, limit: int, since: Optional[float] = None, after: Optional[int] = None,
              before: Optional[int] = None, **equal: Optional[str]) -> List[Tuple[int, str]]:
        """Recorded events as (id, text): newest first (with before, those older than that id), or
        with after, the oldest ones after that id.  equal filters on alertname, kind and result
        (None: any)."""

    @abc.abstractmethod
    def summaries(self, limit: int, since: Optional[float] = None,
                  kind: Optional[str] = None) -> List[Dict[str, Any]]:
        """The newest events' id, ts, kind, alertname and result only (what the page shows), none
        of their texts read: a page costs no more than its marks, however large the events."""

    @abc.abstractmethod
    def get(self, event_id: int) -> Optional[Dict[str, Any]]:
        """One recorded event by its id."""

    @abc.abstractmethod
    def oldest(self) -> Dict[str, Optional[float]]:
        """How far back each retention class reaches: the time of its oldest event (None: empty)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commit what is queued and let go of the storage."""


class MemoryStore(Store):
    """The history in memory only: nothing survives a restart (AUTOHEAL_STATE_FILE empty), so
    there is nothing to load at start, and pruning happens as records are kept."""

    def load_control(self) -> Optional[str]:
        return None

    def load_heals(self) -> Dict[str, str]:
        return {}

    def load_cooldowns(self) -> Dict[str, float]:
        return {}

    def load_budget_times(self, since: float, budget: int) -> List[float]:
        return []

    def tidy(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __init__(self, max_events: int, max_bytes: int, on_commit: Callable[[List[Tuple[int, str]]], None],
                 log: Callable[..., None]):
        super().__init__(max_events, max_bytes, on_commit, log)
        # Rows [id, ts, kind, alertname, result, text, class, size, count, last_ts], by class and by id.
        self._memory: Tuple[collections.deque, collections.deque] = (collections.deque(), collections.deque())
        self._memory_by_id: Dict[int, List[Any]] = {}

    def _keep(self, pending: _Pending) -> bool:
        """Keep the rows, fold the repeats, evict the oldest of a class past its bounds."""
        with self._lock:
            for row in pending.rows:
                entry = list(row) + [1, None]
                cls = row[6]
                self._memory[cls].append(entry)
                self._memory_by_id[row[0]] = entry
                totals = self._totals[cls]
                totals[0] += 1
                totals[1] += row[7] + MEMORY_ROW_OVERHEAD  # what a row costs beside its text, measured
                while totals[0] > self.max_events or totals[1] > self.max_class_bytes:
                    old = self._memory[cls].popleft()
                    del self._memory_by_id[old[0]]
                    totals[0] -= 1
                    totals[1] -= old[7] + MEMORY_ROW_OVERHEAD
            for event_id, when in pending.folds:
                entry = self._memory_by_id.get(event_id)
                if entry is not None:
                    entry[8] += 1
                    entry[9] = when
        self._on_commit(pending.texts)
        return False

    def _rows(self, limit: int, since: Optional[float], after: Optional[int], before: Optional[int],
              equal: Mapping[str, Optional[str]]) -> List[List[Any]]:
        import heapq

        wanted = {name: value for name, value in equal.items() if value is not None}
        with self._lock:
            kept, routine = (list(rows) for rows in self._memory)
        if after is None:  # both classes are in id order: merge them, newest first
            snapshot = heapq.merge(reversed(kept), reversed(routine), key=lambda row: -row[0])
        else:
            snapshot = heapq.merge(kept, routine, key=lambda row: row[0])
        columns = {"kind": 2, "alertname": 3, "result": 4}
        found = []
        for row in snapshot:
            if ((since is not None and row[1] < since) or (after is not None and row[0] <= after)
                    or (before is not None and row[0] >= before)):
                continue
            if any(row[columns[name]] != value for name, value in wanted.items()):
                continue
            found.append(row)
            if len(found) >= limit:
                break
        return found

    def query(self, limit: int, since: Optional[float] = None, after: Optional[int] = None,
              before: Optional[int] = None, **equal: Optional[str]) -> List[Tuple[int, str]]:
        return [(row[0], _folded(row[5], row[8], row[9])) for row in self._rows(limit, since, after, before, equal)]

    def summaries(self, limit: int, since: Optional[float] = None,
                  kind: Optional[str] = None) -> List[Dict[str, Any]]:
        return [dict(zip(_SUMMARY, row[:5])) for row in self._rows(limit, since, None, None, {"kind": kind})]

    def get(self, event_id: int) -> Optional[Dict[str, Any]]:
        with self._lock:
            row = self._memory_by_id.get(event_id)
        return json.loads(row[5]) if row else None

    def oldest(self) -> Dict[str, Optional[float]]:
        with self._lock:
            return {name: (self._memory[cls][0][1] if self._memory[cls] else None)
                    for cls, name in enumerate(RETENTION_CLASSES)}


# A cooldown start updated in place: REPLACE deletes the row and inserts it anew, which touched
# three scattered pages of the table and its key index per alertname, twice the WAL per commit
# of webhooks over many alertnames (15.5 pages against 6.9 for 16 of 1,000).  UPSERT: SQLite 3.24.
_SET_COOLDOWN = ("INSERT INTO cooldowns VALUES (?, ?)"
                 " ON CONFLICT (alertname) DO UPDATE SET started_at = excluded.started_at"
                 if sqlite3.sqlite_version_info >= (3, 24) else "INSERT OR REPLACE INTO cooldowns VALUES (?, ?)")


def mark_clean(path: str, totals: List[List[int]]) -> None:
    """After a clean close (the WAL checkpointed away, no failed write), leave the file's
    size, modification time and inode beside it in <file>.clean, with the history's totals.
    The next start finds the file as it was left and skips reading all of it twice: the
    quick_check (about 40 ms for 48 MB here, and it grows with the file) and the totals.
    Anything that touched the file since (damage, another program) changes its time; a
    crash leaves no mark at all (the start removes it): the check runs."""
    if os.path.exists(path + "-wal"):
        return
    try:
        stat = os.stat(path)
        counts = " ".join(str(number) for cls in (KEPT, ROUTINE) for number in totals[cls])
        with open(path + ".clean.tmp", "w") as mark:
            mark.write(f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ino} {counts}\n")
        os.replace(path + ".clean.tmp", path + ".clean")
    except OSError:
        pass


def left_clean(path: str) -> Optional[List[List[int]]]:
    """The history's totals when the file is exactly as a clean close left it (see
    mark_clean), else None.  The mark is removed either way, so that a crash of this run is
    checked at the next start."""
    try:
        with open(path + ".clean") as mark:
            size, mtime, inode, *totals = (int(word) for word in mark.read().split())
        os.unlink(path + ".clean")
        stat = os.stat(path)
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(path + ".clean")
        return None
    if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != (size, mtime, inode) or len(totals) != 4 or (
            os.path.exists(path + "-wal")):
        return None
    return [totals[0:2], totals[2:4]]


class WalCheckpointer:
    """The state file's checkpoints: a thread of its own that copies the WAL back into the file
    after each CHECKPOINT_BYTES of history committed (wrote), beside the commits."""

    def __init__(self, store: "SqliteStore"):
        self.store = store
        self._written = 0  # bytes of history committed since the last checkpoint was asked for
        self._due = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="checkpoint", daemon=True)
        self._thread.start()

    def wrote(self, size: int, rows: int) -> None:
        """A commit of rows events wrote about size bytes (by the committing thread only)."""
        self._written += size
        # A storm commits hundreds of events at a time, and each such commit rewrites the same
        # pages (the cooldown starts of all its alertnames, the ends of the table and indexes):
        # checkpointed after every one, they were copied again and again (a storm of 5,000
        # after 22 others, one core, three alternating runs: 126-165 ms against 134-221 ms).
        # Its pages wait for the next small commit, or for the WAL's bound inside a commit.
        if self._written >= CHECKPOINT_BYTES and rows < CHECKPOINT_BULK_ROWS:
            self._written = 0
            self._due.set()

    def idle(self) -> None:
        """Requests paused (SqliteStore.tidy): the pages of bulk commits are copied back now, so
        that the next storm's commit does not find the WAL at its bound and copy them itself (a
        commit of 5,000 events every fifth storm or so: 45-55 ms more)."""
        if self._written >= CHECKPOINT_BYTES:
            self._written = 0
            self._due.set()

    def close(self) -> None:
        self._closing = True
        self._due.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        """Copy the WAL's new pages back into the file (a passive checkpoint) after each
        CHECKPOINT_BYTES of history, on a connection of its own, beside the commits.

        SQLite's default is a checkpoint inside the commit that fills 1,000 pages of WAL: that
        commit, and every request waiting for it, then waits for the copy and two fsyncs.
        Measured under 16 connections of dry-run webhooks on one core: p99 9 ms, against 2 ms
        with no checkpoint at all, and 3.5 ms with this (4.3 ms after each 256 KiB, 9 ms after
        each MiB: the copy competes with the requests for the one core, so smaller is smoother;
        below 128 KiB the throughput fell).  A checkpoint only when requests pause left a load
        that never pauses to the 4,096-page bound inside a commit: 20 ms.  A lower priority for
        this thread made it worse (p99 5-17 ms): it fell behind."""
        connection: Optional[sqlite3.Connection] = None  # kept open: opening it for each cost 3 % of req/s
        replaced = self.store.replaced
        while True:
            self._due.wait()
            self._due.clear()
            if self._closing:
                break
            try:
                if connection is None or replaced != self.store.replaced:  # the file was replaced: its successor
                    if connection is not None:
                        connection.close()
                    connection, replaced = None, self.store.replaced
                    connection = sqlite3.connect(self.store.existing_file(), uri=True, check_same_thread=False)
                # Again while commits came in meanwhile, so that little is left for the commit
                # that reaches the WAL's bound.  (Only a checkpoint by the committing connection
                # lets SQLite start the WAL over, measured: so the WAL grows to that bound, and
                # the commit there finds almost nothing left to copy.)
                for _ in range(4):
                    _busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
                    if frames == copied:
                        break
            except sqlite3.Error:  # after the next CHECKPOINT_BYTES, or inside a commit past the bound
                if connection is not None:
                    with contextlib.suppress(sqlite3.Error):
                        connection.close()
                connection = None
        if connection is not None:
            connection.close()  # before the writer's own: the last one to close checkpoints and ends the WAL


# The state file's tables.
SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL,"
    " alertname TEXT, result TEXT, body TEXT NOT NULL, cls INTEGER NOT NULL DEFAULT 0,"
    " size INTEGER NOT NULL DEFAULT 0, count INTEGER NOT NULL DEFAULT 1, last_ts REAL)",
    # No index but the ids: each costs every event recorded its own insert (a storm of 5,000:
    # 3-4 ms each, of 80).  With many alertnames an index on alertname put each event on a leaf
    # page of its own, so every commit wrote a page of WAL per event.  /history's filters and
    # since= read the table backwards by id, which SQLite chose over events_by_ts anyway (to
    # avoid a sort): 14 ms through 100,000 events.  Pruning finds a class's oldest events from
    # the id of its oldest (SqliteStore._oldest), not through events_by_class.
    "DROP INDEX IF EXISTS events_by_alertname",
    "DROP INDEX IF EXISTS events_by_ts",
    "DROP INDEX IF EXISTS events_by_class",
    "CREATE TABLE IF NOT EXISTS cooldowns (alertname TEXT PRIMARY KEY, started_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS control (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS heals (fingerprint TEXT PRIMARY KEY, body TEXT NOT NULL)",
)
# Databases written before the retention classes lack these columns.
SQLITE_COLUMNS = (("cls", "INTEGER NOT NULL DEFAULT 0"), ("size", "INTEGER NOT NULL DEFAULT 0"),
            ("count", "INTEGER NOT NULL DEFAULT 1"), ("last_ts", "REAL"))


def write_state(connection: sqlite3.Connection, cooldowns: Mapping[str, float], control: Optional[str],
                 heals: Mapping[str, Optional[str]]) -> None:
    """Cooldown starts, the runtime control state and pending heal verdicts (None: dropped),
    inside the caller's transaction: at each commit, and again into a reopened file."""
    if cooldowns:  # most commits carry none of these: no statement for them on the hot path
        connection.executemany(_SET_COOLDOWN, cooldowns.items())
    if control is not None:
        connection.execute("INSERT OR REPLACE INTO control VALUES (1, ?)", (control,))
    for fingerprint, body in heals.items():
        if body is None:
            connection.execute("DELETE FROM heals WHERE fingerprint = ?", (fingerprint,))
        else:
            connection.execute("INSERT OR REPLACE INTO heals VALUES (?, ?)", (fingerprint, body))


def file_identity(path: str) -> Tuple[Tuple[int, int], ...]:
    """Device and inode of the state file (and its WAL, once there is one); () if gone."""
    found = []
    for suffix in ("", "-wal"):
        try:
            info = os.stat(path + suffix)
        except OSError:
            if suffix:
                continue
            return ()
        found.append((info.st_dev, info.st_ino))
    return tuple(found)


def history_sql(columns: str, limit: int, since: Optional[float], after: Optional[int], before: Optional[int],
                equal: Mapping[str, Optional[str]]) -> Tuple[str, List[Any]]:
    """The query of the state file's history: its columns, newest first (older than before), or
    the oldest after an id; equal filters on alertname, kind and result (None: any)."""
    wanted = {name: value for name, value in equal.items() if value is not None}
    sql = f"SELECT {columns} FROM events WHERE 1 = 1"
    parameters: List[Any] = []
    for name, value in sorted(wanted.items()):
        sql += f" AND {name} = ?"
        parameters.append(value)
    if since is not None:
        sql += " AND ts >= ?"
        parameters.append(since)
    if before is not None:
        sql += " AND id < ?"
        parameters.append(before)
    if after is not None:
        sql += " AND id > ? ORDER BY id LIMIT ?"
        parameters.append(after)
    else:
        sql += " ORDER BY id DESC LIMIT ?"
    parameters.append(limit)
    return sql, parameters


class _Busy(sqlite3.OperationalError):
    """Another program holds the state file's write lock (BEGIN IMMEDIATE was refused)."""


_ROW_CLASS = operator.itemgetter(6)  # of a row of the events table as SqliteStore writes it
_ROW_SIZE = operator.itemgetter(7)


def count_rows(rows: List[Tuple[Any, ...]], totals: List[List[int]], oldest: List[Tuple[Any, Any]]) -> int:
    """Count committed rows in their classes' totals ([rows, bytes] each) and oldest events ((id,
    ts) each); their bytes.  Rows of one class (a storm's 5,000) are counted in C, not one by
    one; a batch's rows are in id order, so its first of a class is its oldest.  A replaced
    file's ids may be higher than ours (SqliteStore._check_identity): a class's oldest is
    lowered, never raised."""
    written = sum(map(_ROW_SIZE, rows))
    classes = set(map(_ROW_CLASS, rows))
    for cls in classes:
        mine = rows if len(classes) == 1 else [row for row in rows if row[6] == cls]
        totals[cls][0] += len(mine)
        totals[cls][1] += written if mine is rows else sum(map(_ROW_SIZE, mine))
        if oldest[cls][0] is None or mine[0][0] < oldest[cls][0]:
            oldest[cls] = (mine[0][0], mine[0][1])
    return written


class SqliteStore(Store):
    """The history and the cooldowns in a SQLite file (WAL, group commit).

    Records queue in id order, and nothing answers before its records are committed, so an
    answer never describes something a crash could lose.  Whoever commits takes everything
    queued by then into one transaction (group commit), which keeps durability cheap under
    concurrent load.  Workers' records are committed by a writer thread while they wait; the
    records of a whole round of dry-run webhooks answered by the selector thread are committed
    by that thread when it waits on nobody (commit_now), else by the round committer
    (RoundCommitter.hand).  One thread commits at a time (_committing), so commits keep the
    ids' order.
    """

    persistent = True

    def __init__(self, path: str, max_events: int, max_bytes: int,
                 on_commit: Callable[[List[Tuple[int, str]]], None], log: Callable[..., None]):
        super().__init__(max_events, max_bytes, on_commit, log)
        self.path = path
        self._oldest: List[Tuple[Any, Any]] = [(None, None), (None, None)]  # per class: its oldest event's id, ts
        self._connection: Optional[sqlite3.Connection] = None
        self._identity: Tuple[Tuple[int, int], ...] = ()
        self._cooldowns: Dict[str, float] = {}
        self._control: Optional[str] = None
        self._heals: Dict[str, str] = {}
        self._queue: "collections.deque[_Pending]" = collections.deque()  # under _order, in id order
        self._committing = threading.Lock()  # held by the one thread committing
        self._doorbell: "queue.SimpleQueue[Optional[_Pending]]" = queue.SimpleQueue()  # for the writer
        self._writer: Optional[threading.Thread] = None
        self._checkpointer: Optional[WalCheckpointer] = None
        self._closing = False
        self._open(path)

    # -- opening, damage and a vanished file ----------------------------------------------

    def _open(self, path: str) -> None:
        clean = left_clean(path)
        try:
            connection = self._connect(path, check=clean is None)
        except sqlite3.DatabaseError as exc:
            if not _is_sqlite_file(path) or isinstance(exc, sqlite3.OperationalError) and "malformed" not in str(exc):
                raise  # not a database of autoheal's at all (a wrong path?): never moved
            # A damaged file must not mean a crash loop: keep it for a post-mortem, start afresh.
            moved = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, moved + suffix)
            self.recovered = {"moved_to": moved, "reason": str(exc)[:300]}
            connection = self._connect(path, check=False)
            clean = None
        self._connection = connection
        self._identity = file_identity(self.path)
        self._load_totals(connection, clean)
        newest = connection.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        self._next_id = newest + 1 if newest else first_event_id()
        self._cooldowns = dict(connection.execute("SELECT alertname, started_at FROM cooldowns").fetchall())
        row = connection.execute("SELECT state FROM control WHERE id = 1").fetchone()
        self._control = row[0] if row else None
        self._heals = dict(connection.execute("SELECT fingerprint, body FROM heals").fetchall())
        self._writer = threading.Thread(target=self._write_loop, name="state-writer", daemon=True)
        self._writer.start()
        self._checkpointer = WalCheckpointer(self)

    def _connect(self, path: str, check: bool) -> sqlite3.Connection:
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            connection.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives a crash of the process (SIGKILL); only power loss
            # can take back the last commits.
            connection.execute("PRAGMA synchronous = NORMAL")
            # Writes append to the ends of the tables' trees; 512 KiB of page cache does for
            # them what the default 2 MiB did, which then stayed resident after a storm.
            connection.execute("PRAGMA cache_size = -512")
            # Checkpoints run beside the commits (WalCheckpointer), not inside one that requests
            # wait for; a commit checkpoints itself only past 16 MiB of WAL, if that fell behind.
            connection.execute("PRAGMA wal_autocheckpoint = 4096")
            if check:
                verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed: {verdict}")
            for statement in SQLITE_SCHEMA:
                connection.execute(statement)
            present = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
            for name, declaration in SQLITE_COLUMNS:
                if name not in present:
                    connection.execute(f"ALTER TABLE events ADD COLUMN {name} {declaration}")
                    if name == "cls":
                        connection.execute(
                            "UPDATE events SET cls = 1 WHERE kind = 'decision' AND result IN "
                            f"({', '.join(repr(result) for result in ROUTINE_RESULTS)})")
                    elif name == "size":
                        connection.execute("UPDATE events SET size = length(body)")
        except (sqlite3.Error, ValueError):
            connection.close()
            raise
        return connection

    def _load_totals(self, connection: sqlite3.Connection, known: Optional[List[List[int]]] = None) -> None:
        """Rows and bytes of each retention class (known: as a clean close recorded them), and the
        id and time of its oldest event, as stored."""
        self._totals = [[0, 0], [0, 0]]
        for cls in (KEPT, ROUTINE):
            if known is not None:
                self._totals[cls] = list(known[cls])
            else:
                count, size = connection.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM events WHERE cls = ?", (cls,)).fetchone()
                self._totals[cls] = [count, size]
            self._find_oldest(connection, cls)

    def _find_oldest(self, connection: sqlite3.Connection, cls: int, after: int = 0) -> None:
        """Keep the id and time of the class's oldest event past the id after (none of it is older),
        read by id from there: with no index on the class, the other class's events between are read once."""
        row = connection.execute("SELECT id, ts FROM events WHERE cls = ? AND id > ? ORDER BY id LIMIT 1",
                                 (cls, after)).fetchone()
        self._oldest[cls] = (row[0], row[1]) if row else (None, None)

    def existing_file(self) -> str:
        """The state file as an SQLite URI that never creates it (mode=rw).  Only '%', '?' and
        '#' mean something in its path (SQLite's URI filenames): escaped here, without importing
        urllib.parse (2 ms and 0.4 MiB of every start)."""
        path = self.path.replace("%", "%25").replace("?", "%3F").replace("#", "%23")
        return f"file:{path}?mode=rw"


    def _check_identity(self) -> None:
        """Reopen the state file if it was moved, deleted or replaced under the running process:
        writing on would put every commit into a file that no restart will read."""
        now = file_identity(self.path)
        if now and now[:len(self._identity)] == self._identity:
            self._identity = now
            return
        self.replaced += 1
        self._log({"event": "error", "message": f"state file {self.path!r} was moved, deleted or replaced while "
                   "autoheal ran; reopening it and writing the cooldowns again (the history before now is in "
                   "the file that was moved, if it still exists)"}, "error")
        try:
            self._connection.close()  # type: ignore[union-attr]
        except sqlite3.Error:
            pass
        for suffix in ("-wal", "-shm"):
            if not now and os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)
        connection = self._connect(self.path, check=False)
        connection.execute("BEGIN IMMEDIATE")
        write_state(connection, self._cooldowns, self._control, self._heals)
        connection.execute("COMMIT")
        self._load_totals(connection)
        self._connection = connection
        self._identity = file_identity(self.path)

    # -- reading at start -----------------------------------------------------------------

    def load_cooldowns(self) -> Dict[str, float]:
        with self._lock:
            return dict(self._cooldowns)

    def load_control(self) -> Optional[str]:
        with self._lock:
            return self._control

    def load_heals(self) -> Dict[str, str]:
        with self._lock:
            return dict(self._heals)

    def load_budget_times(self, since: float, budget: int) -> List[float]:
        if not budget:
            return []
        with self._lock:  # the newest runs by time (not by id: a stepped clock), read through once at start
            rows = self._connection.execute(
                "SELECT ts FROM events WHERE ts >= ? AND (kind = 'run' OR (kind = 'decision' AND result = 'dry_run'))"
                " ORDER BY ts DESC LIMIT ?", (since, budget)).fetchall()
        return [row[0] for row in reversed(rows)]

    # -- recording ------------------------------------------------------------------------

    def _keep(self, pending: _Pending) -> bool:
        """Queue the records; record() (or its caller) waits for their commit outside the lock."""
        if pending.woken is not None and (self._writer is None or not self._writer.is_alive()):
            raise sqlite3.OperationalError("state file writer is not running")
        self._queue.append(pending)
        if pending.woken is not None:
            self._doorbell.put(pending)
        return True

    def wait(self, pending: _Pending) -> None:
        if pending.woken is not None:
            pending.woken.wait()
        while not pending.done:
            self._commit_queued()
        super().wait(pending)

    def _write_loop(self) -> None:
        while True:
            pending = self._doorbell.get()
            if pending is None:
                return
            while not pending.done:
                self._commit_queued()
            del pending  # an idle writer keeps no records alive: a storm's are megabytes

    def tidy(self) -> None:
        """When requests pause (App.housekeeping): a class near its bounds is pruned now, in
        a commit of its own, down to nine tenths, rather than a little at a time inside the
        commits of the webhooks that reach them (_prune).  Deleting a tenth of 100,000 events
        takes about 20 ms, which no request waits for here.  A checkpoint that bulk commits left
        owing starts now too (WalCheckpointer.idle)."""
        if self._checkpointer is not None:
            self._checkpointer.idle()
        with self._committing, self._lock:
            connection = self._connection
            if connection is None or self._closing or not any(self._near_bounds(cls) for cls in (KEPT, ROUTINE)):
                return
            try:
                with self._transaction() as connection:
                    for cls in (KEPT, ROUTINE):
                        self._prune(connection, cls, early=True)
            except sqlite3.Error as exc:
                self._log({"event": "error", "message": f"state file: pruning the history failed: {exc}"}, "error")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the state file (the caller holds _lock), reopened first if it
        was replaced; rolled back on any failure, and the history's totals read again from the file."""
        if self._connection is None:
            raise sqlite3.OperationalError("the state file is closed")
        self._check_identity()
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # nothing written: nothing to roll back or count again
            if "locked" in str(exc) or "busy" in str(exc):
                raise _Busy(str(exc)) from None
            raise
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            self._load_totals(connection)
            raise

    def commit_now(self) -> bool:
        if not self._committing.acquire(blocking=False):
            return False
        try:  # one batch: the caller asks again while what it waits for is not committed
            with self._order:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 1024))]
            if not batch:
                return True
            if self._connection is not None:
                self._connection.execute("PRAGMA busy_timeout = 0")  # another program's lock: not waited for
            try:
                self._commit_batch(batch, wait=False)
            except _Busy:
                with self._order:  # back where they were, in order, for a thread that may wait
                    self._queue.extendleft(reversed(batch))
                return False
            finally:
                if self._connection is not None:
                    self._connection.execute("PRAGMA busy_timeout = 5000")
            return True
        finally:
            self._committing.release()

    def _commit_queued(self) -> None:
        """Commit what is queued (up to 1,024 records) in one transaction: nothing when another
        thread committed it meanwhile.  A failed commit fails its batch loudly, and the next goes on."""
        with self._committing:
            with self._order:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 1024))]
            if not batch:
                return
            self._commit_batch(batch)

    def _commit_batch(self, batch: List[_Pending], wait: bool = True) -> None:
        """Commit a batch (the caller holds _committing).  Without wait, _Busy (the batch untouched)
        when another program holds the file's write lock; any other failure fails the batch
        loudly, and the store goes on."""
        try:
            self._commit(batch)
        except _Busy:
            if wait:
                self._fail(batch, sqlite3.OperationalError("database is locked"))
                return
            raise
        except BaseException as exc:  # the store must outlive whatever one batch does
            self._fail(batch, exc)

    def _fail(self, batch: List[_Pending], exc: BaseException) -> None:
        message = f"state file write failed: {type(exc).__name__}: {exc}"
        self.write_errors += 1
        self._log({"event": "error", "message": message}, "error")
        for failed in batch:
            failed.error = message
            failed.done = True
            if failed.woken is not None:
                failed.woken.set()

    def _commit(self, batch: List[_Pending]) -> None:
        rows: List[Tuple[Any, ...]] = []
        cooldowns: Dict[str, float] = {}
        folds: Dict[int, List[Any]] = {}
        committed: List[Tuple[int, str]] = []
        control = None
        heals: Dict[str, Optional[str]] = {}
        for pending in batch:
            rows.extend(pending.rows)
            committed.extend(pending.texts)
            cooldowns.update(pending.cooldowns)
            control = pending.control if pending.control is not None else control
            heals.update(pending.heals)
            for event_id, when in pending.folds:
                fold = folds.setdefault(event_id, [0, when])
                fold[0] += 1
                fold[1] = max(fold[1], when)
        with self._lock:
            with self._transaction() as connection:
                connection.executemany("INSERT INTO events (id, ts, kind, alertname, result, body, cls, size)"
                                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                if folds:
                    connection.executemany("UPDATE events SET count = count + ?, last_ts = ? WHERE id = ?",
                                           [(count, when, event_id) for event_id, (count, when) in folds.items()])
                write_state(connection, cooldowns, control, heals)
                written = count_rows(rows, self._totals, self._oldest)
                for cls in (KEPT, ROUTINE):
                    self._prune(connection, cls)
            self._cooldowns.update(cooldowns)
            self._control = control if control is not None else self._control
            for fingerprint, body in heals.items():
                if body is None:
                    self._heals.pop(fingerprint, None)
                else:
                    self._heals[fingerprint] = body
            self.commits += 1
            if len(self._identity) < 2:
                self._identity = file_identity(self.path)  # the WAL exists from the first commit on
            if self._checkpointer is not None:  # the size of the rows, and the index and cooldown pages
                self._checkpointer.wrote(written + 8192, len(rows))
        self._on_commit(committed)
        for pending in batch:
            pending.done = True
            if pending.woken is not None:
                pending.woken.set()

    def _near_bounds(self, cls: int, early: bool = True) -> bool:
        """Whether a class is past its bounds (early: past nineteen twentieths of them)."""
        totals = self._totals[cls]
        count, size = self.max_events, self.max_class_bytes
        if early:
            count, size = count - count // 20, size - size // 20
        return totals[0] > count or totals[1] > size

    def _prune(self, connection: sqlite3.Connection, cls: int, early: bool = False) -> None:
        """Past a class's bounds, delete its oldest rows down to them, less a thousandth: under a
        load that never pauses, a short DELETE every thousandth of the bound.  Early (when
        requests pause, past nineteen twentieths of the bounds): down to nine tenths of them.

        Nine tenths inside a commit held the webhooks of that commit for 20-30 ms every tenth of
        100,000 events, a wait that wrk counts again for every request it would have sent
        meanwhile (its correction for coordinated omission): p99 16 ms at the bound, 3.8 now."""
        if not self._near_bounds(cls, early):
            return
        totals, share = self._totals[cls], 10 if early else 1000
        count_goal = self.max_events - self.max_events // share
        bytes_goal = self.max_class_bytes - self.max_class_bytes // share
        first = self._oldest[cls][0] or 1  # none of the class is older: read by id from there
        last = first - 1
        while totals[0] > count_goal or totals[1] > bytes_goal:
            # As many as the bounds want (1-1,000): the other class's events between are read only once.
            over = max(totals[0] - count_goal, (totals[1] - bytes_goal) * totals[0] // max(1, totals[1]))
            chunk = connection.execute("SELECT id, size FROM events WHERE cls = ? AND id > ? ORDER BY id LIMIT ?",
                                       (cls, last, min(1000, max(1, over)))).fetchall()
            if not chunk:
                break
            for event_id, size in chunk:
                last = event_id
                totals[0] -= 1
                totals[1] -= size
                if totals[0] <= count_goal and totals[1] <= bytes_goal:
                    break
        if last >= first:
            connection.execute("DELETE FROM events WHERE cls = ? AND id >= ? AND id <= ?", (cls, first, last))
            self._find_oldest(connection, cls, last)

    # -- reading --------------------------------------------------------------------------

    def _select(self, columns: str, limit: int, since: Optional[float], after: Optional[int],
                before: Optional[int], equal: Mapping[str, Optional[str]]) -> List[Tuple[Any, ...]]:
        if not (self._totals[KEPT][0] or self._totals[ROUTINE][0]):  # nothing committed (a new file): no reader
            return []
        return self._read(*history_sql(columns, limit, since, after, before, equal))

    def query(self, limit: int, since: Optional[float] = None, after: Optional[int] = None,
              before: Optional[int] = None, **equal: Optional[str]) -> List[Tuple[int, str]]:
        return [(event_id, _folded(body, count, last_ts)) for event_id, body, count, last_ts
                in self._select("id, body, count, last_ts", limit, since, after, before, equal)]

    def summaries(self, limit: int, since: Optional[float] = None,
                  kind: Optional[str] = None) -> List[Dict[str, Any]]:
        return [dict(zip(_SUMMARY, row))
                for row in self._select(", ".join(_SUMMARY), limit, since, None, None, {"kind": kind})]

    def get(self, event_id: int) -> Optional[Dict[str, Any]]:
        rows = self._read("SELECT body FROM events WHERE id = ?", [event_id])
        return json.loads(rows[0][0]) if rows else None

    def oldest(self) -> Dict[str, Optional[float]]:
        # Without the lock: a commit holds it while it waits on the disk (another program's write
        # lock: up to SQLite's busy timeout), and GET / and /metrics must not wait with it.
        return dict(zip(RETENTION_CLASSES, [ts for _id, ts in list(self._oldest)]))

    def _read(self, sql: str, parameters: List[Any]) -> List[Tuple[Any, ...]]:
        """A query on a connection of its own: WAL lets readers run beside the writer.  The file
        must exist: a reader never creates a stray empty one, and a vanished one is reopened first
        (unless a commit is under way: it checks that itself, and a reader does not wait for it)."""
        if self._lock.acquire(blocking=False):
            try:
                self._check_identity()
            finally:
                self._lock.release()
        reader = sqlite3.connect(self.existing_file(), uri=True, check_same_thread=False)
        try:
            reader.execute("PRAGMA busy_timeout = 5000")
            return reader.execute(sql, parameters).fetchall()
        finally:
            reader.close()

    def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._doorbell.put(None)
            self._writer.join(timeout=10)
        while self._queue:  # whatever is still queued goes in; a failure is logged
            self._commit_queued()
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._connection is not None:
            with self._lock:
                self._connection.close()
                self._connection = None
            if not self.write_errors:
                mark_clean(self.path, self._totals)


# ---------------------------------------------------------------------------------------------
# Alertmanager's silences API
# ---------------------------------------------------------------------------------------------


class AlertmanagerClient:
    """Just enough of Alertmanager's v2 API for silences, with a bounded wait on every call.

    base_url may list the members of an Alertmanager cluster, comma-separated: each call goes to
    the first that answers (they share silences by gossip), all within one timeout.
    """

    def __init__(self, base_url: str, timeout: float):
        self.base_url = base_url
        self.members = [url.strip() for url in base_url.split(",") if url.strip()]
        self.timeout = timeout
        # After a call found a member not answering, the next ones skip it for one timeout (and
        # fail at once when none is left): a dozen taps on ack links while Alertmanager is down
        # answer in one timeout, not a dozen.
        self._down: Dict[str, Tuple[float, str]] = {}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; raises PeerError with Alertmanager's own reason on refusal or silence."""
        headers = {"Accept": "application/json", "User-Agent": f"autoheal/{__version__}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        deadline = time.monotonic() + self.timeout
        failures = []
        for member in self.members:
            down = self._down.get(member)
            now = time.monotonic()
            if down is not None and now < down[0]:
                failures.append(down[1] + " (moments ago; it is asked again shortly)")
                continue
            if now >= deadline:
                failures.append(f"Alertmanager at {member} was not asked: {format_value(self.timeout)}s had passed")
                continue
            try:
                status, raw = http_request(method, member + path, payload, headers, deadline - now, limit=4 << 20)
            except OSError as exc:
                message = f"Alertmanager at {member} {describe_failure(exc, self.timeout)}"
                self._down[member] = (time.monotonic() + self.timeout, message)
                failures.append(message)
                continue
            self._down.pop(member, None)
            break
        else:
            raise PeerError("; ".join(failures))
        data = decode_answer(raw)
        if status >= 300:
            raise PeerError(f"Alertmanager refused ({status}): {answer_reason(data)}", status)
        return data

    def silences(self, alertname: str) -> List[Dict[str, Any]]:
        """The silences whose alertname matcher is alertname: Alertmanager filters them, so the
        answer stays small however many silences it holds (the caller compares every matcher)."""
        import urllib.parse

        data = self.call("GET", "/api/v2/silences?" + urllib.parse.urlencode({"filter": matcher_text(
            "alertname", alertname)}))
        if not isinstance(data, list):
            raise PeerError(f"Alertmanager answered the silence list with {type(data).__name__}, not a list")
        return data

    def alerts(self, alertname: str) -> List[Dict[str, Any]]:
        """The alerts Alertmanager holds now with that alertname (active, silenced and inhibited)."""
        import urllib.parse

        data = self.call("GET", "/api/v2/alerts?" + urllib.parse.urlencode({"filter": matcher_text(
            "alertname", alertname)}))
        if not isinstance(data, list):
            raise PeerError(f"Alertmanager answered the alert list with {type(data).__name__}, not a list")
        return data

    def get_silence(self, silence_id: str) -> Dict[str, Any]:
        import urllib.parse

        return self.call("GET", "/api/v2/silence/" + urllib.parse.quote(silence_id, safe=""))

    def post_silence(self, silence: Mapping[str, Any]) -> str:
        data = self.call("POST", "/api/v2/silences", silence)
        if not isinstance(data, dict) or not isinstance(data.get("silenceID"), str):
            raise PeerError(f"Alertmanager answered without a silenceID: {data!r}"[:300])
        return data["silenceID"]

    def expire(self, silence_id: str) -> None:
        import urllib.parse

        self.call("DELETE", "/api/v2/silence/" + urllib.parse.quote(silence_id, safe=""))


def matcher_text(name: str, value: str) -> str:
    """name="value" as Alertmanager parses a filter (pkg/labels ParseMatcher, OpenMetrics escapes)."""
    return name + '="' + value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def matchers_for(labels: Mapping[str, str]) -> List[Dict[str, Any]]:
    """Exact-match matchers for a label set, sorted by name."""
    return [{"name": name, "value": labels[name], "isRegex": False, "isEqual": True} for name in sorted(labels)]


def matcher_key(matchers: List[Mapping[str, Any]]) -> Tuple[Tuple[str, str, bool, bool], ...]:
    """A comparable form of a matcher list (Alertmanager may return them in another order)."""
    return tuple(sorted((m.get("name", ""), m.get("value", ""), bool(m.get("isRegex")), m.get("isEqual", True) is not False)
                        for m in matchers))


def parse_ack_labels(raw: Optional[str]) -> Dict[str, str]:
    """The labels query parameter: a JSON object of strings with an alertname."""
    if raw is None or raw == "":
        raise HttpError(400, "labels: missing; expected a JSON object such as {\"alertname\": \"X\"}")
    if len(raw) > 65536:
        raise HttpError(400, "labels: longer than 65536 characters")
    try:
        labels = js_tolerant_json(raw)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, f"labels: not JSON: {exc}") from None
    if not isinstance(labels, dict) or not labels:
        raise HttpError(400, "labels: expected a non-empty JSON object of label names to strings")
    if lone_surrogate_in(labels) is not None:
        raise HttpError(400, "labels: holds a lone surrogate escape (\\ud800-\\udfff without its pair): "
                             "not a Unicode string")
    for name, value in labels.items():
        if not _LABEL_NAME.match(name):
            raise HttpError(400, f"labels: {name!r} is not a valid label name")
        if not isinstance(value, str):
            raise HttpError(400, f"labels: the value of {name!r} must be a string")
    if not labels.get("alertname"):
        raise HttpError(400, "labels: must contain a non-empty alertname")
    return labels


def validate_webhook(payload: Any) -> List[Dict[str, Any]]:
    """Check that a body is an Alertmanager webhook payload; return its alerts."""
    if not isinstance(payload, dict):
        raise HttpError(400, "body must be a JSON object (an Alertmanager webhook payload)")
    if "version" in payload and payload["version"] != "4":
        raise HttpError(400, f"unsupported webhook version {payload['version']!r}; expected \"4\"")
    if "alerts" not in payload:
        raise HttpError(400, "missing field 'alerts'")
    alerts = payload["alerts"]
    if not isinstance(alerts, list):
        raise HttpError(400, "'alerts' must be a list")
    # A few alerts are looked at one by one (1.1 us for one, where the passes in C take 4.5); a
    # storm all at once, the one at fault found only when there is one.
    if len(alerts) >= 32 and _all_alerts_sound(alerts):
        return alerts
    for index, alert in enumerate(alerts):
        if not _alert_sound(alert):
            _refuse_alert(alert, f"alerts[{index}]")  # what is wrong with it, said as a 400
    return alerts


def _alert_sound(alert: Any) -> bool:
    """Whether an alert is an object with a status of "firing" or "resolved", labels (an object of
    strings, alertname not empty), annotations if any (an object of strings), and fingerprint,
    startsAt, endsAt and generatorURL strings if there (str.join refuses anything but strings)."""
    if type(alert) is dict and alert.get("status") in ("firing", "resolved"):
        labels, annotations = alert.get("labels"), alert.get("annotations", _NO_ANNOTATIONS)
        if type(labels) is dict and type(annotations) is dict and labels.get("alertname"):
            try:
                "".join(labels.values())
                "".join(annotations.values())
                "".join([alert.get("fingerprint", ""), alert.get("startsAt", ""), alert.get("endsAt", ""),
                         alert.get("generatorURL", "")])
                return True
            except TypeError:
                pass
    return False


def _all_alerts_sound(alerts: List[Any]) -> bool:
    """Whether every alert is sound (_alert_sound), each check one pass in C through all of them
    (map, set, all, str.join): 12 instead of 70 million instructions a storm of 5,000, where a
    loop made a list of each alert's values to join them."""
    join, field = "".join, itertools.repeat
    try:
        if set(map(type, alerts)) - {dict}:
            return False
        if set(map(dict.get, alerts, field("status"))) - {"firing", "resolved"}:
            return False
        labels = list(map(dict.get, alerts, field("labels")))
        annotations = list(map(dict.get, alerts, field("annotations"), field(_NO_ANNOTATIONS)))
        if set(map(type, labels)) - {dict} or set(map(type, annotations)) - {dict}:
            return False
        if not all(map(dict.get, labels, field("alertname"))):
            return False
        join(itertools.chain.from_iterable(map(dict.values, labels)))
        join(itertools.chain.from_iterable(map(dict.values, annotations)))
        for name in ("fingerprint", "startsAt", "endsAt", "generatorURL"):
            join(map(dict.get, alerts, field(name), field("")))
    except TypeError:  # a value that is not a string, or a status that cannot be hashed
        return False
    return True


_NO_ANNOTATIONS: Dict[str, str] = {}


def _refuse_alert(alert: Any, where: str) -> None:
    """The 400 for an alert that validate_webhook's quick look found wrong, naming the first fault."""
    if not isinstance(alert, dict):
        raise HttpError(400, f"{where} must be an object")
    if alert.get("status") not in ("firing", "resolved"):
        raise HttpError(400, f"{where}.status must be \"firing\" or \"resolved\"")
    for key, required in (("labels", True), ("annotations", False)):
        if key not in alert and not required:
            continue
        mapping = alert.get(key)
        if not isinstance(mapping, dict):
            raise HttpError(400, f"{where}.{key} must be an object of strings")
        for name, value in mapping.items():
            if not isinstance(value, str):
                raise HttpError(400, f"{where}.{key}.{name} must be a string")
    if not alert["labels"].get("alertname"):
        raise HttpError(400, f"{where}.labels.alertname is missing or empty")
    for key in ("fingerprint", "startsAt", "endsAt", "generatorURL"):
        if key in alert and not isinstance(alert[key], str):
            raise HttpError(400, f"{where}.{key} must be a string")
    raise HttpError(400, f"{where} is not an Alertmanager alert")  # not reached: the quick look and this agree


# ---------------------------------------------------------------------------------------------
# The command language: one for POST /control, --control and the Slack slash command
# ---------------------------------------------------------------------------------------------

CONTROL_USAGE = (
    "status | help | enable | disable [DURATION] (or pause [DURATION]) | dry-run on|off | cooldown NAME DURATION | "
    "cooldown NAME default | rearm NAME [LABELS] | disable NAME [DURATION] | enable NAME | undo [ID] | reset | "
    "approve ID | deny ID"
)
CONTROL_HELP = (
    "status (or nothing): what is in force and who set it\n"
    "help: this text\n"
    "enable / disable [DURATION]: the master switch on / off (off for DURATION, then back by itself); "
    "pause [DURATION] is disable [DURATION]\n"
    "dry-run on / dry-run off: only log and count, or run for real\n"
    "cooldown NAME DURATION / cooldown NAME default: the cooldown of one alertname\n"
    "rearm NAME: end NAME's running cooldown now (every target's, for a cooldown_by action)\n"
    "rearm NAME label=\"value\",...: end the running cooldown of NAME's targets that match\n"
    "disable NAME [DURATION] / enable NAME: one action off / on\n"
    "undo [ID]: revert the latest change still in force, or the change with that history id\n"
    "reset: drop every override, back to the environment (final: nothing before it can be undone)\n"
    "approve ID / deny ID: answer an open approval (an action with approve: true waits for one)\n"
    "DURATION: 90s, 30m, 2h, 1d, 1h30m"
)
MAX_COMMAND_CHARS = 500
REARM_UNDO_MAX = 100  # a rearm of many targets: the undo gives back the cooldowns of the first 100
TARGETS_SHOWN = 100  # GET /: the targets in cooldown listed per action (targets_total counts them all)
SLACK_MAX_SKEW_SEC = 300  # Slack's own rule: a request more than five minutes old is a replay
SLACK_ANSWER_SEC = 2.5  # within Slack's 3 seconds; later answers go to the request's response_url


class CommandError(Exception):
    """A control command that does not parse, or names what does not exist: the message says why."""


@record_type
class Command:
    """A parsed control command."""

    verb: str  # status help enable disable dry-run cooldown rearm undo reset
    alertname: Optional[str] = None
    value: Any = None  # dry-run: bool; cooldown: seconds or None (default); undo: an id or None
    seconds: Optional[float] = None  # how long a disable lasts

    @property
    def changes(self) -> bool:
        return self.verb not in ("status", "help")


@record_type
class Override:
    """One runtime override in force: its history id, what it sets, to what, until when, who."""

    id: int
    setting: str  # enabled, dry_run, cooldown, action_enabled
    alertname: Optional[str]
    value: Any
    until: Optional[float]
    by: str
    ts: float

    def public(self) -> Dict[str, Any]:
        """As GET / lists it."""
        return {"id": self.id, "setting": self.setting, "alertname": self.alertname, "value": self.value,
                "until": format_rfc3339(self.until) if self.until is not None else None, "by": self.by,
                "ts": format_rfc3339(self.ts)}


class _Words:
    """The words of one command after its verb, and the checks its verb's parser makes of them."""

    def __init__(self, verb: str, rest: List[str], actions: Mapping[str, Action], text: str = ""):
        self.verb = verb
        self.rest = rest
        self.actions = actions
        self.text = text  # the whole command, for a verb that reads more than words (rearm's label set)

    def not_an_action(self, word: str) -> CommandError:
        actions = self.actions
        return CommandError(f"{word[:80]!r} is not an alertname of the action map "
                            f"({', '.join(sorted(actions)[:10])}{', ...' if len(actions) > 10 else ''})")

    def name(self, word: str) -> str:
        if word not in self.actions:
            raise self.not_an_action(word)
        return word

    @staticmethod
    def duration(word: str) -> float:
        try:
            return parse_duration(word)
        except ValueError as exc:
            raise CommandError(f"{word[:40]!r}: {exc}") from None

    def arity(self, low: int, high: int) -> List[str]:
        """The words after the verb, when there are low to high of them."""
        if not low <= len(self.rest) <= high:
            raise CommandError(f"{self.verb} takes {low if low == high else f'{low} to {high}'} word(s) after it, "
                               f"got {len(self.rest)}; usage: {CONTROL_USAGE}")
        return self.rest


def _parse_alone(words: _Words) -> Command:
    words.arity(0, 0)
    return Command(words.verb)


def _parse_enable(words: _Words) -> Command:
    rest = words.arity(0, 1)
    return Command("enable", words.name(rest[0]) if rest else None)


def _parse_disable(words: _Words) -> Command:
    rest = words.arity(0, 2)
    if not rest:
        return Command("disable")
    if rest[0] in words.actions:
        return Command("disable", rest[0], seconds=words.duration(rest[1]) if len(rest) > 1 else None)
    if len(rest) == 1 and _DURATION.match(rest[0].lower()):
        return Command("disable", seconds=words.duration(rest[0].lower()))
    raise words.not_an_action(rest[0])  # neither an alertname nor a duration: say so


def _parse_dry_run(words: _Words) -> Command:
    rest = words.arity(1, 1)
    if rest[0].lower() not in ("on", "off"):
        raise CommandError(f"dry-run takes on or off, got {rest[0][:40]!r}")
    return Command("dry-run", value=rest[0].lower() == "on")


def _parse_cooldown(words: _Words) -> Command:
    rest = words.arity(2, 2)
    alertname = words.name(rest[0])
    if rest[1].lower() == "default":
        return Command("cooldown", alertname, None)
    seconds = words.duration(rest[1].lower())
    if seconds > MAX_COOLDOWN_SEC:
        raise CommandError(f"a cooldown of at most {format_duration(MAX_COOLDOWN_SEC)}")
    return Command("cooldown", alertname, seconds)


def _parse_rearm(words: _Words) -> Command:
    """rearm NAME, or rearm NAME label="value",... (one target's cooldown: a Prometheus label set)."""
    if len(words.rest) < 2:
        rest = words.arity(1, 1)
        return Command("rearm", words.name(rest[0]))
    name = words.name(words.rest[0])
    try:
        matchers = parse_matchers(words.text.strip().split(None, 2)[2])
    except ValueError as exc:
        raise CommandError(f"rearm {name}: {exc}") from None
    return Command("rearm", name, value=matchers)


_MATCHER_NAME = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*")
_MATCHER_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "`": "`"}


def parse_matchers(text: str) -> Tuple[Tuple[str, str, str], ...]:
    """A label set as Prometheus writes matchers: name="value" (=, !=, =~, !~), comma-separated,
    braces optional, values in double, single or back quotes (Go's escapes in the first two);
    ValueError saying at which character it goes wrong."""
    body = text.strip()
    offset = len(text) - len(text.lstrip())
    if body.startswith("{"):
        if not body.endswith("}"):
            raise ValueError(f"the label set opens with '{{' but does not end with '}}' (at character {offset + 1})")
        body, offset = body[1:-1], offset + 1
    matchers: List[Tuple[str, str, str]] = []
    at = 0
    while at < len(body) and body[at:].strip():
        match = _MATCHER_NAME.match(body, at)
        if not match:
            raise ValueError(f"expected a label name and =, !=, =~ or !~ at character {offset + at + 1} of "
                             f"{text.strip()[:80]!r}")
        at = match.end()
        value, at = _matcher_value(body, at, offset, text)
        if match.group(2) in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"the regular expression of {match.group(1)} does not compile: {exc}") from None
        matchers.append((match.group(1), match.group(2), value))
        rest = body[at:].lstrip()
        at = len(body) - len(rest)
        if rest.startswith(","):
            at += 1
        elif rest:
            raise ValueError(f"expected ',' or the end at character {offset + at + 1} of {text.strip()[:80]!r}")
    if not matchers:
        raise ValueError("the label set is empty: give label=\"value\" pairs, or no label set at all")
    return tuple(matchers)


def _matcher_value(body: str, at: int, offset: int, text: str) -> Tuple[str, int]:
    """A quoted value starting at body[at]: (the value, where it ends)."""
    quote = body[at:at + 1]
    if quote not in ('"', "'", "`"):
        raise ValueError(f"expected a quoted value at character {offset + at + 1} of {text.strip()[:80]!r}")
    out: List[str] = []
    index = at + 1
    while index < len(body):
        char = body[index]
        if char == quote:
            return "".join(out), index + 1
        if char == "\\" and quote != "`":
            escaped = body[index + 1:index + 2]
            if escaped not in _MATCHER_ESCAPES:
                raise ValueError(f"unknown escape '\\{escaped}' at character {offset + index + 1}")
            out.append(_MATCHER_ESCAPES[escaped])
            index += 2
            continue
        out.append(char)
        index += 1
    raise ValueError(f"the value opened at character {offset + at + 1} is never closed")


def format_matchers(matchers: Tuple[Tuple[str, str, str], ...]) -> str:
    """A label set as Prometheus writes it: name="value", ..."""
    return ", ".join(f"{name}{op}{json.dumps(value)}" for name, op, value in matchers)


def matches(matchers: Tuple[Tuple[str, str, str], ...], labels: Mapping[str, str]) -> bool:
    """Whether a label set matches every matcher (an absent label is the empty string, regular
    expressions are anchored at both ends: Prometheus's rules)."""
    for name, op, value in matchers:
        have = labels.get(name, "")
        if op == "=":
            ok = have == value
        elif op == "!=":
            ok = have != value
        else:
            ok = re.fullmatch(value, have) is not None
            ok = ok if op == "=~" else not ok
        if not ok:
            return False
    return True


def _parse_approval(words: _Words) -> Command:
    """approve ID / deny ID: the answer to an open approval (its history id)."""
    rest = words.arity(1, 1)
    if not re.fullmatch(r"[0-9]{1,18}", rest[0]):
        raise CommandError(f"{words.verb} takes the id of an open approval (GET / lists them), got {rest[0][:40]!r}")
    return Command(words.verb, value=int(rest[0]))


def _parse_undo(words: _Words) -> Command:
    rest = words.arity(0, 1)
    if rest and not re.fullmatch(r"[0-9]{1,18}", rest[0]):
        raise CommandError(f"undo takes the history id of a change, got {rest[0][:40]!r}")
    return Command("undo", value=int(rest[0]) if rest else None)


# Each verb of the command language, and what parses the words after it.
COMMAND_PARSERS: Dict[str, Callable[[_Words], Command]] = {
    "status": _parse_alone, "help": _parse_alone, "reset": _parse_alone, "enable": _parse_enable,
    "disable": _parse_disable, "pause": _parse_disable, "dry-run": _parse_dry_run, "cooldown": _parse_cooldown,
    "rearm": _parse_rearm, "undo": _parse_undo, "approve": _parse_approval, "deny": _parse_approval,
}


def parse_command(text: str, actions: Mapping[str, Action]) -> Command:
    """One control command; CommandError saying why (and showing the usage) when it does not parse."""
    if len(text) > MAX_COMMAND_CHARS:
        raise CommandError(f"the command is longer than {MAX_COMMAND_CHARS} characters; usage: {CONTROL_USAGE}")
    words = text.split()
    if not words:
        return Command("status")
    verb = words[0].lower()
    parser = COMMAND_PARSERS.get(verb)
    if parser is None:
        raise CommandError(f"unknown command {verb[:40]!r}; usage: {CONTROL_USAGE}")
    return parser(_Words(verb, words[1:], actions, text))


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Slack's request signature: v0= and the hex HMAC-SHA256 of v0:<timestamp>:<raw body>."""
    import hashlib
    import hmac

    return "v0=" + hmac.new(secret.encode("utf-8"), b"v0:" + timestamp.encode("ascii") + b":" + body,
                            hashlib.sha256).hexdigest()


def describe_settings(status: Mapping[str, Any]) -> str:
    """The effective state, for people (the --control command line, Slack): a few lines."""
    lines = [f"autoheal is {mode_text(status)} (enabled={str(status['enabled']).lower()}, "
             f"dry_run={str(status['dry_run']).lower()})"]
    for name, cooldown in sorted((status.get("cooldowns") or {}).items()):
        flag = " DISABLED" if name in (status.get("disabled_actions") or []) else ""
        lines.append(f"  {name}: cooldown {format_duration(cooldown['cooldown_seconds'])}, "
                     f"{format_duration(cooldown['remaining_seconds'])} left{flag}")
    overrides = status.get("overrides") or []
    if overrides:
        lines.append("overrides:")
        for o in overrides:
            target = f" {o['alertname']}" if o["alertname"] else ""
            until = f" until {o['until']}" if o["until"] else ""
            lines.append(f"  #{o['id']} {o['setting']}{target} = {json.dumps(o['value'])}{until} (by {o['by']} at {o['ts']})")
    else:
        lines.append("no overrides: the environment is in force")
    if not status.get("overrides_persistent", True):
        lines.append("state is in memory only: overrides will not survive a restart")
    return "\n".join(lines)


def describe_change(event: Mapping[str, Any]) -> str:
    """One recorded change, for people: who set what from what to what, until when."""
    target = f" {event['alertname']}" if event.get("alertname") else ""
    text = f"{event.get('by')} ran `{event.get('command')}`: {event.get('setting')}{target}"
    if "old" in event or "new" in event:
        text += f" {json.dumps(event.get('old'))} -> {json.dumps(event.get('new'))}"
    if event.get("until"):
        text += f" until {event['until']}"
    if event.get("undoes"):
        text += f" (undoes #{event['undoes']})"
    return text + f" [#{event.get('change_id') or event['id']}]"


# ---------------------------------------------------------------------------------------------
# Claims: cooldowns and the hourly budget
# ---------------------------------------------------------------------------------------------

CREATED_BY = "autoheal"


def cooldown_remaining(started: Optional[float], cooldown: float, now: float) -> float:
    """Seconds left of a cooldown that started at started (None: never); never more than cooldown,
    so a clock set back cannot stretch it."""
    if started is None:
        return 0.0
    return max(0.0, min(cooldown, started + cooldown - now))


@record_type
class Settings:
    """What is in force now (Control.effective): the configuration today; with runtime control,
    the configuration and its overrides.  Read once per request, so one request sees one truth."""

    enabled: bool
    dry_run: bool
    cooldowns: Mapping[str, float]  # by alertname
    max_actions_per_hour: int
    disabled: FrozenSet[str] = frozenset()  # actions switched off at runtime
    overrides: Tuple[Any, ...] = ()  # the runtime overrides in force (Override)
    revision: Optional[int] = None  # replicas: the shared control state's revision they were read at (a fence)

    @property
    def executes(self) -> bool:
        """Real actions run only when enabled and not in dry-run."""
        return self.enabled and not self.dry_run

    def mode(self, halted: bool = False) -> Tuple[str, Optional[str]]:
        """The one mode everything shows (GET / "mode", the page's badge, the status command):
        halted (replicas without etcd: nothing can run), off, paused (off until a time: the newest
        "enabled" override has a duration), dry_run or live; and when a pause ends (RFC 3339)."""
        if halted:
            return "halted", None
        if not self.enabled:
            pause = next((o for o in self.overrides if o.setting == "enabled" and o.until is not None), None)
            return ("paused", format_rfc3339(pause.until)) if pause is not None else ("off", None)
        return ("dry_run" if self.dry_run else "live"), None


# The words people read for each mode (the page's badge, the status command).
MODE_WORDS = {"off": "OFF", "dry_run": "DRY-RUN", "live": "LIVE", "paused": "PAUSED", "halted": "HALTED"}


@record_type
class Claim:
    """The answer of a claims object: won (the action may go ahead, its cooldown has started), or
    lost because of the cooldown (remaining seconds) or the hourly budget."""

    won: bool
    remaining: float
    reason: Optional[str] = None  # one of CLAIM_REASONS when lost


CLAIM_REASONS = ("cooldown", "budget")
# Why an alert fails closed: nothing of it ran, and its webhook is answered 503 (delivered again).
FAIL_CLOSED_REASONS = ("coordination_unavailable", "state_unavailable")
_WON: Dict[float, Claim] = {}  # a claim won, by its cooldown: one each (a storm's 5,000 win a few)


def _won(cooldown: float) -> Claim:
    """The won claim of that cooldown, kept for the next (at most 1,024 lengths kept)."""
    if len(_WON) >= 1024:
        _WON.clear()
    claim = _WON[cooldown] = Claim(True, cooldown)
    return claim


class Claims:
    """What every claims object keeps for readers: when each alertname's cooldown started."""

    def __init__(self, started: Mapping[str, float]):
        self._lock = threading.Lock()
        self._started: Dict[str, float] = dict(started)
        # Per-target actions: the keys of each one's targets in cooldown, oldest start first, so that
        # counting them and showing the newest costs the same with 10 targets as with 100,000.
        self._targets: Dict[str, "collections.OrderedDict[str, float]"] = {}
        self._last_target: Dict[str, float] = {}  # per per-target action: its newest target's start
        for key, moment in sorted(((key, moment) for key, moment in self._started.items() if "/" in key),
                                  key=lambda item: item[1]):
            self._put_target(key, moment)

    def started_of(self, names: List[str]) -> List[Optional[float]]:
        """When each name's last cooldown started (None: never), at once (status and /metrics):
        only these names are read, however many targets' cooldowns are kept beside them."""
        with self._lock:
            started = self._started
            return [started.get(name) for name in names]

    def started(self, alertname: str) -> Optional[float]:
        """When alertname's last cooldown started (None: never)."""
        with self._lock:
            return self._started.get(alertname)

    def release(self, alertname: str, claim: Claim, now: float) -> None:
        """Give back a claim whose action will not run after all; replicas keep it (fail closed:
        the shared cooldown stands)."""

    def remaining(self, alertname: str, cooldown: float, now: float) -> float:
        """Seconds left of alertname's cooldown, as the claims see it."""
        return cooldown_remaining(self.started(alertname), cooldown, now)

    def remaining_all(self, names: List[str], cooldowns: Mapping[str, float], now: float) -> List[float]:
        """Seconds left of each name's cooldown, at once (GET /, /metrics)."""
        return [cooldown_remaining(started or None, cooldowns[name], now)
                for name, started in zip(names, self.started_of(names))]

    def claim_all(self, wanted: List[Tuple[str, float]], budget: int, now: float,
                  deadline: Optional[float] = None, fence: Optional[int] = None) -> List[Claim]:
        """The claims of one webhook, in order: (alertname, cooldown) each."""
        return [self.claim(name, cooldown, budget, now, deadline) for name, cooldown in wanted]

    def begin(self, alertname: str, deadline: Optional[float] = None) -> None:
        """The action of a claimed cooldown starts now (replicas: its cooldown counts from here)."""

    # -- targets: per-target cooldowns, keyed NAME/{labels} (cooldown_key) ------------------------

    def _left_locked(self, key: str, cooldown: float, now: float) -> float:
        """Seconds left of one key's cooldown (under the lock)."""
        return cooldown_remaining(self._started.get(key) or None, cooldown, now)

    def _keys_locked(self) -> Any:
        """Every key a cooldown may be running under (under the lock)."""
        return self._started

    def _put_target(self, key: str, started: float) -> None:
        """A target's cooldown started (under the lock): its key goes to the end of its action's."""
        keys = self._targets.get(key.partition("/")[0])
        if keys is None:
            keys = self._targets[key.partition("/")[0]] = collections.OrderedDict()
        keys[key] = started
        keys.move_to_end(key)
        name = key.partition("/")[0]
        if started > self._last_target.get(name, 0.0):
            self._last_target[name] = started

    def last_target_starts(self) -> Dict[str, float]:
        """When each per-target action's newest target started (its last action)."""
        with self._lock:
            return dict(self._last_target)

    def _drop_target(self, key: str) -> None:
        """A target's cooldown ended before its time (under the lock)."""
        keys = self._targets.get(key.partition("/")[0])
        if keys is not None:
            keys.pop(key, None)

    def _trim_locked(self, name: str, cooldown: float, now: float) -> "collections.OrderedDict[str, float]":
        """name's targets still in cooldown: those that ended are dropped from the front (the
        oldest first), each once, and forgotten."""
        keys = self._targets.get(name) or collections.OrderedDict()
        while keys:
            key = next(iter(keys))
            if self._left_locked(key, cooldown, now) > 0:
                break
            keys.popitem(last=False)
            self._forget_locked(key)
        return keys

    def _forget_locked(self, key: str) -> None:
        """A target whose cooldown ended: nothing of it is kept."""
        self._started.pop(key, None)

    def cooling(self, cooldowns: Mapping[str, float], now: float,
                limit: int = 100) -> Dict[str, Tuple[int, List[Tuple[float, float, str]], float]]:
        """Per per-target action: how many targets are in cooldown, the newest limit of them
        ((seconds left, started, key), newest first) and the seconds left of the oldest."""
        found: Dict[str, Tuple[int, List[Tuple[float, float, str]], float]] = {}
        with self._lock:
            for name in list(self._targets):
                cooldown = cooldowns.get(name)
                if cooldown is None:
                    continue
                keys = self._trim_locked(name, cooldown, now)
                if not keys:
                    continue
                newest = [(self._left_locked(key, cooldown, now), moment, key)
                          for key, moment in itertools.islice(reversed(keys.items()), limit)]
                found[name] = (len(keys), newest, self._left_locked(next(iter(keys)), cooldown, now))
        return found

    def target_keys(self, name: str, cooldown: float, now: float) -> List[Tuple[float, float, str]]:
        """Every target of name in cooldown: (seconds left, started, key), newest first."""
        with self._lock:
            keys = self._trim_locked(name, cooldown, now)
            return [(self._left_locked(key, cooldown, now), moment, key) for key, moment in reversed(keys.items())]

    def rearm_targets(self, alertname: str, keys: List[str], everything: bool) -> None:
        """End the running cooldowns of these keys of alertname (everything: all of its targets)."""
        for key in keys:
            self.rearm(key)

    def commit_done(self, keys: List[str]) -> None:
        """The cooldown starts of these keys are committed (LocalClaims forgets what they replaced)."""

    def settled(self, key: str) -> None:
        """A claim won for an action that does not start now (dry-run, awaiting approval): its
        cooldown counts from the claim (EtcdClaims forgets the lease begin would keep alive)."""


class LocalClaims(Claims):
    """Cooldowns and the hourly budget of one process, each claim one atomic step under one lock.

    claim() is the whole interface that matters: the distributed one (EtcdClaims) answers the
    same way.  Nothing else is ever done under its lock.
    """

    def __init__(self, started: Mapping[str, float], budget_times: List[float]):
        super().__init__(started)
        self._budget: collections.deque = collections.deque(sorted(budget_times))
        self._replaced: Dict[str, Optional[float]] = {}  # the cooldown start each last won claim replaced

    def claim(self, alertname: str, cooldown: float, budget: int, now: float,
              deadline: Optional[float] = None) -> Claim:
        """Start alertname's cooldown (and take a budget slot) unless either forbids it (deadline:
        for claims that wait on a peer; this one never waits)."""
        with self._lock:
            return self._claim_locked(alertname, cooldown, budget, now)

    def claim_all(self, wanted: List[Tuple[str, float]], budget: int, now: float,
                  deadline: Optional[float] = None, fence: Optional[int] = None) -> List[Claim]:
        """The claims of one webhook, in order, in one hold of the lock (a storm's 5,000 too)."""
        with self._lock:
            return [self._claim_locked(name, cooldown, budget, now) for name, cooldown in wanted]

    def _claim_locked(self, alertname: str, cooldown: float, budget: int, now: float) -> Claim:
        started = self._started.get(alertname)
        remaining = cooldown_remaining(started, cooldown, now) if started and cooldown > 0 else 0.0
        if remaining > 0:
            return Claim(False, remaining, "cooldown")
        if budget:
            while self._budget and self._budget[0] <= now - BUDGET_WINDOW_SEC:
                self._budget.popleft()
            if len(self._budget) >= budget:
                return Claim(False, 0.0, "budget")
            self._budget.append(now)
        won = _WON.get(cooldown) or _won(cooldown)
        if cooldown <= 0 and "#" in alertname:  # a budget slot of a step or an approval: nothing to keep
            return won
        self._replaced[alertname] = started
        self._started[alertname] = now
        if "/" in alertname:
            self._put_target(alertname, now)
        return won

    def release(self, alertname: str, claim: Claim, now: float) -> None:
        """Give back a claim won at now whose action will not run after all (its cooldown start
        could not be committed): the cooldown before it, and its budget slot."""
        with self._lock:
            if self._started.get(alertname) == now:
                previous = self._replaced.pop(alertname, None)
                if previous is None:
                    self._started.pop(alertname, None)
                    self._drop_target(alertname)
                else:
                    self._started[alertname] = previous
                    if "/" in alertname:
                        self._put_target(alertname, previous)
            with contextlib.suppress(ValueError):
                self._budget.remove(now)

    def rearm(self, alertname: str) -> None:
        """End alertname's running cooldown now (rearm NAME), or one target's (its key)."""
        with self._lock:
            if "/" in alertname:  # a target: forgotten
                self._drop_target(alertname)
                self._forget_locked(alertname)
            else:
                self._started[alertname] = 0.0

    def _forget_locked(self, key: str) -> None:
        self._started.pop(key, None)
        self._replaced.pop(key, None)

    def commit_done(self, keys: List[str]) -> None:
        """The cooldown starts of these keys are committed: what they replaced is no longer needed
        (release gives back only a claim whose start could not be committed)."""
        with self._lock:
            for key in keys:
                self._replaced.pop(key, None)

    def restore(self, alertname: str, started: Optional[float], left: Optional[float] = None) -> None:
        """Put back a cooldown that rearm ended (its undo), unless the alertname acted since."""
        with self._lock:
            if self._started.get(alertname) in (None, 0.0) and started:
                self._started[alertname] = started
                if "/" in alertname:
                    self._put_target(alertname, started)

    def budget_used(self, now: float) -> int:
        """Runs (real or dry) within the rolling hour of the global budget."""
        with self._lock:
            return sum(1 for moment in self._budget if moment > now - BUDGET_WINDOW_SEC)


# ---------------------------------------------------------------------------------------------
# Coordination in etcd: replicas share cooldowns, the budget and runtime control
# ---------------------------------------------------------------------------------------------

class StateUnavailable(Exception):
    """The state file could not commit a cooldown's start: the action does not run (fail closed),
    since a restart would not know that it ran."""


class CoordinationUnavailable(Exception):
    """etcd gave no answer in time (no member answered, or the cluster has no quorum): autoheal
    fails closed, and the message says why."""


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unb64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode("utf-8")


def _prefix_end(prefix: str) -> str:
    """The range_end that covers every key starting with prefix (its last byte plus one)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _prefix_range(prefix: str, **options: Any) -> Dict[str, Any]:
    """A range request's body for every key starting with prefix (options: count_only, ...)."""
    return {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), **options}


class EtcdClient:
    """etcd's v3 JSON gateway over urllib's http.client: each call goes to the member that last
    answered, then to the others, all within one deadline (AUTOHEAL_ETCD_TIMEOUT_SEC), however
    many members are down.  A member that does not answer goes to the back of the line.

    With a user, etcd's authentication token (/v3/auth/authenticate) is sent with each call and
    taken anew when etcd says it expired.  The password never leaves this object.
    """

    def __init__(self, endpoints: Tuple[str, ...], timeout: float, context: Any = None,
                 user: Optional[str] = None, password: Optional[str] = None):
        self.timeout = timeout
        self._order = list(endpoints)
        self._context = context
        self._user = user
        self._password = password
        self._tokens: Dict[str, str] = {}  # by member: a simple token is known to the member that gave it
        self._lock = threading.Lock()

    def call(self, path: str, body: Mapping[str, Any], deadline: Optional[float] = None) -> Dict[str, Any]:
        """POST body to /v3/<path>; the answer, or CoordinationUnavailable by the deadline."""
        end = time.monotonic() + self.timeout
        if deadline is not None:
            end = min(end, deadline)
        with self._lock:
            order = list(self._order)
        failures = []
        for index, endpoint in enumerate(order):
            left = end - time.monotonic()
            if left <= 0.01:
                break
            try:
                answer = self._exchange(endpoint, path, body, left / (len(order) - index))
            except OSError as exc:
                failures.append(f"{endpoint} {describe_failure(exc, left / (len(order) - index))}")
                continue
            except _EtcdRefused as exc:  # an answer, and a final one: no other member would say otherwise
                raise CoordinationUnavailable(f"{endpoint}: {exc}") from None
            with self._lock:
                if self._order[0] != endpoint:
                    self._order.remove(endpoint)
                    self._order.insert(0, endpoint)
            return answer
        raise CoordinationUnavailable("; ".join(failures)
                                      or f"no etcd member answered within {format_value(self.timeout)}s")

    def _exchange(self, endpoint: str, path: str, body: Mapping[str, Any], timeout: float,
                  retried: bool = False) -> Dict[str, Any]:
        token = (self._tokens.get(endpoint) or self._authenticate(endpoint, timeout)) if self._user else None
        status, answer, message = self._post(endpoint, path, body, timeout, token)
        if status == 200 and isinstance(answer, dict):
            return answer
        if self._user and not retried and (status == 401 or "auth store is old" in message):
            # The token expired, or the member forgot it, or users changed since: a new one, once.
            self._tokens.pop(endpoint, None)
            return self._exchange(endpoint, path, body, timeout, retried=True)
        raise _EtcdRefused(f"HTTP {status}: {message}")

    def _authenticate(self, endpoint: str, timeout: float) -> str:
        status, answer, message = self._post(endpoint, "auth/authenticate",
                                             {"name": self._user, "password": self._password}, timeout)
        if status != 200 or not isinstance(answer, dict) or not answer.get("token"):
            raise _EtcdRefused(f"authentication as {self._user!r} refused: {message}")
        self._tokens[endpoint] = answer["token"]
        return answer["token"]

    def _post(self, endpoint: str, path: str, body: Mapping[str, Any], timeout: float,
              token: Optional[str] = None) -> Tuple[int, Any, str]:
        """One POST to a member: (status, the decoded answer, its message in words).  OSError when
        the member does not answer, or answers that it cannot now (5xx: no leader, no quorum,
        shutting down; a 200 that is not JSON): the caller tries the next."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        status, raw = http_request("POST", f"{endpoint}/v3/{path}", json.dumps(body).encode("utf-8"), headers,
                                   timeout=timeout, context=self._context, whole=True)
        answer = decode_answer(raw)
        message = str(answer_reason(answer) if answer else f"HTTP {status}")[:200]
        if status >= 500 or (status == 200 and not isinstance(answer, dict)):
            raise OSError(f"answered HTTP {status}: {message}")
        return status, answer, message


class _EtcdRefused(Exception):
    """etcd answered, and refused (permission, authentication, a malformed request)."""


def etcd_ssl_context(config: Config) -> Any:
    """The TLS context for https:// members: AUTOHEAL_ETCD_CA_FILE (else the system's CAs), and
    the client certificate etcd's --client-cert-auth asks for.  None for plain http."""
    if not any(url.startswith("https://") for url in config.etcd_endpoints):
        return None
    import ssl

    try:
        context = ssl.create_default_context(cafile=config.etcd_ca_file)
        if config.etcd_cert_file:
            context.load_cert_chain(config.etcd_cert_file, config.etcd_key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"AUTOHEAL_ETCD_CA_FILE/CERT_FILE/KEY_FILE: cannot be used for TLS: {exc}") from None
    return context


class OutcomeUnknown(CoordinationUnavailable):
    """A change was written, and etcd never said whether it landed (every answer lost or late)."""


class StaleSettings(Exception):
    """A claim's fence failed: the shared control state changed since the settings it was judged
    with were read.  The webhook is judged again on the new ones."""


class RunRecords:
    """The latest run of each action as replicas share it in etcd (<prefix>run/<alertname>): what
    the last poll read, and this replica's runs, written with the next poll (share), the runs of
    many webhooks in one transaction: a webhook waits for none of them."""

    def __init__(self, prefix: str, call: Callable[[str, Mapping[str, Any], Optional[float]], Dict[str, Any]]):
        self._prefix = prefix
        self._call = call  # to etcd (EtcdClaims._call: it notes whether etcd answers)
        self._lock = threading.Lock()
        self._read: Dict[str, Dict[str, Any]] = {}  # as the last poll read them
        self._revisions: Dict[str, str] = {}  # the revision of the record this replica wrote last, each
        self._unshared: Dict[str, Tuple[Dict[str, Any], bool]] = {}  # put since, for the next poll

    def latest(self) -> Dict[str, Dict[str, Any]]:
        """The latest run of each action, as the last poll saw it, and this replica's not yet shared."""
        with self._lock:
            return {**self._read, **{name: dict(record) for name, (record, _new) in self._unshared.items()}}

    def seen(self, read: Dict[str, Dict[str, Any]]) -> None:
        """What a poll read (written after what this replica put: share comes first)."""
        with self._lock:
            self._read = read

    def put(self, alertname: str, record: Mapping[str, Any], new: bool) -> None:
        """A run to share (new), or its verdict: a new run replaces whatever was there; its
        verdict only the record this replica wrote (a newer run's is never overwritten)."""
        with self._lock:
            waiting = self._unshared.get(alertname)
            self._unshared[alertname] = (dict(record), new or (waiting is not None and waiting[1]))

    def share(self, deadline: Optional[float] = None) -> None:
        """Write the runs put since the last poll, RUNS_PER_TXN to a transaction (etcd takes 128
        operations at most).  A verdict overtaken by a newer run elsewhere fails its
        transaction's compare: that one is sent again without its verdicts.  What etcd did not
        take waits for the next poll (CoordinationUnavailable), a newer record of the same
        action replacing it."""
        with self._lock:
            waiting, self._unshared = self._unshared, {}
            revisions = dict(self._revisions)
        names = list(waiting)
        try:
            while names:
                batch, names = names[:RUNS_PER_TXN], names[RUNS_PER_TXN:]
                for attempt in range(2):
                    compare, writes, written = [], [], []
                    for name in batch:
                        record, new = waiting[name]
                        key = _b64(f"{self._prefix}run/{name}")
                        if not new:
                            if revisions.get(name) is None or attempt:
                                continue  # not this replica's record to update (any more)
                            compare.append({"key": key, "target": "MOD", "mod_revision": revisions[name]})
                        writes.append({"request_put": {"key": key, "value": _b64(json.dumps(record))}})
                        written.append(name)
                    if not writes:
                        break
                    answer = self._call("kv/txn", {"compare": compare, "success": writes}, deadline)
                    if answer.get("succeeded"):  # etcd leaves it out when false
                        with self._lock:
                            for name in written:
                                self._revisions[name] = str(answer["header"]["revision"])
                                self._read[name] = dict(waiting[name][0])
                        break
                for name in batch:
                    del waiting[name]
        except CoordinationUnavailable:
            with self._lock:  # again with the next poll, unless a newer record of the same came meanwhile
                for name, (record, new) in waiting.items():
                    later = self._unshared.get(name)
                    self._unshared[name] = (later[0], later[1] or new) if later else (record, new)
            raise


class LeaseCache:
    """The leases of cooldowns, one of each length asked for within LEASE_REUSE_SEC serving
    again, so that webhooks a millisecond apart cost no grant each: their keys end at most that
    much earlier than their own lease would have them end, as with a slow claim (the spare and
    EtcdClaims.begin's keepalive see to it)."""

    def __init__(self, call: Callable[[str, Mapping[str, Any], Optional[float]], Dict[str, Any]]):
        self._call = call
        self._lock = threading.Lock()
        self._leases: Dict[int, Tuple[str, float]] = {}  # seconds: (lease, when it was asked for)

    def __call__(self, seconds: int, deadline: Optional[float]) -> Tuple[str, float]:
        """A lease of seconds, and when it was asked for (monotonic)."""
        with self._lock:
            cached = self._leases.get(seconds)
            if cached is not None and time.monotonic() - cached[1] <= LEASE_REUSE_SEC:
                return cached
        asked = time.monotonic()  # the lease counts from after this: etcd grants it once asked
        lease = (self._call("lease/grant", {"TTL": seconds}, deadline)["ID"], asked)
        with self._lock:
            self._leases[seconds] = lease
            if len(self._leases) > 64:  # many lengths of cooldown: the oldest asked go
                for stale in sorted(self._leases, key=lambda key: self._leases[key][1])[:32]:
                    del self._leases[stale]
        return lease


class EtcdClaims(Claims):
    """Cooldowns and the hourly budget shared by every replica, in etcd: the same answers as
    LocalClaims, the claims of one webhook one compare-and-swap transaction.

    <prefix>cooldown/<alertname> exists while that cooldown runs: it is put on a lease of the
    cooldown's length plus a spare (a second, as etcd counts whole seconds, and the longest a call
    may take, AUTOHEAL_ETCD_TIMEOUT_SEC), asked for just before the claim (or up to LEASE_REUSE_SEC
    before: the claims of one moment share a lease); if the action starts
    later than KEEPALIVE_SKIP_SEC after that, the lease is kept alive once more first (begin:
    an ended lease means the claim came too late, and nothing runs).  So the cooldown is measured
    from the start of the action by etcd's lease clock, never shorter,
    whatever the replicas' clocks say, and ends at most the spare late.  A leader election in etcd
    may extend a lease, never shorten it.  The key's value says who claimed it, when on the
    claimer's clock (shown, never compared), the cooldown and the lease's length.
    <prefix>budget/<n> (n below the budget) are the hourly budget's slots, each with a one-hour
    lease: etcd deletes them itself, also after a replica that died.  Every claim is fenced on the
    revision of the shared control state its settings were read at (StaleSettings otherwise).

    How long a cooldown has left is estimated from when this replica first saw its key (by its
    monotonic clock) and the cooldown's length; a key that still exists has at least a second left.
    The status page and /metrics read what the last poll (sync) or claim saw; they never wait.
    """

    def __init__(self, client: EtcdClient, prefix: str, replica: str):
        super().__init__({})  # shown only: when each cooldown started on its claimer's clock
        self.client = client
        self.prefix = prefix
        self.replica = replica
        self._budget = f"{prefix}budget/"  # the budget's slots: <prefix>budget/<n>
        self._budget_used = 0
        self._seen: Dict[str, Tuple[str, float, float]] = {}  # alertname: (mod_revision, cooldown, seen at)
        # The lease of each cooldown this replica claimed last, and when it was asked for (monotonic).
        self._leases: Dict[str, Tuple[str, float]] = {}
        self._lease = LeaseCache(self._call)  # a lease of each length, asked for lately
        # A cooldown's lease outlives it by a second (etcd counts whole seconds) and by the longest a
        # keepalive may take (AUTOHEAL_ETCD_TIMEOUT_SEC): the command starts when its answer comes,
        # and the lease counts from when etcd took it.  So it is never shorter, at most this late.
        self.spare = 1 + int(math.ceil(client.timeout))
        self.run_records = RunRecords(prefix, self._call)  # the latest run of each action, as etcd holds it
        self._approvals: Dict[int, Dict[str, Any]] = {}  # the open approvals, as etcd holds them
        self.up = False
        self.error: Optional[str] = None

    def _key(self, alertname: str) -> str:
        """A cooldown's key in etcd: <prefix>cooldown/NAME, or for a target's
        <prefix>cooldown/NAME/<digest of its label set> (the label set itself is in the value)."""
        name, slash, labels = alertname.partition("/")
        if not slash:
            return f"{self.prefix}cooldown/{alertname}"
        import hashlib

        return f"{self.prefix}cooldown/{name}/{hashlib.sha256(labels.encode('utf-8')).hexdigest()[:32]}"

    def _left_locked(self, key: str, cooldown: float, now: float) -> float:
        seen = self._seen.get(key)
        return 0.0 if seen is None else max(1.0, seen[1] - (time.monotonic() - seen[2]))

    def _keys_locked(self) -> Any:
        return self._seen

    def _call(self, path: str, body: Mapping[str, Any], deadline: Optional[float]) -> Dict[str, Any]:
        try:
            answer = self.client.call(path, body, deadline)
        except CoordinationUnavailable as exc:
            self.up, self.error = False, str(exc)
            raise
        self.up, self.error = True, None
        return answer

    def _see(self, alertname: str, kv: Optional[Mapping[str, Any]]) -> None:
        """Note a cooldown key as read (None: there is none), under the lock."""
        if kv is None:
            self._seen.pop(alertname, None)
            if "/" in alertname:  # a target: forgotten
                self._started.pop(alertname, None)
                self._drop_target(alertname)
            elif alertname in self._started:
                self._started[alertname] = 0.0
            return
        revision = str(kv.get("mod_revision"))
        known = self._seen.get(alertname)
        if known is not None and known[0] == revision:
            return
        try:
            value = json.loads(_unb64(kv.get("value", "")))
            length = float(value.get("cooldown", float(value.get("ttl", MAX_COOLDOWN_SEC)) - 1))
            started = float(value.get("started", 0.0))
        except (ValueError, TypeError, AttributeError):
            length, started = MAX_COOLDOWN_SEC, 0.0
        self._seen[alertname] = (revision, length, time.monotonic())
        self._started[alertname] = started
        if "/" in alertname:
            self._put_target(alertname, started)

    def remaining(self, alertname: str, cooldown: float, now: float) -> float:
        return self.remaining_all([alertname], {alertname: cooldown}, now)[0]

    def remaining_all(self, names: List[str], cooldowns: Mapping[str, float], now: float) -> List[float]:
        clock = time.monotonic()
        with self._lock:
            seen = [self._seen.get(name) for name in names]
        return [0.0 if one is None else max(1.0, one[1] - (clock - one[2])) for one in seen]

    def claim_all(self, wanted: List[Tuple[str, float]], budget: int, now: float,
                  deadline: Optional[float] = None, fence: Optional[int] = None) -> List[Claim]:
        """The claims of one webhook in one transaction, as a rule: it compares every key concerned
        as absent (and the budget's slots it takes as free, and the control state's revision as
        fence) and writes the cooldowns won.  When a compare fails, the same transaction reads
        instead what made it fail: the cooldowns running are refused, the slots taken avoided, a
        newer control state is StaleSettings; the rest are claimed again.  Of any number of
        replicas at once, one wins each cooldown; the others find it there."""
        import random

        cooldown_of: Dict[str, float] = {}
        for name, cooldown in wanted:
            cooldown_of.setdefault(name, cooldown)
        results: Dict[str, Claim] = {}
        taken: Optional[set] = None  # the budget's slots known taken (None: not read yet)
        if deadline is None:
            deadline = time.monotonic() + self.client.timeout
        while True:
            winners = [name for name in cooldown_of if name not in results]
            if budget and taken is None and len(winners) > budget:
                # More new claims than the whole budget: which of them cool already decides which
                # get its slots, so the keys and the slots are read first (rare: a big storm).
                answer = self._call("kv/txn", {"success": self._claim_reads(winners, True)}, deadline)
                taken = self._refusals(winners, answer, results, fence)
                continue
            slots: Dict[str, str] = {}
            if budget and winners:  # free slots picked at random, so that replicas at once rarely collide
                known = taken or set()  # a sample this large holds enough free slots, if there are
                free = [n for n in random.sample(range(budget), min(budget, len(winners) + len(known)))
                        if str(n) not in known]
                for name in list(winners):
                    if free:
                        slots[name] = f"{self._budget}{free.pop()}"
                    else:
                        winners.remove(name)
                        results[name] = Claim(False, 0.0, "budget")
            if not winners:
                return self._expand(wanted, results)
            leases: Dict[int, Tuple[str, float]] = {}
            for name in winners:
                seconds = int(math.ceil(cooldown_of[name])) + self.spare
                if cooldown_of[name] > 0 and seconds not in leases:  # no cooldown: no key to keep
                    leases[seconds] = self._lease(seconds, deadline)
            # a slot's lease outlives its hour by a second: a lease asked for a little earlier serves
            slot_lease = self._lease(BUDGET_WINDOW_SEC + 1, deadline)[0] if slots else None
            answer = self._call("kv/txn", self._claim_txn(winners, slots, cooldown_of, leases, slot_lease, fence, now),
                                deadline)
            responses = [response.get("response_range") or {} for response in answer.get("responses") or []]
            made = bool(answer.get("succeeded"))  # etcd leaves it out when false
            found = [] if made else [(response.get("kvs") or [None])[0] for response in responses[1:len(winners) + 1]]
            # Made: now, or the first time, by a member whose answer was lost before the same
            # transaction went to the next (it finds this replica's own keys: all of them, as a
            # transaction is atomic).
            if made or any(self._claimed_here(kv, now) for kv in found):
                revision = {name: str(kv["mod_revision"]) for name, kv in zip(winners, found) if kv}
                with self._lock:
                    for name in winners:
                        seconds = int(math.ceil(cooldown_of[name])) + self.spare
                        if seconds in leases:
                            self._seen[name] = (revision.get(name, str(answer["header"]["revision"])),
                                                float(cooldown_of[name]), time.monotonic())
                            self._leases[name] = leases[seconds]
                            if "/" in name:
                                self._put_target(name, now)
                        self._started[name] = now
                        results[name] = Claim(True, cooldown_of[name])
                    if slots and made:  # the slots in use before this transaction, and its own
                        self._budget_used = int(responses[0].get("count", 0)) + len(slots)
                return self._expand(wanted, results)
            known = (len(results), taken)
            read = self._refusals(winners, answer, results, fence)
            taken = taken if read is None else read
            if (len(results), taken) == known:  # nothing read explains the refusal: not tried forever
                raise CoordinationUnavailable("etcd refused the claim's transaction for a reason it did not show")

    def _refusals(self, winners: List[str], answer: Mapping[str, Any], results: Dict[str, Claim],
                  fence: Optional[int]) -> Optional[set]:
        """What a read of _claim_reads found (a claim's failure branch): StaleSettings when the
        control state is not at the fence; a cooldown refusal in results for each key that
        exists; the budget's slots taken (None when they were not read)."""
        responses = [response.get("response_range") or {} for response in answer.get("responses") or []]
        kvs = responses[0].get("kvs") or []
        current = int(kvs[0]["mod_revision"]) if kvs else 0
        if fence is not None and current != fence:
            raise StaleSettings(f"the shared settings changed (revision {fence} -> {current})")
        with self._lock:
            for name, response in zip(winners, responses[1:len(winners) + 1]):
                kvs = response.get("kvs") or []
                self._see(name, kvs[0] if kvs else None)
                if kvs:  # another replica was first: its cooldown runs
                    seen = self._seen[name]
                    results[name] = Claim(False, max(1.0, seen[1] - (time.monotonic() - seen[2])), "cooldown")
            if len(responses) <= len(winners) + 1:
                return None
            taken = {_unb64(kv["key"])[len(self._budget):] for kv in responses[len(winners) + 1].get("kvs") or []}
            self._budget_used = len(taken)
        return taken

    def _claimed_here(self, kv: Optional[Mapping[str, Any]], now: float) -> bool:
        """Whether a cooldown key read is this replica's claim made at now (_claim_txn's value)."""
        if kv is None:
            return False
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            value = json.loads(_unb64(kv.get("value", "")))
            return value.get("replica") == self.replica and value.get("started") == now
        return False

    def _claim_txn(self, winners: List[str], slots: Mapping[str, str], cooldown_of: Mapping[str, float],
                   leases: Mapping[int, Tuple[str, float]], slot_lease: Optional[str], fence: Optional[int],
                   now: float) -> Dict[str, Any]:
        """The transaction that claims: each cooldown key still absent, each slot still free, the
        control state at the fence's revision; then the slots counted, and every key and slot
        written on its lease.  Failing, it reads the control state, each key and the slots."""
        control = _b64(f"{self.prefix}control")
        compare = [{"key": _b64(self._key(name)), "target": "CREATE", "create_revision": "0"} for name in winners]
        if fence is not None:  # the settings it was judged with are still the shared ones
            compare.append({"key": control, "target": "MOD", "mod_revision": str(fence)} if fence
                           else {"key": control, "target": "CREATE", "create_revision": "0"})
        in_use = {"request_range": _prefix_range(self._budget, count_only=True)}  # the slots, counted first
        writes: List[Dict[str, Any]] = [in_use] if slots else []
        for name in winners:
            seconds = int(math.ceil(cooldown_of[name])) + self.spare
            value = json.dumps({"replica": self.replica, "started": now, "ttl": seconds, "cooldown": cooldown_of[name],
                                "key": name})
            if cooldown_of[name] > 0:  # a cooldown of 0 keeps no key (only its budget slot, if any)
                writes.append({"request_put": {"key": _b64(self._key(name)), "value": _b64(value),
                                               "lease": leases[seconds][0]}})
            if name in slots:
                compare.append({"key": _b64(slots[name]), "target": "CREATE", "create_revision": "0"})
                writes.append({"request_put": {"key": _b64(slots[name]), "value": _b64(self.replica),
                                               "lease": slot_lease}})
        return {"compare": compare, "success": writes, "failure": self._claim_reads(winners, bool(slots))}

    def _claim_reads(self, winners: List[str], slots: bool) -> List[Dict[str, Any]]:
        """The control state, each cooldown key of winners, and with slots the budget's slots."""
        reads = [{"request_range": {"key": _b64(f"{self.prefix}control")}}]
        reads += [{"request_range": {"key": _b64(self._key(name))}} for name in winners]
        if slots:
            reads.append({"request_range": _prefix_range(self._budget, keys_only=True)})
        return reads

    @staticmethod
    def _expand(wanted: List[Tuple[str, float]], results: Mapping[str, Claim]) -> List[Claim]:
        """A claim per wanted entry: a repeat of an alertname in one webhook finds the cooldown its
        first occurrence started (or the same refusal)."""
        claims, seen = [], set()
        for name, cooldown in wanted:
            claim = results[name]
            claims.append(Claim(False, cooldown, "cooldown") if name in seen and claim.won else claim)
            seen.add(name)
        return claims

    def claim(self, alertname: str, cooldown: float, budget: int, now: float,
              deadline: Optional[float] = None) -> Claim:
        """One alertname's claim (claim_all of one)."""
        return self.claim_all([(alertname, cooldown)], budget, now, deadline)[0]

    def settled(self, key: str) -> None:
        with self._lock:
            self._leases.pop(key, None)

    def begin(self, alertname: str, deadline: Optional[float] = None) -> None:
        """The action of a claimed cooldown starts now.  Its lease (the cooldown's length and the
        spare of at least 2 s, counted by etcd from after it was asked for) outlasts the cooldown
        counted from now whenever the action starts within KEEPALIVE_SKIP_SEC of that: then
        nothing is sent (one etcd request fewer per run).  Later (the claim's answer was slow, or
        the action waited for a slot), the lease is kept alive once more, so the cooldown counts
        from here (CoordinationUnavailable: it must not start)."""
        with self._lock:
            lease, asked = self._leases.pop(alertname, ("", 0.0))
        if lease and time.monotonic() - asked > KEEPALIVE_SKIP_SEC:
            answer = self._call("lease/keepalive", {"ID": lease}, deadline)
            if int((answer.get("result") or {}).get("TTL") or 0) <= 0:  # etcd answers an ended lease without one
                raise CoordinationUnavailable("the cooldown's lease ended before its action could start (etcd "
                                              "answered the claim too late): the action does not run")
            with self._lock:
                seen = self._seen.get(alertname)
                if seen is not None:
                    self._seen[alertname] = (seen[0], seen[1], time.monotonic())

    def _forget(self, lease: Optional[str], deadline: Optional[float]) -> None:
        if lease and lease != "0":
            with contextlib.suppress(CoordinationUnavailable, KeyError):
                self._call("lease/revoke", {"ID": lease}, deadline)

    def rearm(self, alertname: str) -> None:
        """End alertname's running cooldown now, on every replica: the key goes.  Its lease is left
        to end with the cooldown it was granted for (other cooldowns claimed in the same webhook may
        share it: revoking it would end them too)."""
        self._call("kv/deleterange", {"key": _b64(self._key(alertname))}, None)
        with self._lock:
            self._see(alertname, None)

    def rearm_targets(self, alertname: str, keys: List[str], everything: bool) -> None:
        """All of alertname's targets: every key under <prefix>cooldown/NAME/ at once, also those
        another replica claimed that this one has not seen yet; some: theirs, 64 to a transaction."""
        if everything:
            prefix = f"{self.prefix}cooldown/{alertname}/"
            self._call("kv/deleterange", _prefix_range(prefix), None)
        else:
            for start in range(0, len(keys), 64):
                self._call("kv/txn", {"success": [{"request_delete_range": {"key": _b64(self._key(key))}}
                                                  for key in keys[start:start + 64]]}, None)
        with self._lock:
            for key in keys:
                self._see(key, None)

    def restore(self, alertname: str, started: Optional[float], left: Optional[float] = None) -> None:
        """Put back what a rearm took from a cooldown (its undo): a key on a lease of the seconds
        it had left then (no replica's clock is compared), unless the alertname acted since."""
        if not left:
            return
        seconds = int(math.ceil(left)) + 1
        lease = self._call("lease/grant", {"TTL": seconds}, None)["ID"]
        key = _b64(self._key(alertname))
        value = json.dumps({"replica": self.replica, "started": time.time(), "ttl": seconds, "key": alertname})
        answer = self._call("kv/txn", {"compare": [{"key": key, "target": "CREATE", "create_revision": "0"}],
                                       "success": [{"request_put": {"key": key, "value": _b64(value),
                                                                    "lease": lease}}]}, None)
        if not answer.get("succeeded"):
            self._forget(lease, None)

    def budget_used(self, now: float) -> int:
        with self._lock:
            return self._budget_used

    # -- approvals: any replica takes the answer, exactly one runs it ----------------------------

    def put_approval(self, approval_id: int, record: Mapping[str, Any], seconds: float) -> None:
        """Share an open approval under <prefix>approval/<id>, on a lease a little longer than it
        may wait (its opener closes it as expired; the lease only tidies up after a dead one)."""
        lease = self._call("lease/grant", {"TTL": int(math.ceil(seconds)) + self.spare + 60}, None)["ID"]
        record = {**record, "replica": self.replica}
        key = _b64(f"{self.prefix}approval/{approval_id}")
        answer = self._call("kv/txn", {"compare": [{"key": key, "target": "CREATE", "create_revision": "0"}],
                                       "success": [{"request_put": {"key": key, "value": _b64(json.dumps(record)),
                                                                    "lease": lease}}]}, None)
        if not answer.get("succeeded"):  # another replica's approval has this id: never overwritten
            self._forget(lease, None)
            raise CoordinationUnavailable(f"etcd holds another approval #{approval_id} already")
        with self._lock:
            self._approvals[approval_id] = record

    def take_approval(self, approval_id: int) -> Optional[Dict[str, Any]]:
        """Answer an open approval: whichever replica deletes its key first has it (its record);
        None when another was first, or it was never opened."""
        key = _b64(f"{self.prefix}approval/{approval_id}")
        answer = self._call("kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "create_revision": "0", "result": "NOT_EQUAL"}],
            "success": [{"request_delete_range": {"key": key, "prev_kv": True}}]}, None)
        with self._lock:
            self._approvals.pop(approval_id, None)
        if not answer.get("succeeded"):
            return None
        taken = ((answer.get("responses") or [{}])[0].get("response_delete_range") or {}).get("prev_kvs") or []
        try:
            return dict(json.loads(_unb64(taken[0].get("value", "")))) if taken else None
        except (ValueError, TypeError):
            return None

    def approvals(self) -> Dict[int, Dict[str, Any]]:
        """The open approvals of every replica, as the last poll (or this replica's writes) saw them."""
        with self._lock:
            return dict(self._approvals)

    # -- the shared runtime control state ------------------------------------------------------

    def sync(self) -> Tuple[Optional[str], int, FrozenSet[int]]:
        """Poll what every replica shares: the runtime control state (its text and revision, 0:
        none yet), the timed overrides still alive (their ids), the cooldowns and the budget
        slots in use (kept for the status page)."""
        with contextlib.suppress(CoordinationUnavailable):  # kept for the next poll: the read goes on
            self.run_records.share()
        cooldowns, overrides = f"{self.prefix}cooldown/", f"{self.prefix}override/"
        runs, approvals = f"{self.prefix}run/", f"{self.prefix}approval/"
        answer = self._call("kv/txn", {"success": [
            {"request_range": {"key": _b64(f"{self.prefix}control")}},
            {"request_range": _prefix_range(cooldowns)},
            {"request_range": _prefix_range(self._budget, count_only=True)},
            {"request_range": _prefix_range(overrides, keys_only=True)},
            {"request_range": _prefix_range(runs)},
            {"request_range": _prefix_range(approvals)},
        ]}, None)
        control, running, slots, alive, latest, waiting = [r.get("response_range", {})
                                                           for r in answer.get("responses", [])]
        shared_approvals: Dict[int, Dict[str, Any]] = {}
        for kv in waiting.get("kvs") or []:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                shared_approvals[int(_unb64(kv["key"])[len(approvals):])] = dict(json.loads(_unb64(kv["value"])))
        shared_runs: Dict[str, Dict[str, Any]] = {}
        for kv in latest.get("kvs") or []:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                shared_runs[_unb64(kv["key"])[len(runs):]] = dict(json.loads(_unb64(kv.get("value", ""))))
        found = {self._name_of(_unb64(kv["key"])[len(cooldowns):], kv): kv for kv in running.get("kvs") or []}
        self.run_records.seen(shared_runs)
        with self._lock:
            for name in set(self._seen) | set(found):
                self._see(name, found.get(name))
            self._budget_used = int(slots.get("count", 0))
            self._approvals = shared_approvals
        live: FrozenSet[int] = frozenset(int(_unb64(kv["key"])[len(overrides):]) for kv in alive.get("kvs") or []
                                         if _unb64(kv["key"])[len(overrides):].isdigit())
        kvs = control.get("kvs") or []
        if not kvs:
            return None, 0, live
        return _unb64(kvs[0].get("value", "")), int(kvs[0]["mod_revision"]), live

    @staticmethod
    def _name_of(suffix: str, kv: Mapping[str, Any]) -> str:
        """What a cooldown key in etcd is claimed by here: NAME, or a target's key (from its value)."""
        if "/" not in suffix:
            return suffix
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            key = json.loads(_unb64(kv.get("value", ""))).get("key")
            if isinstance(key, str) and key.partition("/")[0] == suffix.partition("/")[0]:
                return key
        return suffix

    def put_control(self, text: str, revision: int, deadline: Optional[float] = None,
                    timed: Optional[Mapping[int, float]] = None) -> int:
        """Write the runtime control state if nobody changed it since revision (0: never written),
        with a key on a lease of its duration for each new timed override (id: seconds); its new
        revision, or 0 when another replica's change came first."""
        key = _b64(f"{self.prefix}control")
        compare = ({"key": key, "target": "MOD", "mod_revision": str(revision)} if revision
                   else {"key": key, "target": "CREATE", "create_revision": "0"})
        writes = [{"request_put": {"key": key, "value": _b64(text)}}]
        for override_id, seconds in (timed or {}).items():
            lease = self._call("lease/grant", {"TTL": max(1, int(math.ceil(seconds)))}, deadline)["ID"]
            writes.append({"request_put": {"key": _b64(f"{self.prefix}override/{override_id}"), "value": _b64("1"),
                                           "lease": lease}})
        answer = self._call("kv/txn", {"compare": [compare], "success": writes}, deadline)
        return int(answer["header"]["revision"]) if answer.get("succeeded") else 0


# ---------------------------------------------------------------------------------------------
# Judging and recording: decisions, events, the journal, the /events feed
# ---------------------------------------------------------------------------------------------


def judge(alert: Mapping[str, Any], settings: Settings, actions: Mapping[str, Action]) -> "Decision":
    """The gates that read only the alert and the settings in force, in the README's order
    ("What happens to each alert"): resolved, opted in, allow-listed.  An alert that passes them
    all is "pending": whether it acts is for the claims object to say."""
    alertname = alert["labels"]["alertname"]
    if alert["status"] == "resolved":
        return Decision(alertname, "skipped", "resolved")
    if (alert.get("annotations") or {}).get("autoheal") != "true":
        return Decision(alertname, "skipped", "not_opted_in")
    action = actions.get(alertname)
    if action is None:
        return Decision(alertname, "skipped", "not_allowlisted")
    if alertname in settings.disabled:  # switched off at runtime (disable NAME)
        return Decision(alertname, "skipped", "disabled")
    if action.fleet:
        return _fleet_decision(alertname, action, alert["labels"])
    return Decision(alertname, "pending", None, action)


def _fleet_decision(alertname: str, action: Action, labels: Mapping[str, Any]) -> "Decision":
    """An action of a fleet: its target (the cooldown_by labels, each one present) and its command
    filled from the labels (each value checked), else skipped saying which label and why."""
    target = None
    if action.per_target:
        target = {}
        for name in action.cooldown_by:
            value = labels.get(name)
            if not isinstance(value, str):
                return Decision(alertname, "skipped", "missing_label", detail={"label": name})
            target[name] = value
    filled = fill_action(action, labels) if action.templated else action
    if isinstance(filled, dict):
        return Decision(alertname, "skipped", "target_refused", detail=filled)
    decision = Decision(alertname, "pending", action=filled)
    if target is not None:
        decision.key, decision.target = cooldown_key(alertname, target), target
    return decision


def cooldown_key(alertname: str, target: Mapping[str, str]) -> str:
    """What claims a target's cooldown by: NAME/{"label":"value",...} (cooldown_by's order).  In
    etcd its key is <prefix>cooldown/NAME/<digest of the label set> (EtcdClaims)."""
    return alertname + "/" + json.dumps({name: value for name, value in target.items() if name != "alertname"},
                                        separators=(",", ":"))


def target_of_key(key: str) -> Dict[str, str]:
    """The label set a cooldown key stands for (its alertname first)."""
    name, _, rest = key.partition("/")
    try:
        labels = json.loads(rest) if rest else {}
    except ValueError:
        labels = {}
    return {"alertname": name, **(labels if isinstance(labels, dict) else {})}


def fill_action(action: Action, labels: Mapping[str, Any]) -> Union[Action, Dict[str, str]]:
    """The action with its {label:NAME} placeholders filled (each value whole, within its own
    argument, never through a shell), or why not: {"label", "value", "why"}.  A value must be
    there, hold only [A-Za-z0-9][A-Za-z0-9_.:-]{0,127} and match one of the action's patterns
    (targets for the command, docker_hosts for docker_host, whose values are hosts: never a
    port of the alert's choosing, so no ':')."""
    import fnmatch

    refused: List[Dict[str, str]] = []

    def fill(text: str, patterns: Tuple[str, ...], key: str) -> str:
        def one(match: Any) -> str:
            name = match.group(1)
            value = labels.get(name)
            if not isinstance(value, str):
                why = "the alert has no such label"
            elif not TARGET_VALUE.fullmatch(value):
                why = "it holds characters outside [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"
            elif key == "docker_hosts" and ":" in value:
                why = "a Docker host's value may not hold ':'"
            elif not any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns):
                why = f"it matches none of the action's {key}"
            else:
                return value
            if not refused:
                shown = json.dumps(value[:64])[1:-1] if isinstance(value, str) else None
                refused.append({"label": name, "value": shown, "why": why} if shown is not None
                               else {"label": name, "why": why})
            return ""

        return PLACEHOLDER.sub(one, text)

    argv = tuple(fill(word, action.targets, "targets") for word in action.argv)
    host = fill(action.docker_host, action.docker_hosts, "docker_hosts") if action.docker_host else None
    if refused:
        return refused[0]
    if argv == action.argv and host == action.docker_host:
        return action
    return action._replace(argv=argv, display=shlex.join(argv), docker_host=host)


# Every kind of event the history holds, with the results it can have (/history?kind=&result=
# names them when given anything else); retention_class says which of them a storm may evict.
EVENT_KINDS: Dict[str, Tuple[str, ...]] = {
    "decision": ACTION_RESULTS + ("skipped",),  # what became of one alert of a webhook
    "run": ("started",),  # an action's command started (its decision follows when it ends)
    "heal": HEAL_RESULTS + ("resolved_by_itself", "still_firing"),  # a run's verdict (or a dry run's)
    "ack": ("created", "existing", "extended", "error"),  # an /ack link clicked
    "unack": ("expired", "already_expired"),  # an acknowledgement undone
    "control": ("applied", "refused", "invalid", "lapsed", "unknown"),  # a runtime control command, or a lapse
    "state": ("recovered",),  # the state file was damaged and replaced
    "approval": ("opened",) + APPROVAL_RESULTS,  # a run waiting for a person (approve: true), and the answer
}
EVENT_RESULTS = tuple(sorted({result for results in EVENT_KINDS.values() for result in results}))


def make_event(kind: str, now: float, **fields: Any) -> Dict[str, Any]:
    """A history event: when, what kind (one of EVENT_KINDS), then its fields in the order given
    (None ones left out)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}: add it to EVENT_KINDS")
    event: Dict[str, Any] = {"ts": round(now, 6), "kind": kind}
    event.update((name, value) for name, value in fields.items() if value is not None)
    return event


class Decision:
    """What the gates decided for one alert; result "run" until the command ends."""

    __slots__ = ("alertname", "result", "reason", "action", "cooldown_remaining", "outcome", "event", "fold_into",
                 "claim", "step", "key", "target", "detail", "approved_by", "text", "said")

    def __init__(self, alertname: str, result: str, reason: Optional[str] = None, action: Optional[Action] = None,
                 cooldown_remaining: float = 0.0, detail: Optional[Dict[str, str]] = None):
        self.alertname = alertname
        self.key = alertname  # what its cooldown is claimed by: the alertname, or a target's key
        self.target: Optional[Dict[str, str]] = None  # a per-target action's target (cooldown_by's labels)
        self.detail = detail  # a skip's particulars: the label missing or refused
        self.approved_by: Optional[str] = None  # who approved the run (approve: true)
        self.result = result
        self.reason = reason
        self.action = action
        self.cooldown_remaining = cooldown_remaining
        self.outcome: Optional[RunOutcome] = None
        self.event: Optional[Dict[str, Any]] = None  # a routine decision's event, built when first seen
        self.text: Optional[str] = None  # its event's JSON text, when decision_event made it
        # Its answer's text as decision_event made it (a plain one's): whatever changes what a
        # decision says after that (_fail_closed, Approvals.open) sets it back to None.
        self.said: Optional[str] = None
        self.fold_into: Optional[Dict[str, Any]] = None  # the event a repeat folds into
        self.claim: Optional[Claim] = None  # the claim it won, if any
        self.step = 1  # escalation: 2, 3, ... for the further steps of an action

    def settle(self, claim: Claim, settings: Settings) -> None:
        """What a pending decision becomes once its claim is answered."""
        self.cooldown_remaining = claim.remaining
        if claim.won:
            self.claim = claim
            # Why it was not run: the master switch is off, or dry-run mode is on.
            executes = settings.executes
            self.result = "run" if executes else "dry_run"
            self.reason = None if executes else ("dry_run" if settings.enabled else "disabled")
        elif claim.reason == "cooldown":
            self.result = "cooldown_skip"
        elif claim.reason == "budget":
            self.result = "rate_limited"
            self.reason = f"global budget of {settings.max_actions_per_hour} actions per hour is spent"
        else:  # a claims object that answers with a reason nobody maps would be mislabelled
            raise ValueError(f"claim lost for an unknown reason {claim.reason!r}; expected one of {CLAIM_REASONS}")

    def event_of(self, kind: str, alert: Mapping[str, Any], now: float, ts: Optional[float] = None) -> Dict[str, Any]:
        """Its history event: a run starting (kind "run") or the decision (ts: now rounded as
        events have it, when the caller has it already)."""
        action = self.action
        # make_event's fields, built in place: a storm of 5,000 alerts builds 5,000 of them.
        event: Dict[str, Any] = {"ts": round(now, 6) if ts is None else ts, "kind": kind, "alertname": self.alertname,
                                 "result": "started" if kind == "run" else self.result}
        if self.reason:
            event["reason"] = self.reason
        if self.detail:
            event.update(self.detail)
        if self.target is not None:
            event["target"] = self.target
        if action is not None:
            event["action"] = action.display
            event["cooldown_remaining_seconds"] = math.ceil(self.cooldown_remaining)
        if self.step > 1:
            event["step"] = self.step
        if self.approved_by is not None:
            event["approved_by"] = self.approved_by
        event["labels"] = alert["labels"]
        event["fingerprint"] = alert.get("fingerprint", "")
        event["starts_at"] = alert.get("startsAt", "")
        outcome = self.outcome
        if outcome is not None and kind == "decision":
            event["exit_status"] = outcome.exit_status  # null when it did not start: said, not left out
            event["duration_seconds"] = round(outcome.duration_seconds, 6)
            event["output_tail"] = outcome.output_tail
            if outcome.error:
                event["error"] = outcome.error
        return event

    def plain(self) -> bool:
        """Whether its answer says only alertname, result, action, cooldown and reason: what the
        thousands of a storm are, and what answer_text makes once for all that say the same."""
        if self.result == "skipped":
            shaped = self.action is None and bool(self.reason)
        else:
            shaped = self.action is not None
        return (shaped and self.outcome is None and self.target is None and not self.detail and self.step == 1
                and self.approved_by is None)

    def answer_text(self, made: Dict[Any, str]) -> str:
        """answer() as compact JSON text, a plain one's made once per webhook (made: by what it says)."""
        if self.said is not None:
            return self.said
        return self._plain_answer(made) if self.plain() else compact_json(self.answer())

    def _plain_answer(self, made: Dict[Any, str]) -> str:
        action = self.action
        key = (self.alertname, self.result, self.reason, action.display if action is not None else None,
               math.ceil(self.cooldown_remaining))
        text = made.get(key)
        if text is None:
            text = made[key] = compact_json(self.answer())
        return text

    def decision_event(self, alert: Mapping[str, Any], ts: float, made: Dict[Any, str]) -> Dict[str, Any]:
        """Its "decision" event (event_of).  A plain one's JSON text (self.text) is made from its
        answer's (answer_text) and the alert's labels, fingerprint and start, without the event as
        a whole ever being encoded: its event keeps only what the rows and the notifier read."""
        if not self.plain():
            self.text = self.said = None
            return self.event_of("decision", alert, ts, ts)
        opening = made.get(ts)  # the events' opening, made once per webhook too (keyed by its time)
        if opening is None:
            opening = made[ts] = f'{{"ts":{ts!r},"kind":"decision",'
        self.said = said = self._plain_answer(made)
        self.text = (f'{opening}{said[1:-1]},"labels":{compact_json(alert["labels"])},'
                     f'"fingerprint":{_json_string(alert.get("fingerprint", ""))},'
                     f'"starts_at":{_json_string(alert.get("startsAt", ""))}}}')
        event = {"ts": ts, "kind": "decision", "alertname": self.alertname, "result": self.result}
        if self.reason:
            event["reason"] = self.reason
        return event

    def answer(self) -> Dict[str, Any]:
        """Its part of the webhook's answer."""
        if self.result == "skipped":
            if self.detail:
                return {"alertname": self.alertname, "result": "skipped", "reason": self.reason, **self.detail}
            return {"alertname": self.alertname, "result": "skipped", "reason": self.reason}
        answer: Dict[str, Any] = {"alertname": self.alertname, "result": self.result,
                                  "action": self.action.display if self.action else None,
                                  "cooldown_remaining_seconds": math.ceil(self.cooldown_remaining)}
        if self.target is not None:
            answer["target"] = self.target
        if self.detail:  # an approval's id, for one that awaits it
            answer.update(self.detail)
        if self.reason:
            answer["reason"] = self.reason
        outcome = self.outcome
        if outcome is not None:
            answer["exit_status"] = outcome.exit_status
            answer["duration_seconds"] = round(outcome.duration_seconds, 3)
            if outcome.error:
                answer["error"] = outcome.error
        return answer


def _short(text: str) -> Any:
    """A fold key's part: the text itself, or for a long one its length and hash, so that what is
    kept to fold into stays small whatever an alert's fingerprint or alertname holds."""
    return text if len(text) <= 256 else (len(text), hash(text))


def _shrink_fold_targets(events: List[Dict[str, Any]]) -> None:
    """Once recorded, a routine decision's event is needed only as what its repeats fold into, by
    its id: the rest goes, so that up to FOLD_KEYS_MAX of them cost bytes, not 16 KiB each."""
    for event in events:
        if event.get("kind") == "decision" and event.get("result") in ROUTINE_RESULTS and "id" in event:
            for key in [key for key in event if key != "id"]:  # the id stays, for a repeat reading it now
                del event[key]


def _uncommitted_text(event: Mapping[str, Any], made: Optional[str]) -> str:
    """What the log says of an event whose commit failed: its id first (when it got one), then its
    made text (Decision.decision_event; Store.record dropped it when it was too long, the event
    itself then cut in its place) or the event itself."""
    if made is None:
        return _COMPACT_JSON.encode(event)
    return f'{{"id":{event["id"]},' + made[1:] if "id" in event else made


class Journal:
    """Logging and recording: one JSON log line per event, and events kept durably in the store
    (committed) before they are logged.  Every part that records (the webhook, control, heal
    verdicts, acks) records through it."""

    def __init__(self, clock: Callable[[], float], log_stream: Any = None):
        self.clock = clock
        self.store: Store  # set by App once the store is open (the store logs through this too)
        self._stream = log_stream
        self._lock = threading.Lock()
        self._held = threading.local()  # .records: what this thread recorded and holds (hold)
        self.on_recorded: Optional[Callable[[List[Dict[str, Any]]], None]] = None  # told of committed events

    def log(self, event: Mapping[str, Any], level: str = "info") -> None:
        """Write one JSON log line: its event first, then time (RFC 3339 UTC) and level."""
        log_event({"event": event.get("event"), "time": format_rfc3339(self.clock()), "level": level, **event},
                  self._stream, self._lock)

    def record(self, events: List[Dict[str, Any]], cooldowns: Optional[Mapping[str, float]] = None,
               folds: Optional[List[Tuple[Dict[str, Any], float]]] = None,
               control: Optional[Callable[[int], str]] = None,
               heals: Optional[Mapping[str, Optional[str]]] = None, required: bool = False,
               made: Optional[List[Optional[str]]] = None) -> None:
        """Record events durably (waiting for the commit), then log them, one line each; a folded
        repeat only adds to the count of the event it folds into; control and heals as in
        Store.record, made as its texts.  A thread that holds its records (hold) waits and logs
        later.  required: a commit that fails raises StateUnavailable (else it is logged, and the
        events too)."""
        held = getattr(self._held, "records", None)
        pending: Optional[List[_Pending]] = None if held is None else []
        try:
            texts = self.store.record(events, cooldowns, folds, control, heals, pending, made)
        except sqlite3.Error as exc:
            self.log({"event": "error", "message": f"state file: {exc}"}, "error")
            if required:
                raise StateUnavailable(str(exc)) from None
            texts = [(event.get("id", 0), _uncommitted_text(event, made[index] if made else None))
                     for index, event in enumerate(events)]
        if held is not None:
            held.append((events, texts, pending))
        else:
            self._log_recorded(events, texts)

    def hold(self) -> None:
        """From now on this thread's records are not waited for one by one: take_held hands them
        over, and settle (or settle_now) waits for all of them at once (one commit) before any of
        the thread's requests is answered."""
        self._held.records = []

    def take_held(self) -> List[Any]:
        """What this thread recorded since hold, to be settled by any thread (settle)."""
        held, self._held.records = self._held.records, None
        return held

    def settle_now(self, held: List[Any]) -> Optional[bool]:
        """settle, if committing waits on nobody (Store.commit_now); None, nothing done, if it would."""
        while any(not one.done for _events, _texts, pending in held for one in pending):
            if not self.store.commit_now():
                return None
        return self.settle(held)

    def settle(self, held: List[Any]) -> bool:
        """Commit held records (this thread does it, in one commit), then log them (one write);
        whether every one of them was committed."""
        committed = True
        for _events, _texts, pending in held:
            for one in pending:
                try:
                    self.store.wait(one)
                except sqlite3.Error as exc:
                    self.log({"event": "error", "message": str(exc)}, "error")
                    committed = False
        self._log_recorded([event for events, _texts, _pending in held for event in events],
                           [text for _events, texts, _pending in held for text in texts])
        return committed

    def _log_recorded(self, events: List[Dict[str, Any]], texts: List[Tuple[int, str]]) -> None:
        if events and self.on_recorded is not None:  # the notifier: told once the events are committed
            self.on_recorded(events)
        if texts:
            # The recorded text, with time and level in front: one serialisation per event.
            prefix = '{"time":"' + format_rfc3339(self.clock()) + '","level":"'
            levels = _EVENT_LEVELS
            lines = [f'{prefix}{levels.get(event.get("result"), "info")}",{text[1:]}'
                     for event, (_id, text) in zip(events, texts)]
            stream = self._stream or sys.stdout
            with self._lock:
                lines.append("")  # the last line's end
                stream.write("\n".join(lines))  # one write for the whole request, or round
                stream.flush()


class SeenOnce:
    """Signatures accepted within their window (Slack's five minutes): a repeat is a replay.  At
    most max_kept are remembered (the oldest go first); each needs the signing secret to make."""

    def __init__(self, window: float, max_kept: int = 100_000):
        self.window = window
        self.max_kept = max_kept
        self._lock = threading.Lock()
        self._seen: "collections.OrderedDict[str, float]" = collections.OrderedDict()

    def first(self, signature: str, now: float) -> bool:
        """True the first time signature is seen within the window; False for a repeat."""
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) <= now - self.window
                                  or len(self._seen) >= self.max_kept):
                self._seen.popitem(last=False)
            if signature in self._seen:
                return False
            self._seen[signature] = now
            return True


class Subscriber:
    """One GET /events client: the id of the last event it was sent."""

    __slots__ = ("cursor",)

    def __init__(self, cursor: int):
        self.cursor = cursor


class EventFeed:
    """The /events feed: committed events in id order (publish, the store's on_commit), who
    listens, and what each listener has not seen yet.  One lock (a Condition) guards it all."""

    def __init__(self, max_listeners: int):
        self.max_listeners = max_listeners
        self.store: Store  # set by App once the store is open: a listener behind the feed reads it
        self.latest_id = 0
        self._subscribers: List[Subscriber] = []
        # The latest events, in id order, and who waits for them.
        self._feed: collections.deque = collections.deque()
        self._bytes = 0  # of the texts in the feed: at most FEED_MAX_BYTES
        self._changed = threading.Condition()
        self._closed = False
        self._compacted = 0  # the newest event id in the feed when compact() last copied it

    def publish(self, texts: List[Tuple[int, str]]) -> None:
        """Committed events, in id order, for the subscribers.  Kept only while there are any: one
        that comes later reads what it missed from the history (events_after), and a storm's
        events in the feed would hold megabytes that nobody reads."""
        with self._changed:
            if self._subscribers:
                self._feed.extend(texts)
                self._bytes += sum(len(text) for _id, text in texts)
                while self._bytes > FEED_MAX_BYTES and len(self._feed) > 1:  # a listener behind reads the history
                    self._bytes -= len(self._feed.popleft()[1])
            elif self._feed:
                self._feed.clear()
                self._bytes = 0
            if texts:
                self.latest_id = texts[-1][0]
            self._changed.notify_all()

    def compact(self) -> None:
        """Copy the feed, the one thing a storm of alerts leaves alive: allocated among the
        storm's temporary objects, its entries would keep most of the memory the storm used from
        ever going back to the system (1 MiB pymalloc arenas are freed only when empty)."""
        with self._changed:
            newest = self._feed[-1][0] if self._feed else 0
            if newest == self._compacted:  # nothing new since the last copy (a scrape, a health check)
                return
            self._feed = collections.deque((event_id + 0, text.encode().decode()) for event_id, text in self._feed)
            self._compacted = newest

    def subscribe(self, last_event_id: Optional[int]) -> Optional[Subscriber]:
        """A new subscriber, or None when every slot is taken.  It gets what comes after
        last_event_id (SSE's Last-Event-ID), or, without one, what comes from now on."""
        with self._changed:
            if len(self._subscribers) >= self.max_listeners:
                return None
            subscriber = Subscriber(self.latest_id if last_event_id is None else last_event_id)
            self._subscribers.append(subscriber)
            return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._changed:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def listeners(self) -> int:
        with self._changed:
            return len(self._subscribers)

    def events_after(self, subscriber: Subscriber, wait: float) -> Optional[List[Tuple[int, str]]]:
        """The (id, text) of events after the subscriber's cursor, waiting up to wait seconds for
        one; None once autoheal is closing.  A subscriber behind the feed reads the history, so
        only one that stops reading (its socket times out) is ever dropped."""
        cursor = subscriber.cursor
        with self._changed:
            if not self._closed and self.latest_id <= cursor:
                self._changed.wait(wait)
            if self._closed:
                return None
            if self.latest_id <= cursor:
                return []
            newer = []
            for item in reversed(self._feed):
                if item[0] <= cursor:
                    break
                newer.append(item)
            newer.reverse()
            if newer and newer[0][0] == cursor + 1:
                return newer
        return self.store.query(REPLAY_EVENTS, after=cursor) or newer

    def close(self) -> None:
        """Wake every listener: autoheal is closing."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


# ---------------------------------------------------------------------------------------------
# Runtime control: overrides, undo, lapses
# ---------------------------------------------------------------------------------------------

if TYPE_CHECKING:
    Stacks = Dict[Tuple[str, Optional[str]], List[Override]]  # per (setting, alertname), the newest last


class Control:
    """Runtime control: per setting a stack of overrides (the newest in force), the changes undo
    can still take back, their lapse, and what each command of the command language does.

    One interface, two homes for the state: LocalControl keeps it in the state file, with the
    events that changed it (one commit); SharedControl keeps it in etcd, where every replica reads
    it and a change lands by compare-and-swap.  They differ only in _change (how a planned change
    is made to last), _keep_lapse and load; the rest, the planning and its effects, is here.
    """

    shared = False

    def __init__(self, config: Config, journal: Journal, claims: Any, counters: Counters,
                 wake: threading.Condition, clock: Callable[[], float], status: Callable[[], Mapping[str, Any]]):
        self.config = config
        self.actions = config.actions
        self.journal = journal
        self.claims = claims
        self.counters = counters
        # approve ID / deny ID: answered by Approvals (its answer: (event, message), or why not)
        self.answer_approval: Optional[Callable[[str, int, Dict[str, Any]], Any]] = None
        self.wake = wake  # the timers' condition: a change, a new deadline
        self.clock = clock
        self.status = status  # GET /'s answer, for the status command
        self._lock = threading.Lock()  # one change at a time, committed before it is in force
        self._stacks: Stacks = {}
        self._changes: List[Dict[str, Any]] = []
        self._seq = 0  # replicas: the last change id given out (ids are shared, events are not)
        self._settings_until: Optional[float] = None
        self.next_lapse: Optional[float] = None  # the next lapse to record, passed or not
        # Refusals: per (source, client, result) the event repeats fold into within a minute, and
        # per (source, client) when its refused attempts of the last minute were made.
        self._refusals: "collections.OrderedDict[Tuple[str, str, str, str], List[Any]]" = collections.OrderedDict()
        self._attempts: "collections.OrderedDict[Tuple[str, str], List[float]]" = collections.OrderedDict()
        self._build_settings(clock())

    def effective(self) -> Settings:
        """The settings in force now.  Every reader (the webhook, GET /, /metrics) asks here once.

        Built once and kept until something changes them: with 1,000 actions, building the
        cooldowns for every webhook would cost more than judging it.  An override whose duration
        ran out is out of force at once, even before its lapse is recorded.
        """
        until = self._settings_until
        if until is not None and self.clock() >= until:
            if not self._lock.acquire(blocking=False):
                # A change or a lapse is being committed (it may wait on the disk): what is in force
                # now, from the overrides as they are, without waiting and without keeping it.
                return self._compute(self._stacks, self.clock())[0]
            try:
                self._build_settings(self.clock())
            finally:
                self._lock.release()
            with self.wake:  # and the lapse is recorded now, not at the next wake
                self.wake.notify_all()
        return self._settings

    def settings_at(self, when: float) -> Settings:
        """The settings that will be in force at when, from the overrides as they are now (what
        comes after a pause: the badge's "then LIVE")."""
        return self._compute(self._stacks, when)[0]

    @property
    def persistent(self) -> bool:
        """Whether overrides survive a restart."""
        return self.journal.store.persistent

    def run(self, text: str, source: str, by: str, client: str, reason: Optional[str] = None,
            may_change: bool = True,
            attempt_refused: Optional[str] = None) -> Tuple[str, Optional[Dict[str, Any]], str]:
        """Run one control command: (result, the recorded change, a message for people).

        result is applied, refused (not allowed, or nothing to undo), invalid (does not parse) or
        unavailable (etcd does not answer); every refused or invalid command is recorded too,
        with who and from where.  attempt_refused: the door refused the attempt (a wrong token);
        only recorded.
        """
        reason = (reason or "")[:500] or None
        if attempt_refused is not None:
            if self._throttled(source, client):
                self.counters.add("autoheal_control_commands_total", (source, "throttled"))
                return ("throttled", None, f"more than {REFUSALS_PER_MINUTE} refused attempts from {client} within a "
                                           "minute: try again later")
            return self._refusal("refused", attempt_refused, text, source, by, client, reason)
        try:
            command = parse_command(text, self.actions)
        except CommandError as exc:
            return self._refusal("invalid", str(exc), text, source, by, client, reason)
        if not command.changes:
            return "applied", None, CONTROL_HELP if command.verb == "help" else describe_settings(self.status())
        if not may_change:
            return self._refusal("refused", f"{by} may run status and help only (not an admin)",
                                 text, source, by, client, reason)
        fields = {"source": source, "by": by, "client": client, "command": text, "reason": reason}
        if command.verb in ("approve", "deny") and self.answer_approval is not None:
            answered = self.answer_approval(command.verb, command.value, fields)
            if isinstance(answered, str):
                return self._refusal("refused", answered, text, source, by, client, reason)
            self.counters.add("autoheal_control_commands_total", (source, "applied"))
            return ("applied",) + answered
        try:
            done = self._change(command, fields)
        except OutcomeUnknown as exc:  # never "refused": it may be in force
            event = make_event("control", self.clock(), result="unknown", **fields, error=str(exc))
            self.journal.record([event])
            self.counters.add("autoheal_control_commands_total", (source, "unavailable"))
            return "unavailable", event, f"the outcome is unknown: {exc}"
        except CoordinationUnavailable as exc:
            why = f"etcd does not answer, so no replica can change settings now ({exc})"
            return ("unavailable",) + self._refusal("refused", why, text, source, by, client, reason)[1:]
        if isinstance(done, str):
            return self._refusal("refused", done, text, source, by, client, reason)
        event, change = done
        self._change_running_cooldown(command, change, event)
        with self.wake:
            self.wake.notify_all()
        self.counters.add("autoheal_control_commands_total", (source, "applied"))
        return "applied", event, describe_change(event)

    def _change(self, command: Command, fields: Dict[str, Any]) -> Any:
        """Plan a change and make it last: (its event, the change), or why it is refused."""
        raise NotImplementedError

    def _change_running_cooldown(self, command: Command, change: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        """rearm ends a running cooldown; its undo puts it back."""
        try:
            if command.verb == "rearm" and "ended" in change:  # targets
                self.claims.rearm_targets(change["alertname"], change["ended"], change["everything"])
            elif command.verb == "rearm":
                self.claims.rearm(command.alertname or "")
            elif command.verb == "undo" and change["target"]["kind"] == "rearm" and "keys" in change["target"]:
                for key, started, left in change["target"]["keys"]:
                    self.claims.restore(key, started, left)
            elif command.verb == "undo" and change["target"]["kind"] == "rearm":
                self.claims.restore(change["alertname"], change["started"], change.get("left"))
        except CoordinationUnavailable as exc:
            self.journal.log({"event": "error", "message": f"change #{event.get('change_id') or event.get('id')} is "
                              f"recorded, but etcd stopped answering before the running cooldown was changed ({exc})"},
                             "error")

    def _throttled(self, source: str, client: str) -> bool:
        """Whether a client has made REFUSALS_PER_MINUTE refused attempts within the last minute
        (else this attempt counts as one)."""
        now = self.clock()
        with self._lock:
            moments = [moment for moment in self._attempts.pop((source, client), []) if moment > now - 60]
            throttled = len(moments) >= REFUSALS_PER_MINUTE
            if not throttled:
                moments.append(now)
            self._attempts[(source, client)] = moments
            while len(self._attempts) > FOLD_KEYS_MAX:
                self._attempts.popitem(last=False)
        return throttled

    def _refusal(self, result: str, why: str, text: str, source: str, by: str, client: str,
                 reason: Optional[str]) -> Tuple[str, Optional[Dict[str, Any]], str]:
        """Record a refused or invalid command: routine history, and a repeat from the same client
        within a minute folds into the first (count, last_ts), as repeated decisions do."""
        now = self.clock()
        key = (source, client, result, why[:200])  # one kind of refusal from one client folds
        with self._lock:
            entry = self._refusals.get(key)
            if entry is not None and now < entry[1] and "id" in entry[0]:  # recorded: repeats fold into it
                self._refusals.move_to_end(key)
                event = entry[0]
            else:
                event = make_event("control", now, result=result, source=source, by=by, client=client,
                                   command=text[:MAX_COMMAND_CHARS], reason=reason, error=why)
                self._refusals[key] = [event, now + 60]
                while len(self._refusals) > FOLD_KEYS_MAX:
                    self._refusals.popitem(last=False)
                entry = None
        if entry is None:
            self.journal.record([event])
        else:
            self.journal.record([], folds=[(event, now)])
        self.counters.add("autoheal_control_commands_total", (source, result))
        return result, event, why

    def _current(self, setting: str, alertname: Optional[str]) -> Any:
        settings = self._settings
        if setting == "enabled":
            return settings.enabled
        if setting == "dry_run":
            return settings.dry_run
        if setting == "cooldown":
            return settings.cooldowns[alertname]
        return alertname not in settings.disabled

    def _plan_now(self, command: Command) -> Any:
        """(now, the event's fields, the undoable change) of a command planned now, or why it is
        refused (the caller holds _lock)."""
        now = self.clock()
        plan = self._plan(command, now)
        return plan if isinstance(plan, str) else (now, *plan)

    def _plan(self, command: Command, now: float) -> Any:
        """What a change does: (the event's fields, the undoable change), or why it is refused."""
        setting, alertname, value = {
            "enable": ("action_enabled" if command.alertname else "enabled", command.alertname, True),
            "disable": ("action_enabled" if command.alertname else "enabled", command.alertname, False),
            "dry-run": ("dry_run", None, command.value),
            "cooldown": ("cooldown", command.alertname, command.value),
        }.get(command.verb, (None, None, None))
        if setting is not None:
            until = now + command.seconds if command.seconds else None
            new = value if not (setting == "cooldown" and value is None) else self.actions[alertname].cooldown_sec
            return ({"setting": setting, "alertname": alertname, "old": self._current(setting, alertname), "new": new,
                     "until": format_rfc3339(until) if until else None},
                    {"kind": "override", "setting": setting, "alertname": alertname, "value": value, "until": until})
        if command.verb == "rearm" and (command.value or self.actions[command.alertname or ""].per_target):
            return self._plan_rearm_targets(command, now)
        if command.verb == "rearm":
            started = self.claims.started(command.alertname or "")
            left = self.claims.remaining(command.alertname or "", self._settings.cooldowns[command.alertname], now)
            return ({"setting": "cooldown_running", "alertname": command.alertname, "old": math.ceil(left), "new": 0},
                    {"kind": "rearm", "alertname": command.alertname, "started": started, "left": left})
        if command.verb == "reset":
            dropped = sum(len(stack) for stack in self._stacks.values())
            if not dropped:
                return "nothing to reset: no override is in force, the environment is"
            # A reset keeps nothing of what it dropped: the control state stays small, and nothing
            # before it can be undone any more (undo of an earlier change: 409).
            return ({"setting": "all", "old": dropped, "new": 0}, {"kind": "reset"})
        return self._plan_undo(command)

    def _plan_rearm_targets(self, command: Command, now: float) -> Any:
        """rearm NAME of a per-target action (every target in cooldown), or rearm NAME with a label
        set (the targets that match it): the keys to end, and the first REARM_UNDO_MAX of them
        with what they had left, for an undo."""
        name = command.alertname or ""
        cooldown = self._settings.cooldowns[name]
        if self.actions[name].per_target:
            cooling = self.claims.target_keys(name, cooldown, now)
        else:
            left = self.claims.remaining(name, cooldown, now)
            cooling = [(left, self.claims.started(name) or 0.0, name)] if left > 0 else []
        matchers = command.value or ()
        ended = sorted((entry for entry in cooling if matches(matchers, target_of_key(entry[2]))), reverse=True)
        if matchers and not ended:
            return f"no target of {name} in cooldown matches {{{format_matchers(matchers)}}}"
        most = max((left for left, _started, _key in ended), default=0.0)
        return ({"setting": "cooldown_running", "alertname": name, "old": math.ceil(most), "new": 0,
                 "targets": len(ended)},
                {"kind": "rearm", "alertname": name, "started": None, "left": most,
                 "keys": [[key, started, left] for left, started, key in ended[:REARM_UNDO_MAX]],
                 "ended": [key for _left, _started, key in ended], "everything": not matchers})

    def _plan_undo(self, command: Command) -> Any:
        targets = [change for change in self._changes if command.value is None or change["id"] == command.value]
        if not targets:
            return ("nothing to undo: no change is in force" if command.value is None
                    else f"no change #{command.value} is in force to undo")
        target = targets[-1]
        if target["kind"] not in ("override", "rearm"):  # a reset (of an older autoheal) is not undone
            return f"change #{target['id']} cannot be undone"
        alertname = target.get("alertname")
        if alertname is not None and alertname not in self.actions:
            return (f"change #{target['id']} is about {str(alertname)[:80]!r}, which is no longer in the action map: "
                    "there is nothing of it to undo")
        now = self.clock()
        if target["kind"] == "override":
            key = (target["setting"], target["alertname"])
            after = {key: [o for o in self._stacks.get(key, []) if o.id != target["id"]]}
            return ({"setting": target["setting"], "alertname": alertname, "old": self._current(*key),
                     "new": self._value_in(after, *key, now), "undoes": target["id"]},
                    {"kind": "undo", "target": target})
        if "keys" in target:  # targets' cooldowns: the longest of what each gets back
            left = max((cooldown_remaining(started or None, self._settings.cooldowns[alertname], now)
                        if not self.shared else kept or 0.0 for _key, started, kept in target["keys"]), default=0.0)
        else:
            left = (cooldown_remaining(target["started"] or None, self._settings.cooldowns[alertname], now)
                    if not self.shared else target.get("left") or 0.0)
        return ({"setting": "cooldown_running", "alertname": alertname, "old": 0, "new": math.ceil(left),
                 "undoes": target["id"]},
                {"kind": "undo", "target": target, "alertname": alertname, "started": target["started"],
                 "left": target.get("left")})

    def _value_in(self, stacks: Stacks, setting: str, alertname: Optional[str], now: float) -> Any:
        """The value of one setting that stacks put in force (the newest live override of it, else
        the environment's)."""
        live = [o for o in stacks.get((setting, alertname), []) if o.until is None or o.until > now]
        if live and not (setting == "cooldown" and live[-1].value is None):
            return live[-1].value
        if setting == "enabled":
            return self.config.enabled
        if setting == "dry_run":
            return self.config.dry_run
        if setting == "cooldown":
            return self.actions[alertname].cooldown_sec
        return True  # action_enabled

    def _apply(self, change: Dict[str, Any], event_id: int, by: str, now: float) -> Tuple[Stacks, List[Dict[str, Any]]]:
        """The overrides and undoable changes once a planned change is in force (nothing mutated)."""
        stacks = {key: list(stack) for key, stack in self._stacks.items()}
        changes = list(self._changes)
        kind = change["kind"]
        if kind == "override":
            key = (change["setting"], change["alertname"])
            stacks.setdefault(key, []).append(Override(event_id, change["setting"], change["alertname"],
                                                       change["value"], change["until"], by, now))
            changes.append({"id": event_id, "kind": "override", "setting": change["setting"],
                            "alertname": change["alertname"]})
        elif kind == "rearm":
            changes.append({"id": event_id, "kind": "rearm", "alertname": change["alertname"],
                            "started": change["started"], "left": change.get("left"),
                            **({"keys": change["keys"]} if "keys" in change else {})})
        elif kind == "reset":
            stacks, changes = {}, []
        else:  # undo
            target = change["target"]
            changes = [c for c in changes if c["id"] != target["id"]]
            if target["kind"] == "override":
                key = (target["setting"], target["alertname"])
                stacks[key] = [o for o in stacks.get(key, []) if o.id != target["id"]]
        changes = changes[-MAX_UNDOABLE_CHANGES:]
        # An override no change can undo any more is kept only while it is the newest of its stack.
        undoable = {change["id"] for change in changes}
        stacks = {key: [o for o in stack if o.id in undoable or o is stack[-1]] for key, stack in stacks.items()}
        return {key: stack for key, stack in stacks.items() if stack}, changes

    def lapse(self, now: float) -> None:
        """Drop the overrides whose duration ran out, each recorded as a lapse (also at start, for
        those that ran out while autoheal was down)."""
        with self._lock:
            lapsed = [o for stack in self._stacks.values() for o in stack if not self._live(o, now)]
            kept = True
            if lapsed:
                stacks = {key: [o for o in stack if o not in lapsed] for key, stack in self._stacks.items()}
                stacks = {key: stack for key, stack in stacks.items() if stack}
                ids = {o.id for o in lapsed}
                changes = [change for change in self._changes if change["id"] not in ids]
                events = [make_event("control", now, result="lapsed", source="autoheal", by="autoheal",
                                     setting=o.setting, alertname=o.alertname, old=o.value, undoes=o.id,
                                     until=format_rfc3339(o.until)) for o in lapsed]
                kept = self._keep_lapse(events, stacks, changes)
                if kept:
                    self._stacks, self._changes = stacks, changes
            self._build_settings(now)
            if not kept:
                self.next_lapse = now + 1  # not written (etcd silent, or changed first): again in a second

    def _keep_lapse(self, events: List[Dict[str, Any]], stacks: Stacks, changes: List[Dict[str, Any]]) -> bool:
        """Make a lapse last and record it; False when it could not be written (try again)."""
        raise NotImplementedError

    def load(self, now: float) -> None:
        """The overrides and undoable changes kept (state file, or etcd); lapsed ones drop now."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Read the state anew where others may change it (replicas); one process has it all."""

    def close(self) -> None:
        """Stop whatever thread keeps the state current."""

    def _parse(self, raw: str, where: str) -> Tuple[Stacks, List[Dict[str, Any]], int, List[str]]:
        """The overrides, undoable changes, last change id and the latest changes' unique ids of a
        control state's text."""
        stacks: Stacks = {}
        try:
            state = json.loads(raw)
            for entry in state.get("overrides", []):
                override = Override(*entry)
                if override.alertname is None or override.alertname in self.actions:
                    stacks.setdefault((override.setting, override.alertname), []).append(override)
            changes = [change for change in state.get("changes", []) if isinstance(change, dict)]
            uids = [str(uid) for uid in state.get("uids", [])][-CHANGE_UIDS_KEPT:]
            return stacks, changes, int(state.get("seq", 0)), uids
        except (ValueError, TypeError, AttributeError) as exc:
            self.journal.log({"event": "error", "message": f"{where}: runtime overrides unreadable ({exc}); "
                              "the environment is in force"}, "error")
            return {}, [], 0, []

    @staticmethod
    def _text(stacks: Stacks, changes: List[Dict[str, Any]], seq: int = 0, uids: List[str] = ()) -> str:
        """The control state as kept: JSON."""
        state: Dict[str, Any] = {"overrides": [list(o) for stack in stacks.values() for o in stack],
                                 "changes": changes, "seq": seq}
        if uids:
            state["uids"] = list(uids)[-CHANGE_UIDS_KEPT:]
        return json.dumps(state)

    def _build_settings(self, now: float) -> None:
        """The settings in force, kept until the next override lapses (the caller holds _lock)."""
        self._settings, self._settings_until, self.next_lapse = self._compute(self._stacks, now)

    def _compute(self, stacks: Stacks, now: float) -> Tuple[Settings, Optional[float], Optional[float]]:
        """Settings from the configuration and the overrides in force (the newest of each setting
        that has not lapsed), until when they hold, and the next lapse to record."""
        config = self.config
        enabled, dry_run = config.enabled, config.dry_run
        cooldowns = {name: action.cooldown_sec for name, action in self.actions.items()}
        disabled = set()
        active = []
        untils = [o.until for stack in stacks.values() for o in stack if o.until is not None]
        next_lapse = min(untils) if untils and not self.shared else None
        for stack in stacks.values():
            live = [o for o in stack if self._live(o, now)]
            if not live:
                continue
            top = live[-1]
            active.append(top)
            if top.setting == "enabled":
                enabled = top.value
            elif top.setting == "dry_run":
                dry_run = top.value
            elif top.setting == "cooldown" and top.value is not None:
                cooldowns[top.alertname] = top.value
            elif top.setting == "action_enabled" and not top.value:
                disabled.add(top.alertname)
        settings = Settings(enabled, dry_run, cooldowns, config.max_actions_per_hour, frozenset(disabled),
                            tuple(sorted(active, key=lambda o: o.id)), self._fence())
        live_untils = [until for until in untils if until > now]
        return settings, (min(live_untils) if live_untils and not self.shared else None), next_lapse

    def _live(self, override: Override, now: float) -> bool:
        """Whether an override is still in force (one with a duration lapses at its until)."""
        return override.until is None or override.until > now

    def _fence(self) -> Optional[int]:
        """The revision claims are fenced on (replicas), None in one process."""
        return None


class LocalControl(Control):
    """Runtime control of one process: its state is kept in the state file, committed with the
    event that changed it."""

    def _change(self, command: Command, fields: Dict[str, Any]) -> Any:
        with self._lock:
            plan = self._plan_now(command)
            if isinstance(plan, str):
                return plan
            now, planned, change = plan
            event = make_event("control", now, result="applied", **fields, **planned)
            built: List[Any] = []

            def after(event_id: int) -> str:  # the state once this change is in force, under its id
                built.append(self._apply(change, event_id, fields["by"], now))
                return self._text(*built[0])

            cooldowns = ({key: 0.0 for key in change.get("ended", [command.alertname])} if command.verb == "rearm"
                         else None)
            if change["kind"] == "undo" and change["target"]["kind"] == "rearm":
                kept = change["target"].get("keys") or [[change["alertname"], change["started"], None]]
                cooldowns = {key: started for key, started, _left in kept
                             if started and self.claims.started(key) in (None, 0.0)} or None
            self.journal.record([event], cooldowns, control=after)
            self._stacks, self._changes = built[0]
            self._build_settings(now)
        return event, change

    def _keep_lapse(self, events: List[Dict[str, Any]], stacks: Stacks, changes: List[Dict[str, Any]]) -> bool:
        state = self._text(stacks, changes, self._seq)
        self.journal.record(events, control=lambda _first: state)
        return True

    def load(self, now: float) -> None:
        raw = self.journal.store.load_control()
        if raw:
            self._stacks, self._changes, self._seq, _uids = self._parse(raw, "state file")
        self.lapse(now)


class SharedControl(Control):
    """Runtime control shared by every replica through etcd: a change is planned on the state as
    etcd holds it now, and written only if no replica changed it meanwhile (compare-and-swap on
    its revision); it is in force here at once and on every replica by their next poll
    (COORDINATION_POLL_SEC), which also keeps the claims' view of cooldowns and budget current.

    No replica's clock decides when a timed override ends: each has a key on an etcd lease of its
    duration (<prefix>override/<id>), and it is in force while that key exists, on every replica
    alike; the replica whose write removes it from the shared state records its lapse, once.
    Each change carries a unique id kept in the state: a retry after a lost or slow answer finds
    its own change there and does not make it twice, and a change whose outcome etcd never
    confirmed is said to be unknown (never refused), and recorded as applied once a poll sees it.
    """

    shared = True

    def __init__(self, config: Config, journal: Journal, claims: EtcdClaims, counters: Counters,
                 wake: threading.Condition, clock: Callable[[], float], status: Callable[[], Mapping[str, Any]]):
        self.coordination = claims
        self._revision = 0  # the etcd revision of the control state in force
        self._live_ids: FrozenSet[int] = frozenset()  # timed overrides whose key is alive
        self._uids: List[str] = []  # the latest changes' unique ids, as the shared state holds them
        self._unconfirmed: Dict[str, List[Dict[str, Any]]] = {}  # events of writes not yet confirmed, by uid
        self._stop = threading.Event()
        super().__init__(config, journal, claims, counters, wake, clock, status)

    @property
    def persistent(self) -> bool:
        return True

    def _live(self, override: Override, now: float) -> bool:
        return override.until is None or override.id in self._live_ids

    def _fence(self) -> Optional[int]:
        return self._revision

    def refresh(self) -> None:
        """Read the shared state now (a claim found it changed since the settings were read)."""
        self._adopt(*self.coordination.sync(), self.clock())

    def _change(self, command: Command, fields: Dict[str, Any]) -> Any:
        import uuid

        coordination = self.coordination
        uid = uuid.uuid4().hex
        written: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None  # the last change sent
        unknown = False  # whether the last write got no answer (it may have landed)
        for _attempt in range(CONTROL_CAS_ATTEMPTS):
            try:
                self._adopt(*coordination.sync(), self.clock())
            except CoordinationUnavailable:
                if unknown:  # it may have landed: never say refused
                    raise OutcomeUnknown("etcd did not confirm whether the change was made; GET / shows what is "
                                         "in force, and the history records it as applied if a replica finds it")
                raise
            if written is not None and uid in self._uids:  # an earlier try's write had landed (its answer lost):
                return written  # _adopt found it there and recorded it, once
            with self._lock:
                plan = self._plan_now(command)
                if isinstance(plan, str):
                    self._unconfirmed.pop(uid, None)
                    return plan
                now, planned, change = plan
                change_id = self._seq + 1
                stacks, changes = self._apply(change, change_id, fields["by"], now)
                event = make_event("control", now, result="applied", **fields, change_id=change_id, **planned)
                timed = {change_id: command.seconds} if change["kind"] == "override" and command.seconds else None
                # Sent: whatever its answer, the next try reads back whether it landed (the client
                # may have sent it again to another member, whose compare-and-swap then failed).
                written = (event, change)
                self._unconfirm(uid, [event])
                try:
                    revision = coordination.put_control(self._text(stacks, changes, change_id, self._uids + [uid]),
                                                        self._revision, timed=timed)
                except CoordinationUnavailable:
                    unknown = True
                    continue
                unknown = False
                if not revision:
                    continue  # another replica changed them first: plan again on what it wrote
                self._stacks, self._changes, self._seq, self._revision = stacks, changes, change_id, revision
                self._uids = (self._uids + [uid])[-CHANGE_UIDS_KEPT:]
                self._live_ids |= frozenset(timed or ())  # its key is alive: it is in force here at once
                self._build_settings(now)
                mine = self._unconfirmed.pop(uid, None)  # None: a poll found it first, and recorded it
            if mine is not None:
                self.journal.record(mine)
            return event, change
        if unknown:  # never confirmed either way
            raise OutcomeUnknown("etcd did not confirm whether the change was made; GET / shows what is in "
                                 "force, and the history records it as applied if a replica finds it")
        with self._lock:
            self._unconfirmed.pop(uid, None)
        return f"the shared settings changed {CONTROL_CAS_ATTEMPTS} times while this change was planned; try again"

    def _keep_lapse(self, events: List[Dict[str, Any]], stacks: Stacks, changes: List[Dict[str, Any]]) -> bool:
        # The replica whose write lands records the lapse; the others adopt it.  A write whose answer
        # is lost is recorded when a poll finds its unique id in the shared state.
        import uuid

        uid = uuid.uuid4().hex
        self._unconfirm(uid, events)
        try:
            revision = self.coordination.put_control(self._text(stacks, changes, self._seq, self._uids + [uid]),
                                                     self._revision)
        except CoordinationUnavailable:
            return False
        self._unconfirmed.pop(uid, None)
        if revision:
            self.journal.record(events)
            self._revision = revision
            self._uids = (self._uids + [uid])[-CHANGE_UIDS_KEPT:]
        return bool(revision)

    def _unconfirm(self, uid: str, events: List[Dict[str, Any]]) -> None:
        """Keep the events of a write about to be sent, until its outcome is known (the newest
        CHANGE_UIDS_KEPT: an older one never found did not land)."""
        self._unconfirmed[uid] = events
        while len(self._unconfirmed) > CHANGE_UIDS_KEPT:
            self._unconfirmed.pop(next(iter(self._unconfirmed)))

    def load(self, now: float) -> None:
        try:
            self._adopt(*self.coordination.sync(), now)
        except CoordinationUnavailable as exc:
            self.journal.log({"event": "error", "message": f"etcd does not answer ({exc}); until it does, no action "
                              "runs and the environment's settings are shown"}, "error")
        with self._lock:
            self._build_settings(now)
        threading.Thread(target=self._poll, name="coordination", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _adopt(self, raw: Optional[str], revision: int, live: FrozenSet[int], now: float) -> None:
        """Take the shared control state that etcd holds (another replica's change), and the timed
        overrides still alive; lapse those whose key went."""
        with self._lock:
            lapsing = any(o.until is not None and o.id not in live for stack in self._stacks.values() for o in stack)
            if revision == self._revision and live == self._live_ids and not lapsing:
                return
            if revision != self._revision:
                self._stacks, self._changes, self._seq, self._uids = (self._parse(raw, "etcd") if raw
                                                                      else ({}, [], 0, []))
                self._revision = revision
            self._live_ids = live
            self._build_settings(now)
            # A change or lapse whose answer was lost: in force after all, recorded once.
            confirmed = [self._unconfirmed.pop(uid) for uid in list(self._unconfirmed) if uid in self._uids]
        for events in confirmed:
            if events:
                self.journal.record(events)
        if any(o.until is not None and o.id not in live for stack in self._stacks.values() for o in stack):
            self.lapse(now)
        with self.wake:
            self.wake.notify_all()

    def _poll(self) -> None:
        """Poll etcd for the shared control state, the timed overrides alive, the cooldowns and the
        budget in use; log when etcd stops answering and when it answers again."""
        coordination = self.coordination
        reported: Optional[bool] = coordination.up or None
        while not self._stop.wait(COORDINATION_POLL_SEC):
            try:
                state = coordination.sync()
            except CoordinationUnavailable as exc:
                if reported is not False:
                    self.journal.log({"event": "error", "message": f"etcd does not answer ({exc}): no action runs "
                                      "until it does (coordination_unavailable)"}, "error")
                    reported = False
                continue
            except Exception as exc:  # the poll must outlive a malformed answer
                self.journal.log({"event": "error", "message": f"coordination: {type(exc).__name__}: {exc}"}, "error")
                continue
            if reported is False:
                self.journal.log({"event": "coordination",
                                  "message": "etcd answers again: actions are judged normally"})
            reported = True
            try:
                self._adopt(*state, self.clock())
            except Exception as exc:  # a lapse that failed to record: the next poll tries again
                self.journal.log({"event": "error", "message": f"coordination: {type(exc).__name__}: {exc}"}, "error")


# ---------------------------------------------------------------------------------------------
# Did it heal? Verdicts on runs, and escalation
# ---------------------------------------------------------------------------------------------


def _ended(alert: Mapping[str, Any], now: float) -> bool:
    """Whether Alertmanager says an alert it still lists has ended (resolved, kept for a while)."""
    try:
        ends = parse_rfc3339(alert.get("endsAt") or "")
    except ValueError:
        return False
    return 0 < ends <= now


class HealTracker:
    """Follows each run that executed, by its history id, until its alert resolves or
    AUTOHEAL_HEAL_GRACE_SEC runs out: one verdict per run (healed, not_healed, acknowledged,
    unknown).  A resolution counts for a run only with the same alertname and fingerprint and an
    endsAt after the run started.  A dry-run decision is followed too, once per alert at a time
    (its verdict is about the alert's episode, however often a zero cooldown repeats it).  The
    pending verdicts are kept in the state file, so a restart does not forget them; they are
    indexed by alert and by deadline, so following many costs no more per webhook than one."""

    def __init__(self, config: Config, journal: Journal, counters: Counters, wake: threading.Condition,
                 kept: Mapping[str, str], on_verdict: Callable[[str, Optional[int], str], None],
                 alertmanager: AlertmanagerClient):
        self.grace = config.heal_grace_sec
        self.alertmanager = alertmanager
        self.on_verdict = on_verdict  # the latest run's verdict (Runs.verdict)
        self.after_verdict: Callable[[Mapping[str, Any], str], None] = lambda pending, result: None  # App.escalate
        self.journal = journal
        self.counters = counters
        self.wake = wake
        self._lock = threading.Lock()
        self._pending: Dict[str, Dict[str, Any]] = {}  # by the run's history id (as text)
        self._by_alert: Dict[Tuple[str, str], List[str]] = {}  # (alertname, fingerprint): keys
        self._deadlines: List[Tuple[float, str]] = []  # a heap; keys no longer pending are skipped
        self._dirty = False  # something was added since the last compact()
        # Dry-run decisions followed at once, at most one per action (and 100 at least): a zero
        # cooldown repeats them at every delivery, and a storm of distinct alerts must not make
        # thousands of pending verdicts.  Past it a dry-run decision gets no verdict.
        self._dry_runs = 0
        self.max_dry_runs = max(100, len(config.actions))
        for key, body in kept.items():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                self._add(dict(json.loads(body), key=key))

    def _add(self, pending: Dict[str, Any]) -> None:
        import heapq

        self._pending[pending["key"]] = pending
        self._dry_runs += bool(pending.get("dry_run"))
        self._dirty = True
        self._by_alert.setdefault((pending["alertname"], pending["fingerprint"]), []).append(pending["key"])
        heapq.heappush(self._deadlines, (pending["deadline"], pending["key"]))

    def _remove(self, pending: Mapping[str, Any]) -> None:
        if self._pending.pop(pending["key"], None) is not None:
            self._dry_runs -= bool(pending.get("dry_run"))
        alert = (pending["alertname"], pending["fingerprint"])
        keys = [key for key in self._by_alert.get(alert, []) if key != pending["key"]]
        if keys:
            self._by_alert[alert] = keys
        else:
            self._by_alert.pop(alert, None)

    def compact(self) -> None:
        """Copy what is pending, when requests pause: made amid a load's temporary objects, it
        would keep their memory from going back to the system (as EventFeed.compact says)."""
        with self._lock:
            if not self._dirty:
                return
            # One decoding for them all: their keys ("alertname", "deadline", ...) are shared, not
            # made again for each (7 strings a pending verdict, 0.4 MiB for 1,000 of them).
            pending = json.loads(json.dumps(list(self._pending.values())))
            self._pending, self._by_alert, self._deadlines, self._dry_runs = {}, {}, [], 0
            for one in pending:
                self._add(one)
            self._dirty = False

    def follows(self, run_id: int) -> bool:
        """Whether run_id's verdict is still pending."""
        with self._lock:
            return str(run_id) in self._pending

    @property
    def following(self) -> bool:
        """Whether any verdict is pending (a webhook's resolutions need looking at)."""
        return bool(self._pending)

    def follow(self, runs: List[Tuple[Dict[str, Any], Decision]], now: float) -> Dict[str, Optional[str]]:
        """Start following the runs that executed, and the dry-run decisions (a verdict of their
        own: would healing have been needed?); what to keep in the state file."""
        followed: Dict[str, Optional[str]] = {}
        with self._lock:
            if self._dry_runs >= self.max_dry_runs:  # as many dry runs followed as may be: a storm's are not looked at
                runs = [(alert, decision) for alert, decision in runs if decision.result == "executed"]
            for alert, decision in runs:
                fingerprint = alert.get("fingerprint") or ""
                if decision.result not in ("executed", "dry_run") or not fingerprint:
                    continue
                dry_run = decision.result == "dry_run"
                if dry_run and (self._dry_runs >= self.max_dry_runs or any(
                        self._pending[key].get("dry_run")
                        for key in self._by_alert.get((decision.alertname, fingerprint), ()))):
                    continue  # this alert's dry run is followed already, or as many as are followed at once
                run_id = (decision.event or {}).get("id")
                key = str(run_id) if run_id is not None else fingerprint
                pending = {"alertname": decision.alertname, "fingerprint": fingerprint, "action_ts": now,
                           "deadline": now + self.grace, "run_id": run_id}
                if dry_run:
                    pending["dry_run"] = True
                else:  # what a further step needs (escalation): the alert as it came, and which step ran
                    pending.update(step=decision.step, labels=alert.get("labels"),
                                   annotations=alert.get("annotations") or {}, starts_at=alert.get("startsAt", ""))
                followed[key] = json.dumps(pending)
                self._add(dict(pending, key=key))
        if followed:
            with self.wake:  # the timer wakes for the new deadline
                self.wake.notify_all()
        return followed

    def resolve(self, alerts: List[Dict[str, Any]], now: float) -> None:
        """Resolutions of followed alerts are their verdict: healed, with the seconds from the
        action to endsAt (when Alertmanager says it ended)."""
        verdicts = []
        with self._lock:
            for alert in alerts:
                if alert["status"] != "resolved":
                    continue
                keys = self._by_alert.get((alert["labels"].get("alertname"), alert.get("fingerprint") or ""))
                if not keys:
                    continue
                try:
                    ended = parse_rfc3339(alert.get("endsAt") or "")
                except ValueError:
                    ended = now
                if ended <= 0:  # 0001-01-01: Alertmanager did not say
                    ended = now
                for pending in [self._pending[key] for key in keys]:
                    if not pending["action_ts"] < ended <= pending["deadline"]:
                        continue  # ended before this run (an older episode), or too late: the timer's verdict
                    self._remove(pending)
                    verdicts.append((pending, "healed", ended - pending["action_ts"]))
        self._record(verdicts, now)

    def overdue(self, now: float) -> None:
        """Alerts whose resolution did not reach autoheal within the grace: Alertmanager is asked
        about each (a silence also mutes the resolution's webhook): gone or ended, healed; active
        and silenced, acknowledged (a person took over); active, not_healed; no answer, unknown."""
        import heapq

        overdue = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _deadline, key = heapq.heappop(self._deadlines)
                pending = self._pending.get(key)
                if pending is not None and pending["deadline"] <= now:
                    self._remove(pending)
                    overdue.append(pending)
        verdicts = []
        for alertname in sorted({pending["alertname"] for pending in overdue}):
            try:
                held = {alert.get("fingerprint"): alert for alert in self.alertmanager.alerts(alertname)}
                error = None
            except PeerError as exc:
                held, error = {}, str(exc)
            for pending in (p for p in overdue if p["alertname"] == alertname):
                alert = held.get(pending["fingerprint"])
                if error is not None:
                    why = f"Alertmanager did not answer: {error}"[:300]
                    verdicts.append((dict(pending, reason=why), "unknown", None))
                    continue
                ended = alert is None or _ended(alert, now)
                silenced = alert is not None and bool((alert.get("status") or {}).get("silencedBy"))
                result = "healed" if ended else ("acknowledged" if silenced else "not_healed")
                verdicts.append((dict(pending, observed="alertmanager"), result, None))
        self._record(verdicts, now)

    def next_deadline(self) -> Optional[float]:
        import heapq

        with self._lock:
            while self._deadlines and self._deadlines[0][1] not in self._pending:
                heapq.heappop(self._deadlines)
            return self._deadlines[0][0] if self._deadlines else None

    def _record(self, verdicts: List[Tuple[Dict[str, Any], str, Optional[float]]], now: float) -> None:
        if not verdicts:
            return
        events = []
        counts: Dict[Tuple[str, Tuple[Any, ...]], float] = collections.Counter()
        for pending, result, seconds in verdicts:
            name = pending["alertname"]
            dry_run = bool(pending.get("dry_run"))
            shown = DRY_RUN_VERDICTS[result] if dry_run else result
            events.append(make_event("heal", now, alertname=name, result=shown,
                                     dry_run=dry_run or None, step=pending.get("step") if pending.get("step", 1) > 1
                                     else None, fingerprint=pending["fingerprint"],
                                     run_id=pending.get("run_id"), observed=pending.get("observed"),
                                     reason=pending.get("reason"),
                                     seconds=round(seconds, 3) if seconds is not None else None,
                                     action_at=format_rfc3339(pending["action_ts"]),
                                     grace_seconds=round(pending["deadline"] - pending["action_ts"], 3)))
            if dry_run:  # what healing would have addressed: never counted as a heal
                continue
            counts[("autoheal_heals_total", (name, result))] += 1
            if seconds is not None:
                counts[("autoheal_heal_duration_seconds_sum", (name,))] += seconds
                counts[("autoheal_heal_duration_seconds_count", (name,))] += 1
        self.journal.record(events, heals={pending["key"]: None for pending, _result, _seconds in verdicts})
        self.counters.add_all(counts)
        for pending, result, _seconds in verdicts:
            if not pending.get("dry_run"):
                self.on_verdict(pending["alertname"], pending.get("run_id"), result)
                self.after_verdict(pending, result)


class Runs:
    """The latest run of each action, and its verdict: what GET / ("runs") and the page's
    "latest run: verdict" column show, never an older run's verdict.  With replicas it is shared
    through etcd (<prefix>run/<alertname>), so every replica's page tells the same story."""

    def __init__(self, replica: str, shared: Optional["EtcdClaims"]):
        self.replica = replica
        self.shared = shared
        self._lock = threading.Lock()
        self._latest: Dict[str, Dict[str, Any]] = {}

    def load(self, store: "Store", following: Callable[[int], bool]) -> None:
        """The latest runs as the history tells them (one process, at start)."""
        runs: Dict[str, Dict[str, Any]] = {}
        for run in reversed(store.summaries(HISTORY_LIMIT_MAX, kind="run")):  # oldest first: the newest wins
            runs[run["alertname"]] = {"id": run["id"], "at": format_rfc3339(run["ts"]),
                                      "target": {"alertname": run["alertname"]}, "replica": self.replica,
                                      "result": "started", "verdict": None}
        for event in reversed(store.summaries(HISTORY_LIMIT_MAX, kind="decision")):
            run = runs.get(event["alertname"])
            if run is not None and event["id"] > run["id"] and run["result"] == "started" and (
                    event["result"] in ("executed", "failed", "error")):
                run["result"] = event["result"]
                run["verdict"] = "pending" if event["result"] == "executed" else None
        for event in reversed(store.summaries(HISTORY_LIMIT_MAX, kind="heal")):
            run = runs.get(event["alertname"])
            if run is not None and event["id"] > run["id"] and event["result"] in HEAL_RESULTS:
                run["verdict"] = event["result"]
        for run in runs.values():
            if run["verdict"] == "pending" and not following(run["id"]):
                run["verdict"] = "unknown"
        with self._lock:
            self._latest = runs

    def ended(self, alertname: str, run_id: Optional[int], at: float, result: str,
              target: Optional[Mapping[str, str]] = None) -> None:
        record = {"id": run_id, "at": format_rfc3339(at), "target": dict(target or {"alertname": alertname}),
                  "replica": self.replica, "result": result, "verdict": "pending" if result == "executed" else None}
        with self._lock:
            self._latest[alertname] = record
        self._share(alertname, record, new=True)

    def verdict(self, alertname: str, run_id: Optional[int], verdict: str) -> None:
        with self._lock:
            record = self._latest.get(alertname)
            if record is None or record["id"] != run_id or record["replica"] != self.replica:
                return  # a newer run's is shown now
            record = self._latest[alertname] = dict(record, verdict=verdict)
        self._share(alertname, record, new=False)

    def _share(self, alertname: str, record: Mapping[str, Any], new: bool) -> None:
        if self.shared is not None:  # written with the next poll of the shared state (RunRecords.share)
            self.shared.run_records.put(alertname, record, new)

    def latest(self) -> Dict[str, Dict[str, Any]]:
        """The latest run of each action that ran (shared: as etcd holds it, else this replica's)."""
        with self._lock:
            runs = dict(self._latest)
        if self.shared is not None:
            runs.update(self.shared.run_records.latest())
        return runs


class Escalation:
    """What happens when a run does not heal (issue 30): the next step of the action's escalate
    list, or, after give_up_after not_healed verdicts in a row, the action switched off by autoheal
    itself.  It runs the steps through the app's own path (gates, claims, runs, records)."""

    def __init__(self, app: "App"):
        self.app = app
        self._lock = threading.Lock()
        self._not_healed: Dict[str, int] = {}  # not_healed verdicts in a row, per action

    def escalate(self, pending: Mapping[str, Any], verdict: str) -> None:
        """After a run's verdict: give_up_after not_healed in a row switch the action off (an
        override by autoheal, undone like any other); else a not_healed runs the next step of the
        action's escalate list, on a thread of its own (never the timers')."""
        name = pending["alertname"]
        action = self.app.actions.get(name)
        if action is None or verdict not in ("healed", "not_healed"):
            return  # acknowledged (a person took over) and unknown change nothing
        with self._lock:
            streak = self._not_healed[name] = self._not_healed.get(name, 0) + 1 if verdict == "not_healed" else 0
        if verdict != "not_healed":
            return
        if action.give_up_after and streak >= action.give_up_after:
            with self._lock:
                self._not_healed[name] = 0
            reason = f"gave up: {streak} runs in a row did not heal {name} (give_up_after {action.give_up_after})"
            result, _event, _message = self.app.control.run(f"disable {name}", "autoheal", "autoheal", "autoheal",
                                                        reason=reason)
            if result == "applied":
                self.app.counters.add("autoheal_gave_up_total", (name,))
            return
        step = int(pending.get("step") or 1) + 1
        if step - 2 < len(action.escalate) and pending.get("labels"):
            threading.Thread(target=self._run_step, args=(pending, action.escalate[step - 2], step),
                             name="escalate", daemon=True).start()

    def _run_step(self, pending: Mapping[str, Any], step_action: Action, step: int,
                  approved_by: Optional[str] = None, slot: Optional[str] = None) -> None:
        """Run one escalation step for the alert of a run that did not heal: the gates apply again
        (master switch, dry-run, a runtime disable, the budget: a slot taken by a claim of the step's
        own, with no cooldown, fenced like any claim), then the command, its own verdict followed."""
        app = self.app
        try:
            alert = {"status": "firing", "labels": dict(pending["labels"]), "annotations": dict(pending["annotations"]),
                     "startsAt": pending.get("starts_at", ""), "fingerprint": pending["fingerprint"]}
            decision = self._judge_step(alert, step_action, step, slot or f"step{step}")
            decision.approved_by = approved_by
            now = app.clock()
            app.count([decision], received=False)  # a run is counted once it ends (App._run_one)
            runs = [(alert, decision)] if decision.result == "run" else []
            if runs:
                decision.event = decision.event_of("run", alert, now)
                app.journal.record([decision.event])
                app.run_all(runs)
            app.journal.record([decision.event_of("decision", alert, app.clock())],
                               heals=app.heals.follow(runs, now) if runs else None)
            if runs:
                app.runs.ended(decision.alertname, decision.event.get("id"), now, decision.result, decision.target)
        except Exception as exc:  # a step that fails to start is said, and the rest goes on
            app.log({"event": "error", "message": f"{slot or f'escalation step {step}'} of {pending.get('alertname')}: "
                     f"{type(exc).__name__}: {exc}"}, "error")

    def _judge_step(self, alert: Dict[str, Any], step_action: Action, step: int, slot: str) -> Decision:
        """A step's decision, judged on the settings in force (read again when its fence finds them
        stale, as for a webhook); its budget slot claimed."""
        app = self.app
        for attempt in range(3):
            settings = app.effective()
            decision = judge(alert, settings, app.actions)
            decision.step = step
            if decision.result != "pending":
                return decision
            filled = fill_action(step_action, alert["labels"]) if step_action.templated else step_action
            if isinstance(filled, dict):
                decision.result, decision.reason, decision.detail, decision.action = ("skipped", "target_refused",
                                                                                      filled, None)
                return decision
            decision.action = filled
            try:
                [claim] = app.claims.claim_all([(f"{decision.alertname}#{slot}", 0.0)],
                                               settings.max_actions_per_hour, app.clock(), None, settings.revision)
            except StaleSettings:
                if attempt < 2:
                    with contextlib.suppress(CoordinationUnavailable):
                        app.control.refresh()
                    continue
                claim = None
            except CoordinationUnavailable:
                claim = None
            if claim is None:
                decision.result, decision.reason = "error", "coordination_unavailable"
            else:
                decision.settle(claim, settings)
            return decision
        return decision


# ---------------------------------------------------------------------------------------------
# Acknowledgements: silences in Alertmanager
# ---------------------------------------------------------------------------------------------


class _AckCall:
    """An acknowledgement talking to Alertmanager; taps on the same link wait for it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Optional[str] = None


def autoheals_silence(silence: Mapping[str, Any]) -> bool:
    """Whether autoheal made a silence: through an /ack link (createdBy "autoheal"), or a Slack
    button (createdBy the person, the comment "ACK! by <@USERID>")."""
    return silence.get("createdBy") == CREATED_BY or str(silence.get("comment") or "").startswith("ACK! by <@")


class Acknowledgements:
    """/ack and its undo: exact silences in Alertmanager, created (or reused, or extended) and
    expired, each recorded and counted."""

    def __init__(self, config: Config, alertmanager: AlertmanagerClient, journal: Journal, counters: Counters,
                 clock: Callable[[], float]):
        self.timeout = config.alertmanager_timeout_sec
        self.alertmanager = alertmanager
        self.journal = journal
        self.counters = counters
        self.clock = clock
        self._lock = threading.Lock()
        self._inflight: Dict[Any, _AckCall] = {}

    def acknowledge(self, labels: Dict[str, str], seconds: float, text: str, client: str, user_agent: str,
                    preview: bool, created_by: str = CREATED_BY) -> Dict[str, Any]:
        """Create (or reuse, or extend) the exact silence of labels for seconds; PeerError when
        Alertmanager refuses or does not answer.  A preview creates nothing."""
        matchers = matchers_for(labels)
        if preview:
            self.counters.add("autoheal_acks_total", ("previewed",))
            return {"ok": True, "preview": True, "silence_id": None, "matchers": matchers,
                    "duration": format_duration(seconds),
                    "message": "a preview creates nothing; open the link to acknowledge"}
        try:
            outcome, silence_id, ends_at = self._one_at_a_time(matchers, seconds, text, created_by)
        except PeerError as exc:
            self.counters.add("autoheal_acks_total", ("error",))
            self.journal.record([make_event("ack", self.clock(), result="error", reason=str(exc),
                                            alertname=labels["alertname"], labels=labels, client=client,
                                            user_agent=user_agent)])
            raise
        self.counters.add("autoheal_acks_total", (outcome,))
        self.journal.record([make_event("ack", self.clock(), result=outcome, alertname=labels["alertname"],
                                        labels=labels, silence_id=silence_id, ends_at=format_rfc3339(ends_at),
                                        duration=format_duration(seconds), comment=text, created_by=created_by,
                                        client=client, user_agent=user_agent)])
        return {"ok": True, "silence_id": silence_id, "ends_at": format_rfc3339(ends_at), "matchers": matchers,
                "outcome": outcome, "labels": labels}

    def _one_at_a_time(self, matchers: List[Dict[str, Any]], seconds: float, text: str,
                       created_by: str) -> Tuple[str, str, float]:
        """One click at a time per label set (a double tap must not stack two silences); the wait
        is on an Event, so no lock is held while Alertmanager answers.  A tap behind one that
        failed fails with it: taps never queue one timeout after another."""
        key = matcher_key(matchers)
        mine = _AckCall()
        while True:
            with self._lock:
                other = self._inflight.get(key)
                if other is None:
                    self._inflight[key] = mine
                    break
            other.done.wait(self.timeout * 4)
            if other.error is not None:
                raise PeerError(other.error)
        try:
            return self._silence(matchers, key, seconds, text, created_by)
        except PeerError as exc:
            mine.error = str(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            mine.done.set()

    def _silence(self, matchers: List[Dict[str, Any]], key: Any, seconds: float, text: str,
                 created_by: str) -> Tuple[str, str, float]:
        now = self.clock()
        ends_at = now + seconds
        existing = []
        alertname = next(value for name, value, _regex, _equal in key if name == "alertname")
        for silence in self.alertmanager.silences(alertname):
            if (autoheals_silence(silence) and (silence.get("status") or {}).get("state") == "active"
                    and matcher_key(silence.get("matchers") or []) == key):
                try:
                    existing.append((parse_rfc3339(silence.get("endsAt", "")), silence))
                except ValueError:
                    continue
        if existing:
            current_end, current = max(existing, key=lambda pair: pair[0])
            if ends_at <= current_end + 1:
                return "existing", current["id"], current_end
            # Keeping startsAt lets Alertmanager update the active silence in place; when it
            # cannot, it expires the old one and answers with a new id, which is the one we report.
            silence_id = self.alertmanager.post_silence({
                "id": current["id"], "matchers": matchers, "startsAt": current["startsAt"],
                "endsAt": format_rfc3339(ends_at), "createdBy": created_by, "comment": text,
            })
            return "extended", silence_id, ends_at
        silence_id = self.alertmanager.post_silence({
            "matchers": matchers, "startsAt": format_rfc3339(now), "endsAt": format_rfc3339(ends_at),
            "createdBy": created_by, "comment": text,
        })
        return "created", silence_id, ends_at

    def silence_of_event(self, event_id: int) -> str:
        """The silence id of an acknowledgement recorded in the history, by the event's id."""
        event = self.journal.store.get(event_id)
        if not event or event.get("kind") != "ack" or not event.get("silence_id"):
            raise Unknown(f"id: no acknowledgement with id {event_id} in the history")
        return event["silence_id"]

    def undo(self, silence_id: str, client: str, user_agent: str) -> Dict[str, Any]:
        """Expire a silence, but only one that autoheal created (Forbidden otherwise)."""
        try:
            silence = self.alertmanager.get_silence(silence_id)
        except PeerError as exc:
            if exc.status in (404, 500):  # Alertmanager answers an unknown id with 404 or 500
                raise Unknown(f"silence_id: Alertmanager has no silence {silence_id}") from None
            raise
        if not isinstance(silence, dict) or silence.get("createdBy") != CREATED_BY:
            raise Forbidden(f"silence {silence_id} was not created by autoheal; autoheal expires only its own")
        state = (silence.get("status") or {}).get("state")
        if state != "expired":
            self.alertmanager.expire(silence_id)
            self.counters.add("autoheal_silences_expired_total")
        labels = {m.get("name", ""): m.get("value", "") for m in silence.get("matchers") or []}
        self.journal.record([make_event("unack", self.clock(),
                                        result="expired" if state != "expired" else "already_expired",
                                        alertname=labels.get("alertname"), labels=labels, silence_id=silence_id,
                                        client=client, user_agent=user_agent)])
        return {"ok": True, "silence_id": silence_id, "expired": True, "labels": labels,
                "was_already_expired": state == "expired"}


# ---------------------------------------------------------------------------------------------
# Telling people: notifications to Slack and webhooks, and Slack's buttons
# ---------------------------------------------------------------------------------------------

# What is told, by event kind: the results of each kind that make a message (a dry run never does).
NOTIFY_RESULTS: Dict[str, Tuple[str, ...]] = {
    "decision": ("executed", "failed", "error"),  # runs (escalation steps among them)
    "heal": ("healed", "not_healed", "acknowledged", "unknown"),  # verdicts
    "control": ("applied",),  # runtime changes, giving up among them
    "approval": ("opened",) + APPROVAL_RESULTS,  # approvals asked, and answered
}
NOTIFY_RETRY_SEC = 86400.0  # a message the receiver keeps refusing is dropped after this
NOTIFY_BACKOFF_MAX_SEC = 300.0
NOTIFY_KEY = "notify/"  # kept records (Store.record's heals) holding each channel's cursor
ACK_BUTTONS = (("Ack 30m", "30m"), ("Ack 2h", "2h"), ("Ack 24h", "24h"))


def notifiable(event: Mapping[str, Any], only: Optional[FrozenSet[str]]) -> bool:
    """Whether an event makes a message (AUTOHEAL_NOTIFY_ON: its kind, "run", or its result named)."""
    kind, result = event.get("kind"), event.get("result")
    if result not in NOTIFY_RESULTS.get(kind, ()) or event.get("dry_run"):  # type: ignore[arg-type]
        return False
    return only is None or kind in only or result in only or (kind == "decision" and "run" in only)


def _where(event: Mapping[str, Any]) -> str:
    """The target in a few words: its labels but the alertname (the alert's, when no target)."""
    labels = event.get("target") or event.get("labels") or {}
    shown = [f"{name}={value}" for name, value in sorted(labels.items()) if name != "alertname"][:4]
    return f" ({', '.join(shown)})" if shown else ""


def _did(action: str) -> str:
    """What a command did, in words: "Restarted crm-api", or "Ran `true`"."""
    words = action.split()
    if words[:2] == ["docker", "restart"]:
        return "Restarted " + " ".join(words[2:])
    if words[:3] == ["docker", "compose", "restart"]:
        return "Restarted the services " + " ".join(words[3:])
    return f"Ran `{action}`"


def notification_text(event: Mapping[str, Any]) -> str:
    """The one line a person reads at a glance, e.g. "Restarted crm-api for TcpEndpointDownFast
    (instance=web-1:80): exit 0 in 1.2 s"."""
    kind, result, name = event.get("kind"), event.get("result"), event.get("alertname") or ""
    action, where = str(event.get("action") or ""), _where(event)
    step = f"Escalation step {event['step']}: " if (event.get("step") or 1) > 1 else ""
    if kind == "decision":
        took = f" in {float(event.get('duration_seconds') or 0):.1f} s"
        if result == "executed":
            return f"{step}{_did(action)} for {name}{where}: exit 0{took}"
        if result == "failed":
            return f"{step}`{action}` failed for {name}{where}: exit {event.get('exit_status')}{took}"
        return f"{step}Could not run `{action}` for {name}{where}: {event.get('error') or event.get('reason')}"
    if kind == "heal":
        if result == "healed":
            after = f" {float(event['seconds']):.0f} s after its run" if event.get("seconds") is not None else ""
            return f"{step}{name}{where} healed{after}"
        if result == "not_healed":
            return f"{step}{name}{where} did not heal within {float(event.get('grace_seconds') or 0):.0f} s of its run"
        if result == "acknowledged":
            return f"{step}{name}{where} was acknowledged (silenced) before it healed: a person took over"
        return f"{step}Whether {name}{where} healed is unknown: {event.get('reason') or 'no answer'}"
    if kind == "approval":
        if result == "opened":
            return (f"Approval needed: `{action}` for {name}{where}: `approve {event.get('id')}` or "
                    f"`deny {event.get('id')}` before {event.get('expires_at')}")
        if result == "expired":
            return f"Nobody answered approval #{event.get('approval_id')} (`{action}` for {name}{where}): nothing ran"
        return f"{event.get('by')} {result} `{action}` for {name}{where} (approval #{event.get('approval_id')})"
    if event.get("by") == "autoheal":
        return f"autoheal {event.get('reason') or 'changed itself'}: `{event.get('command')}`"
    return f"{event.get('by')} changed autoheal: `{event.get('command')}`"


def _slack_escape(text: str) -> str:
    """Slack's mrkdwn escapes: &, < and > only."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sign_value(secret: str, value: str) -> str:
    """A button's value that only autoheal can make: value.<HMAC>; Slack sends it back on a click."""
    import hashlib
    import hmac

    return value + "." + hmac.new(secret.encode("utf-8"), b"button:" + value.encode("utf-8"),
                                  hashlib.sha256).hexdigest()[:40]


def verify_value(secret: str, signed: str) -> Optional[str]:
    """The value a button carried, if autoheal signed it (None: forged or changed)."""
    import hmac

    value, _, _mac = signed.rpartition(".")
    return value if value and hmac.compare_digest(sign_value(secret, value), signed) else None


def slack_message(event: Mapping[str, Any], text: str, config: Config) -> Dict[str, Any]:
    """A Slack message in Block Kit: the line, the target's labels, a link to the page, and for a
    run, buttons (Ack 30m, 2h, 24h for anyone; Pause NAME 1h for admins) whose values are signed."""
    blocks: List[Dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(text)[:3000]}}]
    labels = event.get("labels") or event.get("target") or {}
    if labels:
        shown = ", ".join(f"{name}={value}" for name, value in sorted(labels.items()))
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(shown)[:2000]}]})
    page = config.public_url.rstrip("/") + "/"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{page}|autoheal> · event "
                                                                             f"#{event.get('id', '?')}"}]})
    secret = config.slack_signing_secret
    # A button's value holds what it acts on, signed: the alert's labels (whole: never a label set
    # the history had to cut, which would silence more than the alert), the action, the approval.
    labels_json = json.dumps(event.get("labels") or {}, separators=(",", ":"), sort_keys=True)
    whole = isinstance(event.get("labels"), dict) and "labels_cut" not in event and len(labels_json) <= 1800
    if secret and event.get("kind") in ("decision", "heal") and whole and event.get("id"):
        buttons = [{"type": "button", "text": {"type": "plain_text", "text": label}, "action_id": f"ack_{duration}",
                    "value": sign_value(secret, f"ack:{duration}:{labels_json}")}
                   for label, duration in ACK_BUTTONS if parse_duration(duration) <= config.ack_max_duration_sec]
        name = str(event.get("alertname") or "")
        if name in config.actions:
            buttons.append({"type": "button", "text": {"type": "plain_text", "text": f"Pause {name} 1h"[:75]},
                            "action_id": "pause_1h", "style": "danger", "value": sign_value(secret, f"pause:{name}")})
        blocks.append({"type": "actions", "block_id": f"autoheal-{event['id']}", "elements": buttons})
    elif secret and event.get("kind") == "approval" and event.get("result") == "opened" and event.get("id"):
        blocks.append({"type": "actions", "block_id": f"autoheal-{event['id']}", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Approve"}, "action_id": "approve",
             "style": "primary", "value": sign_value(secret, f"approve:{event['id']}")},
            {"type": "button", "text": {"type": "plain_text", "text": "Deny"}, "action_id": "deny", "style": "danger",
             "value": sign_value(secret, f"deny:{event['id']}")}]})
    return {"text": text, "blocks": blocks}


class Approvals:
    """Actions with approve: true wait for a person.  A run they would make is the decision
    awaiting_approval (its cooldown starts, so repeats do not ask again) and an approval event
    (kind "approval", result "opened") whose history id is the approval's id; it closes with
    approved, denied or expired (AUTOHEAL_APPROVAL_TIMEOUT_SEC), recorded with who answered.  An
    approved run goes through the gates again at that moment (the master switch, dry-run, a
    runtime disable, the hourly budget: Escalation's path, with approved_by on its events).  The
    open approvals are the history's: a restart finds them there.  With replicas each open
    approval is in etcd too (<prefix>approval/<id>): every replica lists it, any replica takes the
    answer, and the one that deletes its key first (one transaction) closes it and runs it."""

    def __init__(self, app: "App"):
        self.app = app
        self.shared = app.coordination  # replicas: every open approval is in etcd too (EtcdClaims)
        self.timeout = app.config.approval_timeout_sec
        self._lock = threading.Lock()
        self._open: Dict[int, Dict[str, Any]] = {}  # id: its "opened" event
        self._unshared: set = set()  # replicas: the ids etcd did not take (this replica answers them alone)
        self._retry: Dict[int, float] = {}  # an expiry etcd could not confirm: when it is tried again

    def load(self, now: float) -> None:
        """The approvals still open, as the history tells (those past their time expire now)."""
        events = [json.loads(text) for _id, text in self.app.store.query(
            HISTORY_LIMIT_MAX, since=now - self.timeout - 3600, kind="approval")]
        closed = {event.get("approval_id") for event in events if event.get("result") != "opened"}
        with self._lock:
            self._open = {event["id"]: event for event in events
                          if event.get("result") == "opened" and event.get("id") not in closed}
        self.expire_due(now)

    def open(self, waiting: List[Tuple[Dict[str, Any], Decision]], now: float) -> None:
        """Open an approval for each decision awaiting one; they are told (Notifier) like any event."""
        events = []
        for alert, decision in waiting:
            action = decision.action
            assert action is not None
            events.append(make_event("approval", now, result="opened", alertname=decision.alertname,
                                     target=decision.target, action=action.display, labels=alert["labels"],
                                     annotations=alert.get("annotations") or {},
                                     fingerprint=alert.get("fingerprint", ""), starts_at=alert.get("startsAt", ""),
                                     decision_id=(decision.event or {}).get("id"),
                                     expires_at=format_rfc3339(now + self.timeout)))
        self.app.journal.record(events)
        with self._lock:
            for event in events:
                self._open[event["id"]] = event
        for event in events if self.shared is not None else ():
            try:
                self.shared.put_approval(event["id"], event, self.timeout)
            except CoordinationUnavailable as exc:
                with self._lock:
                    self._unshared.add(event["id"])
                self.app.log({"event": "warning", "message": f"approval #{event['id']} is not shared: etcd did not "
                              f"take it ({exc}); only this replica can answer it"}, "warning")
        for (_alert, decision), event in zip(waiting, events):
            decision.detail, decision.said = {"approval_id": event["id"]}, None
        with self.app.wake:
            self.app.wake.notify_all()

    def answer(self, verb: str, approval_id: int, fields: Mapping[str, Any]) -> Any:
        """approve ID / deny ID (Control.run): (the closing event, a message), or why not.  Each
        approval is answered once: a second click finds it closed."""
        with self._lock:
            opened = self._open.pop(approval_id, None)
            unshared = approval_id in self._unshared
            self._unshared.discard(approval_id)
        if self.shared is not None and not unshared:  # whichever replica takes it from etcd first answers it
            try:
                taken = self.shared.take_approval(approval_id)
            except CoordinationUnavailable as exc:
                if opened is not None:
                    with self._lock:
                        self._open[approval_id] = opened
                return f"etcd does not answer, so no replica can answer approvals now ({exc}); try again"
            opened = taken  # None: another replica answered it (or it was never opened)
        if opened is None:
            return f"no open approval #{approval_id}: it was answered or expired already, or never opened"
        result = "approved" if verb == "approve" else "denied"
        event = self._close(opened, result, fields)
        by = fields.get("by")
        if result == "approved":
            name = opened["alertname"]
            action = self.app.actions.get(name)
            if action is not None:  # the gates again, then the run (a thread: the answer does not wait for it)
                threading.Thread(target=self.app.escalation._run_step, name="approved", daemon=True,
                                 args=(opened, action, 1, by, f"approval{approval_id}")).start()
        return event, f"approval #{approval_id} ({opened['alertname']}: {opened.get('action')}) {result} by {by}"

    def _close(self, opened: Mapping[str, Any], result: str, fields: Mapping[str, Any]) -> Dict[str, Any]:
        event = make_event("approval", self.app.clock(), result=result, alertname=opened["alertname"],
                           approval_id=opened["id"], target=opened.get("target"), action=opened.get("action"),
                           labels=opened.get("labels"), by=fields.get("by"), source=fields.get("source"),
                           client=fields.get("client"))
        self.app.journal.record([event])
        self.app.counters.add("autoheal_approvals_total", (opened["alertname"], result))
        return event

    def next_expiry(self) -> Optional[float]:
        with self._lock:
            return min((max(parse_rfc3339(event["expires_at"]), self._retry.get(approval_id, 0.0))
                        for approval_id, event in self._open.items()), default=None)

    def expire_due(self, now: float) -> None:
        """Close as expired every approval nobody answered in time: nothing runs."""
        with self._lock:
            due = [approval_id for approval_id, event in self._open.items()
                   if parse_rfc3339(event["expires_at"]) <= now and self._retry.get(approval_id, 0.0) <= now]
            expired = [(self._open.pop(approval_id), approval_id in self._unshared) for approval_id in due]
        for opened, unshared in expired:
            if self.shared is not None and not unshared:  # answered on another replica meanwhile: nothing here
                try:
                    if self.shared.take_approval(opened["id"]) is None:
                        continue
                except CoordinationUnavailable:
                    with self._lock:  # tried again in 5 s, not at once (the timers would spin)
                        self._open[opened["id"]] = opened
                        self._retry[opened["id"]] = now + 5
                    continue
            with self._lock:
                self._retry.pop(opened["id"], None)
                self._unshared.discard(opened["id"])
            self._close(opened, "expired", {"by": "autoheal", "source": "autoheal"})

    def count(self) -> int:
        """How many are open (autoheal_approvals_pending): with replicas, every replica's."""
        if self.shared is not None:
            return len(self.shared.approvals())
        with self._lock:
            return len(self._open)

    def pending(self) -> List[Dict[str, Any]]:
        """GET / approvals: the open ones, oldest first."""
        with self._lock:
            mine = dict(self._open)
        found = self.shared.approvals() if self.shared is not None else mine
        return [{"id": event["id"], "alertname": event["alertname"], "target": event.get("target"),
                 "action": event.get("action"), "labels": event.get("labels"), "replica": event.get("replica"),
                 "opened_at": format_rfc3339(event["ts"]), "expires_at": event["expires_at"]}
                for event in sorted(found.values(), key=lambda event: event["id"])]


class SlackButtons:
    """POST /slack/interact: a click on a button of autoheal's Slack messages, signed by Slack as a
    slash command is (Handler._slack_form).  A button's value is signed by autoheal (sign_value),
    so a click can only ack the alert of the message it came with.  Ack 30m/2h/24h: any member, an
    exact silence as /ack makes it, createdBy the person's Slack name, comment "ACK! by <@ID>".
    Pause NAME 1h: AUTOHEAL_SLACK_ADMINS only, as disable NAME 1h.  What was done, and by whom,
    replaces the message's buttons, through the click's response_url (only under
    AUTOHEAL_SLACK_RESPONSE_URL_PREFIX), once it is done: the click itself is answered at once."""

    def __init__(self, app: "App"):
        self.app = app

    def click(self, form: Mapping[str, str], client: str) -> Dict[str, Any]:
        """Check the click (HttpError 400/403 saying what is wrong), then do it on a thread of its own."""
        try:
            payload = json.loads(form.get("payload") or "")
        except (ValueError, RecursionError):
            raise HttpError(400, "payload: expected the JSON of Slack's block_actions") from None
        if not isinstance(payload, dict) or payload.get("type") != "block_actions" or not isinstance(
                payload.get("actions"), list) or not payload["actions"] or not isinstance(payload["actions"][0], dict):
            raise HttpError(400, 'payload: expected type "block_actions" with one action')
        secret = self.app.config.slack_signing_secret or ""
        value = verify_value(secret, str(payload["actions"][0].get("value") or ""))
        if value is None:
            raise HttpError(403, "this button's value was not made by autoheal: nothing is done")
        user = payload.get("user") if isinstance(payload.get("user"), dict) else {}
        user_id = str(user.get("id") or "")[:40]
        name = str(user.get("username") or user.get("name") or user_id)[:80]
        threading.Thread(target=self._do, args=(value, user_id, name, payload, client), name="slack-button",
                         daemon=True).start()
        return {"ok": True}

    def _do(self, value: str, user_id: str, name: str, payload: Mapping[str, Any], client: str) -> None:
        """Do what a signed value says: ack:DURATION:<labels JSON>, pause:NAME, approve:ID or
        deny:ID.  Everything it needs is in the value, so any replica can do it."""
        app = self.app
        what, _, rest = value.partition(":")
        try:
            if what == "ack":
                duration, _, labels_json = rest.partition(":")
                labels = json.loads(labels_json)
                seconds = parse_duration(duration)
                if seconds > app.config.ack_max_duration_sec:
                    raise ValueError(f"{duration} is longer than AUTOHEAL_ACK_MAX_DURATION")
                done = app.acks.acknowledge({str(k): str(v) for k, v in labels.items()}, seconds,
                                            f"ACK! by <@{user_id}>", client, "Slack", preview=False, created_by=name)
                said = (f"Acknowledged for {duration} by <@{user_id}>: silence {done['silence_id']} "
                        f"({done['outcome']}), until {done['ends_at']}")
            elif user_id not in app.config.slack_admins:
                said = f"Not done: <@{user_id}> is not one of autoheal's Slack admins (AUTOHEAL_SLACK_ADMINS)"
            elif what in ("approve", "deny"):
                result, _change, message = app.control.run(f"{what} {rest}", "slack", f"{user_id} ({name})", client)
                said = message if result == "applied" else f"Not done ({result}): {message}"
            else:
                result, _change, message = app.control.run(f"disable {rest} 1h", "slack", f"{user_id} ({name})",
                                                           client)
                said = (f"<@{user_id}> paused {rest} for 1h" if result == "applied"
                        else f"Not done ({result}): {message}")
        except PeerError as exc:
            said = f"Not done: Alertmanager did not take the silence ({exc})"
        except Exception as exc:  # said in Slack and logged; the thread ends either way
            app.log({"event": "error", "message": f"slack button: {type(exc).__name__}: {exc}"}, "error")
            said = "Not done (error): autoheal's log has the details"
        self._answer(payload, said)

    def _answer(self, payload: Mapping[str, Any], said: str) -> None:
        """The message again, its buttons replaced by what was done (response_url)."""
        message = payload.get("message") if isinstance(payload.get("message"), dict) else {}
        blocks = [block for block in message.get("blocks") or [] if isinstance(block, dict)
                  and block.get("type") != "actions"]
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(said)[:3000]}})
        body = {"replace_original": True, "text": f"{message.get('text') or ''}\n{said}".strip(), "blocks": blocks}
        answer_slack(self.app, str(payload.get("response_url") or ""), body)


def answer_slack(app: "App", url: str, body: Mapping[str, Any]) -> None:
    """Answer a slash command or a click through its response_url, only under
    AUTOHEAL_SLACK_RESPONSE_URL_PREFIX (anywhere else: nothing is sent)."""
    if not url.startswith(app.config.slack_response_prefix.rstrip("/") + "/"):
        return
    try:
        http_request("POST", url, json.dumps(body).encode("utf-8"), {"Content-Type": "application/json"}, timeout=10)
    except OSError as exc:
        app.log({"event": "warning", "message": f"Slack response_url did not answer: {exc}"}, "warning")


class Channel:
    """One receiver: Slack's incoming webhook, or a JSON webhook.  Its name is what logs, metrics
    and errors say; its URL, a secret, is said nowhere."""

    def __init__(self, name: str, url: str, slack: bool, cursor: int):
        self.name = name
        self.url = url
        self.slack = slack
        self.cursor = cursor  # the id of the last event told (or passed over): the outbox is what follows it
        self.pending = 0  # messages waiting
        self.attempts = 0  # failed attempts at the message it is on (its backoff)
        self.dirty = False  # something was recorded since the sender last looked


def channels_of(config: Config) -> List[Channel]:
    """The configured channels, by the names everything says: slack, webhook1, webhook2, ..."""
    channels = [Channel("slack", config.notify_slack_url, True, 0)] if config.notify_slack_url else []
    return channels + [Channel(f"webhook{index}", url, False, 0)
                       for index, url in enumerate(config.notify_webhook_urls, start=1)]


class Notifier:
    """Tells the receivers what autoheal did, from the history itself: the outbox of a channel is
    the events after its cursor that make a message (notifiable), sent in order, each once the
    receiver took it (2xx), the cursor then kept in the state file with the next commit.  Nothing
    is added to a decision's path but a wake-up; a thread per channel sends, so a slow receiver
    holds up no other.  A receiver that refuses or does not answer is tried again with backoff
    (1 s doubling to 5 min) for up to 24 hours, then that message is dropped and counted; past
    AUTOHEAL_NOTIFY_MAX_PENDING waiting, the oldest are dropped and counted.  An answer lost after
    the receiver took the message sends it again (at least once, in order)."""

    def __init__(self, config: Config, journal: Journal, counters: Counters, clock: Callable[[], float],
                 kept: Mapping[str, str]):
        self.config = config
        self.journal = journal
        self.counters = counters
        self.clock = clock
        newest = journal.store.query(1)
        start = newest[0][0] if newest else 0  # a new channel starts at now: the old history is not told
        self.channels = channels_of(config)
        new: Dict[str, Optional[str]] = {}
        for channel in self.channels:
            try:
                channel.cursor = int(json.loads(kept[NOTIFY_KEY + channel.name])["cursor"])
            except (ValueError, TypeError, KeyError):
                channel.cursor = start
                new[NOTIFY_KEY + channel.name] = json.dumps({"cursor": start})
        if new:  # kept at once: what is recorded from now on is told, also after a crash before any send
            journal.record([], heals=new)
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []

    def start(self) -> None:
        for channel in self.channels:
            channel.pending = self._waiting(channel.cursor)
            thread = threading.Thread(target=self._loop, args=(channel,), name=f"notify-{channel.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _waiting(self, cursor: int) -> int:
        """How many events after cursor make a message (at a start: what the outbox holds)."""
        count = 0
        while True:
            rows = self.journal.store.query(HISTORY_LIMIT_MAX, after=cursor)
            if not rows:
                return count
            count += sum(1 for _id, text in rows if notifiable(json.loads(text), self.config.notify_on))
            cursor = rows[-1][0]

    def offer(self, events: List[Mapping[str, Any]]) -> None:
        """Events just recorded (Journal): wake the senders when any of them makes a message."""
        count = sum(1 for event in events if notifiable(event, self.config.notify_on))
        if count:
            with self._wake:
                for channel in self.channels:
                    channel.pending += count
                    channel.dirty = True
                self._wake.notify_all()

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=2)

    def _next(self, channel: Channel) -> Tuple[Optional[Tuple[int, Dict[str, Any]]], bool]:
        """The first event after the channel's cursor that makes a message, the cursor moved past
        those that do not (in memory: kept with the next message); and whether more may follow."""
        rows = self.journal.store.query(500, after=channel.cursor)
        for event_id, text in rows:
            try:
                event = json.loads(text)
            except ValueError:
                event = {}
            if notifiable(event, self.config.notify_on):
                return (event_id, event), True
            channel.cursor = event_id
        return None, len(rows) == 500

    def _loop(self, channel: Channel) -> None:
        while not self._stop.is_set():
            try:
                self._step(channel)
            except Exception as exc:  # a state file that fails now (busy, replaced): said, counted, tried again
                self.counters.add("autoheal_notifications_total", (channel.name, "failed"))
                self.journal.log({"event": "error", "message": f"notifications to {channel.name}: "
                                  f"{type(exc).__name__}: {exc}"}, "error")
                self._stop.wait(5)

    def _step(self, channel: Channel) -> None:
        """One turn of a channel's sender: wait, send the next message, or give one up."""
        with self._wake:
            channel.dirty = False
        found, more = self._next(channel)
        if found is None:
            with self._wake:
                if not more and not channel.dirty:
                    channel.pending = 0
                    if not self._stop.is_set():
                        self._wake.wait(30)
            return
        event_id, event = found
        if channel.pending > self.config.notify_max_pending:  # the oldest waiting go first
            self._done(channel, event_id, "dropped")
            return
        error = self.send(channel, event)
        if error is None:
            self._done(channel, event_id, "sent")
            return
        now = self.clock()
        channel.attempts += 1
        self.counters.add("autoheal_notifications_total", (channel.name, "failed"))
        self.journal.log({"event": "warning", "message": f"notification to {channel.name} not taken "
                          f"(attempt {channel.attempts}): {error}"}, "warning")
        if now - float(event.get("ts") or now) >= NOTIFY_RETRY_SEC:  # 24 hours after it happened
            self._done(channel, event_id, "dropped")
            return
        self._stop.wait(min(NOTIFY_BACKOFF_MAX_SEC, 2.0 ** (channel.attempts - 1)))

    def _done(self, channel: Channel, event_id: int, result: str) -> None:
        """A message sent (or dropped): the cursor moves past it and is kept; counted."""
        channel.cursor = event_id
        channel.attempts = 0
        with self._wake:
            channel.pending = max(0, channel.pending - 1)
        self.counters.add("autoheal_notifications_total", (channel.name, result))
        self.journal.record([], heals={NOTIFY_KEY + channel.name: json.dumps({"cursor": event_id})})

    def send(self, channel: Channel, event: Mapping[str, Any]) -> Optional[str]:
        """Send one event's message; None once the receiver took it, else what went wrong (never
        the URL)."""
        text = notification_text(event)
        body = slack_message(event, text, self.config) if channel.slack else {"text": text, "event": dict(event)}
        return self.post(channel, body)

    @staticmethod
    def post(channel: Channel, body: Mapping[str, Any]) -> Optional[str]:
        try:
            status, raw = http_request("POST", channel.url, json.dumps(body).encode("utf-8"),
                                       {"Content-Type": "application/json"}, timeout=10, limit=65536, whole=True)
        except Exception as exc:  # the error's text could hold the URL: only its kind is said
            return f"{channel.name} did not answer ({type(exc).__name__})"
        if 200 <= status < 300:
            return None
        return f"{channel.name} answered {status}: {raw[:200].decode('utf-8', 'replace')}"

    def pending(self) -> Dict[str, int]:
        """Messages waiting, per channel (autoheal_notifications_pending)."""
        with self._wake:
            return {channel.name: channel.pending for channel in self.channels}


# ---------------------------------------------------------------------------------------------
# The application: the parts, wired together, and the webhook's path through them
# ---------------------------------------------------------------------------------------------


class LargeRequests:
    """Python's automatic collections paused while a large request (a storm of alerts) is handled,
    and one full collection owed for when requests pause (housekeeping).

    Decoding and judging 5,000 alerts makes some 30,000 objects that live until the answer: the
    collector, run every 700 of them, walked them again and again (7 % of a storm's time, by
    perf).  The full collection after one (which empties Python's free lists too: what they kept
    of a storm sat scattered through the allocator's 1 MiB arenas, 2-4 MiB resident after the
    bench's storms) takes 6-8 ms.  It ran in the worker once its answer was handed over, holding
    the interpreter while the selector thread waited to send that answer; the selector thread
    runs it now, once the answer is sent (Server._after_answer), or housekeeping does.  Until
    then the collector stays paused: let go at the end of the request, its first collection,
    of the young objects (all of the storm's), took 2 ms in the worker before the answer went.
    gc is the process's: so is this, and a pause lasts at most PAUSE_MAX_SEC however long large
    requests keep coming or wait (on their actions, on etcd): then the collector runs again until
    none is being handled (housekeeping calls expire)."""

    PAUSE_MAX_SEC = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handled = 0  # large requests being handled now
        self._answering = 0  # large requests handled whose answers are not sent yet (answered)
        self._paused: Optional[float] = None  # since when the collector is paused (None: it runs)
        self._expired = False  # the pause outlasted PAUSE_MAX_SEC: the collector runs
        self.owed = False

    @property
    def handling(self) -> bool:
        """Whether a large request is being handled or answered now (no quiet moment for
        housekeeping: its collection, run between the end of a storm and its answer, held the
        answer 6 ms)."""
        return self._handled > 0 or self._answering > 0

    def begin(self) -> None:
        with self._lock:
            self._handled += 1
            if not self._expired and self._paused is None:
                self._paused = time.monotonic()
                gc.disable()

    def end(self) -> None:
        """A large request is handled, its answer made: the collector stays paused until the
        collection it owes (collect_owed), which is owed once the answer is sent (answered)."""
        with self._lock:
            self._handled -= 1
            self._answering += 1
            if not self._handled:
                self._expired = False

    def answered(self) -> None:
        """The answer of a large request is sent, or will never be (its connection dropped)."""
        with self._lock:
            self._answering -= 1
            self.owed = True

    def expire(self) -> None:
        """Let the collector run again if the pause has lasted PAUSE_MAX_SEC."""
        with self._lock:
            if self._paused is not None and time.monotonic() - self._paused > self.PAUSE_MAX_SEC:
                self._paused = None
                self._expired = self._handled > 0
                gc.enable()

    def collect_owed(self, trim: bool = False) -> bool:
        """The full collection owed, if any and no large request is being handled (trim: the heap
        given back after it, as housekeeping does at quiet moments), and the collector running
        again: whether one ran."""
        with self._lock:
            if not self.owed or self._handled:
                return False
            self.owed = False
        gc.collect()
        with self._lock:
            if not self._handled and self._paused is not None:
                self._paused = None
                gc.enable()
        trimmer = heap_trimmer() if trim else None
        if trimmer is not None:
            trimmer()
        return True


LARGE_REQUESTS = LargeRequests()


def housekeeping(app: "App", served: Callable[[], int], stop: threading.Event) -> None:
    """Once requests are done (served() has not moved for 0.05 s, and no large request is being
    handled: a storm takes longer than that, and trimming the heap or pruning in the middle of
    one made it later): the housekeeping that no request should wait for (the history's
    pruning near its bounds, SqliteStore.tidy), and giving the heap that requests freed back to
    the system.

    glibc keeps freed memory for reuse; after compiling this module at start, a storm of
    thousands of alerts or a scrape of 1,000 alertnames, most of it would stay resident for
    good (about 18 MiB after the compile alone).  malloc_trim(0) returns it.  Elsewhere
    (musl, macOS, no ctypes) there is nothing to trim.
    """
    trim = heap_trimmer()
    seen, trimmed, collected = served(), -1, 0
    while not stop.wait(0.05):
        LARGE_REQUESTS.expire()
        now_served = served()
        if now_served != seen or LARGE_REQUESTS.handling:  # still busy: wait for a quiet moment
            seen = now_served
        elif now_served != trimmed:
            app.store.tidy()
            app.docker.close_idle()
            if app.per_target:  # targets whose cooldowns ended are forgotten, read or not
                app.claims.cooling(app.effective().cooldowns, app.clock(), 0)
            if trim is not None:
                app.feed.compact()
                app.heals.compact()
            if LARGE_REQUESTS.collect_owed():  # after a storm, and after what compact freed
                collected = now_served
            elif trim is not None and now_served - collected >= 1000:  # after a burst: its free lists go too
                gc.collect()
                collected = now_served
            if trim is not None:
                trim()
            trimmed = now_served


def cooldowns_now(claims: Claims, names: List[str], per_target: FrozenSet[str], settings: Settings,
                  now: float) -> Tuple[List[float], Dict[str, Tuple[int, List[Tuple[float, float, str]], float]]]:
    """Seconds left of each action's cooldown (a per-target action's: of its longest-waiting
    target), and the targets in cooldown of the per-target ones (Claims.cooling)."""
    left = claims.remaining_all(names, settings.cooldowns, now)
    if not per_target:
        return left, {}
    cooling = claims.cooling(settings.cooldowns, now, TARGETS_SHOWN)
    return [(cooling[name][1][0][0] if name in cooling else 0.0) if name in per_target else remaining
            for name, remaining in zip(names, left)], cooling


_NO_COOLDOWN: Dict[float, Dict[str, Any]] = {}  # cooldown_status's answer for an idle cooldown, by length


def cooldown_status(name: str, remaining: float,
                    cooling: Mapping[str, Tuple[int, List[Tuple[float, float, str]], float]],
                    settings: Settings, per_target: bool) -> Dict[str, Any]:
    """GET /'s cooldowns[NAME]: its length, what is left, the targets in cooldown (newest first,
    at most TARGETS_SHOWN) and how many; per target, when the first of them may act again."""
    if name in cooling:
        total, shown, soonest = cooling[name]
    elif remaining <= 0 and not per_target:  # most actions, most of the time: one shared answer each length
        status = _NO_COOLDOWN.get(settings.cooldowns[name])
        if status is None:
            if len(_NO_COOLDOWN) > 10000:  # lengths changed at run time, again and again
                _NO_COOLDOWN.clear()
            status = _NO_COOLDOWN[settings.cooldowns[name]] = {
                "cooldown_seconds": settings.cooldowns[name], "remaining_seconds": 0.0, "targets": [],
                "targets_total": 0}
        return status
    else:
        total, shown, soonest = (1, [(remaining, 0.0, name)], remaining) if remaining > 0 and not per_target else (
            0, [], 0.0)
    status = {"cooldown_seconds": settings.cooldowns[name], "remaining_seconds": round(remaining, 3),
              "targets": [{"target": target_of_key(key), "remaining_seconds": round(left, 3)}
                          for left, _started, key in shown],
              "targets_total": total}
    if per_target:
        status["soonest_seconds"] = round(soonest, 3)
    return status


class App:
    """Everything autoheal knows and decides, composed of parts with one job each: the journal
    (log and history), the /events feed, the claims (cooldowns and budget), runtime control, heal
    verdicts, acknowledgements and the exposition.  App itself judges webhooks and answers GET /.

    env is the environment that commands inherit (main hands it os.environ); clock gives the
    time, so that a test moves it instead of sleeping.
    """

    def __init__(self, config: Config, env: Optional[Mapping[str, str]] = None, log_stream: Any = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.actions = config.actions
        self.action_names = sorted(self.actions)
        self.per_target = frozenset(name for name, action in self.actions.items() if action.per_target)
        self.env = dict(env or {})
        self.clock = clock
        self.processes = ProcessRegistry()
        self.started_at = clock()
        self.alertmanager = AlertmanagerClient(config.alertmanager_url, config.alertmanager_timeout_sec)
        self.docker = DockerHosts(config.docker_host, config.docker_tls)
        self.journal = Journal(clock, log_stream)
        self.log = self.journal.log
        self.feed = EventFeed(config.max_event_listeners)
        self.store = self.journal.store = self.feed.store = self._open_store()
        self.counters = Counters(METRICS)
        now = clock()
        self.claims = self._open_claims(now)
        self.coordination: Optional[EtcdClaims] = self.claims if isinstance(self.claims, EtcdClaims) else None
        self.feed.latest_id = self.store.last_id()  # before the first event: publish moves it on
        if self.store.recovered:
            self.journal.record([make_event("state", now, result="recovered", **self.store.recovered)])
        self.wake = threading.Condition()  # wakes the timers: a change, a new deadline, closing
        self._closed = False
        parts = (config, self.journal, self.claims, self.counters, self.wake, clock, self.status)
        self.control: Control = SharedControl(*parts) if self.coordination else LocalControl(*parts)
        self.runs = Runs(config.replica, self.coordination)
        kept = self.store.load_heals()  # pending verdicts, and the notifier's cursors (NOTIFY_KEY)
        self.heals = HealTracker(config, self.journal, self.counters, self.wake,
                                 {key: body for key, body in kept.items() if not key.startswith(NOTIFY_KEY)},
                                 self.runs.verdict, self.alertmanager)
        self.notifier: Optional[Notifier] = None
        if config.notify_slack_url or config.notify_webhook_urls:
            self.notifier = Notifier(config, self.journal, self.counters, clock, kept)
            self.journal.on_recorded = self.notifier.offer
        self.escalation = Escalation(self)
        self.heals.after_verdict = self.escalation.escalate
        if self.coordination is None:
            self.runs.load(self.store, self.heals.follows)
        self.acks = Acknowledgements(config, self.alertmanager, self.journal, self.counters, clock)
        self.exposition = Exposition(self)
        self.slack_signatures = SeenOnce(2 * SLACK_MAX_SKEW_SEC)  # a timestamp may be 5 minutes either way
        self.buttons = SlackButtons(self)
        self.approvals = Approvals(self)
        self.control.answer_approval = self.approvals.answer
        self._lock = threading.Lock()
        self._action_slots = threading.BoundedSemaphore(config.max_concurrent_actions)
        self._folds: "collections.OrderedDict[Tuple[str, str, str, Optional[str]], List[Any]]" = collections.OrderedDict()
        self.control.load(now)
        self.approvals.load(now)
        self._timers = threading.Thread(target=self._timer_loop, name="timers", daemon=True)
        self._timers.start()
        if self.notifier is not None:
            self.notifier.start()

    def _open_store(self) -> Store:
        config = self.config
        path = config.state_file or None

        def history_bytes(persistent: bool) -> int:
            return config.history_max_bytes or (256 << 20 if persistent else 32 << 20)

        publish = self.feed.publish
        if not path:
            return MemoryStore(config.history_max_events, history_bytes(False), publish, self.log)
        try:
            store: Store = SqliteStore(path, config.history_max_events, history_bytes(True), publish, self.log)
        except (sqlite3.Error, OSError) as exc:
            if config.state_file_explicit:
                raise ConfigError(f"AUTOHEAL_STATE_FILE: cannot open {path!r}: {exc}") from None
            self.log({"event": "warning", "message": f"state file {path!r} unusable ({exc}); "
                      "cooldowns and history are kept in memory only"}, "warning")
            return MemoryStore(config.history_max_events, history_bytes(False), publish, self.log)
        if store.recovered:
            self.log({"event": "warning", "message": f"state file {path!r} was damaged ({store.recovered['reason']});"
                      f" moved aside to {store.recovered['moved_to']!r}, starting with a fresh one"}, "warning")
        return store

    def _open_claims(self, now: float) -> Any:
        """Replicas share cooldowns, the budget and runtime control in etcd; one process keeps
        them itself (and in its state file)."""
        config = self.config
        if config.etcd_endpoints:
            client = EtcdClient(config.etcd_endpoints, config.etcd_timeout_sec, etcd_ssl_context(config),
                                config.etcd_user, config.etcd_password)
            self.store.tag = f'"replica":{json.dumps(config.replica)},'
            return EtcdClaims(client, config.etcd_prefix, config.replica)
        return LocalClaims(
            {name: min(started, now) for name, started in self.store.load_cooldowns().items() if started and (
                name in self.actions or name.partition("/")[0] in self.actions
                and self.actions[name.partition("/")[0]].per_target)},
            self.store.load_budget_times(now - BUDGET_WINDOW_SEC, config.max_actions_per_hour))

    def effective(self) -> Settings:
        """The settings in force now (Control.effective)."""
        return self.control.effective()

    def _timer_loop(self) -> None:
        """Wake when the next override lapses or the next heal verdict is due (or something
        changes), and record it."""
        while True:
            heal = self.heals.next_deadline()
            with self.wake:
                if self._closed:
                    return
                due = [moment for moment in (self.control.next_lapse, heal, self.approvals.next_expiry())
                       if moment is not None]
                wait = 60.0 if not due else max(0.0, min(60.0, min(due) - self.clock()))
                if wait > 0:
                    self.wake.wait(wait)
                if self._closed:
                    return
            now = self.clock()
            try:
                lapse = self.control.next_lapse
                if lapse is not None and now >= lapse:
                    self.control.lapse(now)
                heal = self.heals.next_deadline()
                if heal is not None and now >= heal:
                    self.heals.overdue(now)
                self.approvals.expire_due(now)
            except Exception as exc:  # the loop must outlive a failed write; the next wake retries
                self.log({"event": "error", "message": f"timer: {type(exc).__name__}: {exc}"}, "error")
                time.sleep(1)

    def close(self) -> None:
        """Close the listeners, the timers and control threads and the state store."""
        self.feed.close()
        self.control.close()
        if self.notifier is not None:
            self.notifier.close()
        with self.wake:
            self._closed = True
            self.wake.notify_all()
        self._timers.join(timeout=5)
        if self.coordination is not None:  # the runs not shared yet (and their verdicts) go now
            with contextlib.suppress(CoordinationUnavailable):
                self.coordination.run_records.share(time.monotonic() + 1.0)
        self.docker.close_idle(0)
        self.store.close()

    def rejected(self, method: str, path: Optional[str], status: int, reason: str, client: str) -> None:
        """Count and log one refused request (4xx, 5xx); path is a route of ROUTES or None.

        Only the route is logged, never the query: an ack link carries its token there.
        """
        label = path or "other"
        self.counters.add("autoheal_http_rejected_total", (label, status))
        self.log({"event": "rejected", "method": method, "path": label, "status": status,
                  "reason": reason[:300], "client": client}, "error" if status >= 500 else "warning")

    # -- the webhook ----------------------------------------------------------------------

    def handle_webhook(self, alerts: List[Dict[str, Any]],
                       settings: Optional[Settings] = None) -> Tuple[List[Decision], str]:
        """Judge each alert (judge), claim what passes (claims), run it; the decisions, and the
        answer's results (JSON text: one per alert, comma-separated, the brackets left to the
        answer).  settings: those in force, when the caller looked already (the server, to know
        that nothing will run)."""
        now = self.clock()
        settings = settings or self.effective()
        decisions, cooldowns, settings = self._judge_all(alerts, settings, now)
        made: Dict[Any, str] = {}  # the answers' texts by what they say, the events' opening by ts (Decision)
        self._record_decisions(alerts, decisions, cooldowns, settings, now, made)
        self.count(decisions)
        by_result: Dict[str, List[Tuple[Dict[str, Any], Decision]]] = collections.defaultdict(list)
        for pair in zip(alerts, decisions):  # one pass for the three kinds below: a storm's 5,000
            by_result[pair[1].result].append(pair)
        waiting, dry, runs = (by_result.get(result) for result in ("awaiting_approval", "dry_run", "run"))
        if waiting:
            self.approvals.open(waiting, now)
        if dry:  # a dry-run decision's own verdict, after the grace
            followed = self.heals.follow(dry, now)
            if followed:
                self.journal.record([], heals=followed)
        if runs:
            self.run_all(runs)
            self.journal.record([decision.event_of("decision", alert, self.clock()) for alert, decision in runs],
                                heals=self.heals.follow(runs, now))
            for _alert, decision in runs:
                self.runs.ended(decision.alertname, (decision.event or {}).get("id"), now, decision.result,
                                decision.target)
        if self.heals.following:
            self.heals.resolve(alerts, self.clock())
        return decisions, ",".join([decision.answer_text(made) for decision in decisions])

    def _judge_all(self, alerts: List[Dict[str, Any]], settings: Settings,
                   now: float) -> Tuple[List[Decision], Dict[str, float], Settings]:
        """Each alert's decision, its claim made; the cooldowns that started; the settings it was
        judged with (replicas: judged again on newer ones when a claim's fence found them stale)."""
        # Replicas: the claims of one webhook are one transaction within one deadline, so a
        # webhook never waits longer than AUTOHEAL_ETCD_TIMEOUT_SEC (a stale fence: twice, at most).
        deadline = None if self.coordination is None else time.monotonic() + self.config.etcd_timeout_sec
        for attempt in range(3):
            decisions = [judge(alert, settings, self.actions) for alert in alerts]
            pending = [decision for decision in decisions if decision.result == "pending"]
            if not pending:
                return decisions, {}, settings
            try:
                # One atomic claim per alert: however many deliveries of an alert arrive at once,
                # one of them wins the cooldown window.
                claims = self.claims.claim_all([(d.key, settings.cooldowns[d.alertname]) for d in pending],
                                               settings.max_actions_per_hour, now, deadline, settings.revision)
            except StaleSettings:
                if attempt < 2:
                    with contextlib.suppress(CoordinationUnavailable):
                        self.control.refresh()
                    settings = self.effective()
                    continue
                claims = None
            except CoordinationUnavailable:
                claims = None
            break
        cooldowns: Dict[str, float] = {}
        for index, decision in enumerate(pending):
            if claims is None:
                decision.result, decision.reason = "error", "coordination_unavailable"
                continue
            decision.settle(claims[index], settings)
            if decision.result == "run" and decision.action is not None and decision.action.approve:
                decision.result = "awaiting_approval"  # its cooldown starts: a repeat does not ask again
            if decision.result in ("dry_run", "run", "awaiting_approval"):
                cooldowns[decision.key] = now
            if decision.result in ("dry_run", "awaiting_approval"):  # no action starts now (begin)
                self.claims.settled(decision.key)
        return decisions, cooldowns, settings

    def count(self, decisions: List[Decision], received: bool = True) -> None:
        """Count a webhook's decisions (a run once it ends, in _run_one); received: they came in one."""
        counts: Dict[Tuple[str, Tuple[Any, ...]], float] = (
            {("autoheal_alerts_received_total", ()): len(decisions)} if received else {})
        for decision in decisions:
            if decision.action is None:
                key = ("autoheal_alerts_skipped_total", (decision.reason,))
            elif decision.result != "run":
                key = ("autoheal_actions_total", (decision.alertname, decision.result))
            else:
                continue
            counts[key] = counts.get(key, 0) + 1
        self.counters.add_all(counts)

    def _record_decisions(self, alerts: List[Dict[str, Any]], decisions: List[Decision],
                          cooldowns: Dict[str, float], settings: Settings, now: float,
                          made: Dict[Any, str]) -> None:
        """Record each decision (a routine repeat folds into its first); runs as "run" events.
        made: the answers' texts (Decision.answer_text), which the events' texts are made from."""
        ts = round(now, 6)
        routine = [(alert, decision) for alert, decision in zip(alerts, decisions) if decision.result in ROUTINE_RESULTS]
        if routine:
            with self._lock:
                for alert, decision in routine:
                    self._fold_locked(alert, decision, now, settings, ts, made)
        # Recorded in chunks, so that the events of a storm of thousands of alerts are not all in
        # memory at once; every chunk is committed before the answer, cooldowns with the first.
        # A cooldown start that cannot be committed fails closed: nothing of it runs.
        for start in range(0, len(alerts), RECORD_CHUNK):
            events = []
            texts: List[Optional[str]] = []
            folds = []
            for alert, decision in zip(alerts[start:start + RECORD_CHUNK], decisions[start:start + RECORD_CHUNK]):
                if decision.fold_into is not None:
                    folds.append((decision.fold_into, now))
                else:
                    if decision.event is None:  # a run's event too: its id names the run (heal verdicts)
                        decision.event = (decision.event_of("run", alert, now) if decision.result == "run"
                                          else decision.decision_event(alert, ts, made))
                    events.append(decision.event)
                    texts.append(decision.text)
                    decision.text = None
            if start or not cooldowns:
                self.journal.record(events, None, folds, made=texts)
                _shrink_fold_targets(events if routine else [])  # only routine events are folded into
                continue
            try:
                self.journal.record(events, cooldowns, folds, required=True, made=texts)
                self.claims.commit_done(list(cooldowns))
            except StateUnavailable:
                self._fail_closed(decisions, now)
                return
            finally:
                _shrink_fold_targets(events if routine else [])

    def _fail_closed(self, decisions: List[Decision], now: float) -> None:
        """The cooldown starts of a webhook could not be committed: every decision that claimed
        one is an error (state_unavailable) instead, its claim given back, and nothing runs."""
        for decision in decisions:
            if decision.claim is not None:
                self.claims.release(decision.key, decision.claim, now)
                decision.result, decision.reason = "error", "state_unavailable"
                decision.claim = decision.event = decision.said = None
                decision.cooldown_remaining = 0.0  # given back: no cooldown runs

    def _fold_locked(self, alert: Mapping[str, Any], decision: Decision, now: float, settings: Settings,
                     ts: float, made: Dict[Any, str]) -> None:
        """A routine decision repeating one of the same alert (alertname and fingerprint), result
        and reason within one cooldown window folds into that one's event (count, last_ts).  ts:
        now as events say it (rounded once for a whole webhook); made: as in _record_decisions."""
        window = decision.cooldown_remaining if decision.result == "cooldown_skip" else (
            settings.cooldowns.get(decision.alertname, self.config.default_cooldown_sec))
        key = None
        if self._folds or window > 0:  # nothing to fold into, nothing to keep: no key to make
            key = (_short(decision.alertname), _short(alert.get("fingerprint") or ""), decision.result,
                   decision.reason)
            entry = self._folds.get(key)
            if entry is not None and now < entry[1]:
                decision.fold_into = entry[0]
                self._folds.move_to_end(key)
                return
        decision.event = decision.decision_event(alert, ts, made)
        if key is not None and window > 0:
            self._folds[key] = [decision.event, now + window]
            if len(self._folds) > FOLD_KEYS_MAX:
                self._folds.popitem(last=False)

    def run_all(self, runs: List[Tuple[Dict[str, Any], Decision]]) -> None:
        # Actions of different alertnames run side by side; at most max_concurrent_actions
        # commands run at once across all requests.
        if len(runs) == 1:
            self._run_one(*runs[0])
            return
        todo = list(runs)
        todo_lock = threading.Lock()

        def drain() -> None:
            while True:
                with todo_lock:
                    if not todo:
                        return
                    alert, decision = todo.pop(0)
                self._run_one(alert, decision)

        threads = [threading.Thread(target=drain, name="action", daemon=True)
                   for _ in range(min(len(runs), self.config.max_concurrent_actions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _run_one(self, alert: Dict[str, Any], decision: Decision) -> None:
        action = decision.action
        assert action is not None
        with self._action_slots:
            try:
                self.claims.begin(decision.key)  # replicas: the cooldown counts from here
            except CoordinationUnavailable as exc:
                decision.result, decision.reason = "error", "coordination_unavailable"
                decision.outcome = RunOutcome("error", None, 0.0, "", f"not started: etcd did not answer ({exc})")
                self.counters.add("autoheal_actions_total", (action.alertname, "error"))
                return
            if action.docker_api:
                try:
                    client = self.docker.get(action.docker_host)
                except ValueError as exc:  # a template filled into something that is no Docker host
                    outcome = RunOutcome("error", None, 0.0, "", f"docker_host {action.docker_host!r}: {exc}")
                else:
                    outcome = run_docker_action(action, client, self.config.compose_project)
            else:
                outcome = run_command(action.argv, command_environment(self.env, alert), action.timeout_sec,
                                      self.processes)
        decision.outcome = outcome
        decision.result = outcome.result
        self.counters.add_all({("autoheal_actions_total", (action.alertname, outcome.result)): 1,
                               ("autoheal_action_duration_seconds_sum", (action.alertname,)): outcome.duration_seconds,
                               ("autoheal_action_duration_seconds_count", (action.alertname,)): 1})

    # -- what people and scrapers read ----------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The answer of GET /."""
        now = self.clock()
        settings = self.effective()
        left, cooling = cooldowns_now(self.claims, self.action_names, self.per_target, settings, now)
        cooldowns = {name: cooldown_status(name, remaining, cooling, settings, name in self.per_target)
                     for name, remaining in zip(self.action_names, left)}
        limit = settings.max_actions_per_hour
        runs = self.runs.latest()
        mode, paused_until = settings.mode(halted=self.coordination is not None and not self.coordination.up)
        # What comes when the pause ends, from the overrides below it (another pause, dry-run, ...).
        # (paused_until is in milliseconds, cut: 10 ms later is surely after it.)
        then = self.control.settings_at(parse_rfc3339(paused_until) + 0.01).mode()[0] if paused_until else None
        answer = {
            "status": "ok",
            "mode": mode,
            "paused_until": paused_until,
            "mode_after_pause": then,
            "enabled": settings.enabled,
            "dry_run": settings.dry_run,
            "actions": self.action_names,
            "public_base_url": self.config.public_url,
            "alertmanager_url": self.config.alertmanager_url,
            "commands": {name: self.actions[name].display for name in self.action_names},
            "version": __version__,
            "cooldowns": cooldowns,
            # The latest run of each action and its verdict (pending, healed, not_healed, ...).
            "runs": {name: runs.get(name) for name in self.action_names},
            "approvals": self.approvals.pending(),  # open ones: answer with approve ID / deny ID
            "max_actions_per_hour": limit,
            "action_budget_remaining": max(0, limit - self.claims.budget_used(now)) if limit else None,
            "state_persistent": self.store.persistent,
            # Runtime control: what is switched off, and every override in force with who set it.
            "disabled_actions": sorted(settings.disabled),
            "overrides": [override.public() for override in settings.overrides],
            "overrides_persistent": self.control.persistent,
            # How far back /history reaches, per retention class (None: nothing kept yet).
            "history_oldest": {name: (format_rfc3339(ts) if ts is not None else None)
                               for name, ts in self.store.oldest().items()},
        }
        if not answer["overrides_persistent"]:
            answer["overrides_note"] = "state is in memory only: overrides will not survive a restart"
        if self.coordination is not None:
            answer["coordination"] = {"replica": self.config.replica, "up": self.coordination.up,
                                      "error": self.coordination.error, "prefix": self.config.etcd_prefix}
        return answer

    def status_page(self) -> str:
        """GET / for a browser: the status, the last 24 hours of decisions, verdicts and events."""
        now = self.clock()
        summaries = self.store.summaries  # the marks only, never the events' texts: a page's size is bounded
        latest = [json.loads(text) for _, text in self.store.query(20)]  # whole: their lines say why
        return render_status_page(self.status(), summaries(HISTORY_LIMIT_MAX, since=now - 86400, kind="decision"),
                                  summaries(100, kind="heal"), latest, now)

    def render_metrics(self) -> str:
        """The Prometheus text exposition (0.0.4): every family of METRICS, in its order."""
        return b"".join(self.exposition.parts()).decode("utf-8")

    def history(self, limit: int, since: Optional[float] = None, before: Optional[int] = None,
                **equal: Optional[str]) -> str:
        """GET /history: the JSON of recorded events, newest first; equal filters on alertname,
        kind and result.  The events' recorded texts are joined as they are: none is parsed again.
        An answer stops before HISTORY_MAX_BYTES, saying "truncated" and the "before" to go on with."""
        texts: List[str] = []
        size = 0
        for event_id, text in self.store.query(limit, since, before=before, **equal):
            if texts and size + len(text) > HISTORY_MAX_BYTES:
                return ('{"events": [' + ", ".join(texts) + f'], "truncated": true, "before": {last}}}')
            texts.append(text)
            size += len(text) + 2
            last = event_id
        return '{"events": [' + ", ".join(texts) + "]}"


# ---------------------------------------------------------------------------------------------
# Pages for people
# ---------------------------------------------------------------------------------------------

PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src data:; "
               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; max-width: 100%; }
td { border: 1px solid #ccc; padding: .3em .6em; overflow-wrap: anywhere; }
time, code { white-space: nowrap; }
.scroll { overflow-x: auto; }
button, .button { font-size: 1.1em; padding: .5em 1em; display: inline-block; margin: .2em; }
.muted { color: #666; }
"""


def render_page(title: str, paragraphs: List[str], labels: Optional[Mapping[str, str]] = None,
                undo: Optional[Mapping[str, str]] = None, extra: str = "", script: Optional[str] = None) -> str:
    """A small self-contained HTML page; every text and label value is escaped here.  extra is
    markup built from escaped parts (links, times); script the relative path of page.js."""
    import html  # only the pages need it

    body = [f"<h1>{html.escape(title)}</h1>"]
    body.extend(f"<p>{html.escape(text)}</p>" for text in paragraphs)
    if extra:
        body.append(extra)
    if labels:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>"
                       for name, value in sorted(labels.items()))
        body.append(f"<table>{rows}</table>")
    if undo:
        fields = "".join(f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
                         for name, value in undo.items())
        # Relative, so that it still works behind a reverse proxy that adds a path prefix.
        body.append(f'<form method="post" action="ack/undo">{fields}<p><button type="submit">Undo: expire this '
                    f"silence</button></p></form>")
    tail = f'<script src="{script}"></script>' if script else ""
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">" + _NO_ICON +
            f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>"
            + "".join(body) + tail + "</body></html>\n")


# The status page (GET / for a browser) and its script (GET /page.js).  Everything from an alert
# is escaped here (html.escape) or set as textContent by the script: never markup.
STATUS_PAGE_POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
                      "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# An empty icon inline, so that browsers do not ask for /favicon.ico.
_NO_ICON = '<link rel="icon" href="data:,">'

_STATUS_STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 72em; padding: .8em; color: #1b1b1b;
       background: #fafafa; }
h1 { font-size: 1.4em; margin: .2em 0; }
h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
.mode { display: inline-block; padding: .2em .6em; border-radius: .3em; font-weight: 700; color: #fff;
        background: #555; }
.mode-live { background: #1a7f37; }
.mode-dry_run { background: #9a6700; }
.mode-off, .mode-paused { background: #6e7781; }
.mode-halted { background: #cf222e; }
.wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; width: 100%; font-size: .92em; }
th, td { border-bottom: 1px solid #ddd; padding: .35em .5em; text-align: left; vertical-align: top; }
td.value { overflow-wrap: anywhere; }
time, .id { white-space: nowrap; }
code { font-size: .9em; }
button { font-size: .95em; padding: .35em .7em; margin: .15em; cursor: pointer; }
#events { list-style: none; padding: 0; margin: 0; max-height: 24em; overflow-y: auto; }
#events li { border-bottom: 1px solid #eee; padding: .3em 0; overflow-wrap: anywhere; }
.r-executed, .r-healed { color: #1a7f37; }
.r-failed, .r-error, .r-not_healed { color: #cf222e; }
.r-dry_run { color: #9a6700; }
.r-cooldown_skip, .r-skipped, .r-rate_limited { color: #6e7781; }
.timeline { display: flex; }
.timeline .labels { flex: 0 0 12em; width: 12em; overflow: hidden; display: block; }
.timeline .scroll { flex: 1 1 auto; }
svg.marks { width: 100%; min-width: 640px; display: block; }
summary { cursor: pointer; color: #0969da; margin: .3em 0; }
.muted { color: #6e7781; }
.controls { margin: .5em 0; }
input { font-size: 1em; padding: .3em; max-width: 100%; }
.name { white-space: nowrap; }
/* A phone: each action's row flows as one block instead of a table wider than the screen. */
@media (max-width: 600px) {
  thead { display: none; }
  tr { display: block; border-bottom: 1px solid #ddd; padding: .4em 0; }
  td { display: inline-block; border: 0; padding: .15em .4em; }
  .mode { font-size: .8em; }
  .timeline .labels { flex-basis: 8.5em; width: 8.5em; }
}
"""
# Colours of the 24-hour picture, by result; the legend says them in words.
_MARK_COLOURS = (("executed", "#1a7f37"), ("failed", "#cf222e"), ("error", "#8250df"), ("dry_run", "#d4a72c"),
                 ("cooldown_skip", "#8c959f"), ("rate_limited", "#0969da"), ("skipped", "#d0d7de"))
# One line of the event list, the one template of it: filled here (render_event_line) for the page
# as it loads, and by page.js, from the <template id="event-line"> the page carries, for each event
# that arrives later.  The script finds the parts by their class.
EVENT_LINE = ('<li><span class="what r-{result}"><span class="kind">{kind}</span> <span class="result">{result}'
              '</span></span><span class="why">{why}</span> <span class="alertname">{alertname}</span> {time}</li>')
WHY_MAX_CHARS = 160  # an event line's reason is cut here: the history has it whole


def event_why(event: Mapping[str, Any]) -> str:
    """Why, after an event line's result: a decision's or verdict's reason in brackets
    ("skipped (not_opted_in)"), or a control change's command and who ran it ("applied: cooldown
    X 5m by alice").  page.js's why() says the same."""
    if event.get("kind") == "control":
        text = f": {event['command']}" if event.get("command") else ""
        text += f" by {event['by']}" if event.get("by") else ""
    else:
        reason = event.get("reason") or event.get("error")
        text = f" ({reason})" if reason else ""
    return text if len(text) <= WHY_MAX_CHARS else text[:WHY_MAX_CHARS - 3] + "..."


def _time_tag(timestamp: Optional[float]) -> str:
    """A <time> the script shows in the reader's local time and relative; UTC without script."""
    import html

    if timestamp is None:
        return '<span class="muted">never</span>'
    text = format_rfc3339(timestamp)
    return f'<time datetime="{text}" title="{text}">{html.escape(text)}</time>'


def render_event_line(event: Mapping[str, Any]) -> str:
    """One event of the list (EVENT_LINE), every value escaped.  A control change names its
    action in its command, so its alertname is not said twice."""
    import html

    alertname = "" if event.get("kind") == "control" else str(event.get("alertname") or "")
    return EVENT_LINE.format(result=html.escape(str(event.get("result", ""))),
                             kind=html.escape(str(event.get("kind", ""))), why=html.escape(event_why(event)),
                             alertname=html.escape(alertname), time=_time_tag(event["ts"]))


def _then(status: Mapping[str, Any]) -> str:
    """What comes after a pause, in words: ", then LIVE" (nothing when unknown)."""
    after = status.get("mode_after_pause")
    return f", then {MODE_WORDS[after]}" if after in MODE_WORDS else ""


def mode_text(status: Mapping[str, Any]) -> str:
    """GET /'s mode in the words people read: OFF, DRY-RUN, LIVE, HALTED, or
    PAUSED until <time>, then <mode>."""
    words = MODE_WORDS[status["mode"]]
    return f"{words} until {status['paused_until']}{_then(status)}" if status.get("paused_until") else words


def _mode_markup(status: Mapping[str, Any]) -> str:
    """The mode for the page's badge, a pause's end as a <time> (local and relative once the
    script runs), and what comes after it."""
    if status.get("paused_until"):
        return (f"{MODE_WORDS[status['mode']]} until {_time_tag(parse_rfc3339(status['paused_until']))}"
                f"{_then(status)}")
    return MODE_WORDS[status["mode"]]


# The pictures' spans: the whole day, and its last hour zoomed (an hour of decisions is not one
# blob at "now"), each with its tick marks (seconds before now) and their labels.
TIMELINE_SPANS = {"day": (86400, [(h * 3600, f"-{h}h") for h in (24, 18, 12, 6)]),
                  "hour": (3600, [(m * 60, f"-{m}m") for m in (60, 45, 30, 15)])}
_ROW = 22  # pixels per action in both columns of a picture, so that a label faces its row


def render_timeline(names: List[str], decisions: List[Mapping[str, Any]], now: float, span: str = "day") -> str:
    """The last 24 hours (or hour) as inline SVG: one row per action, one mark per decision, by
    result.  The labels are a column of their own that stays put; the marks scroll sideways on a
    narrow screen (page.js starts them at "now").  x is in percent and y in pixels, so rows line
    up with their labels at every width and the marks stay round."""
    import html

    seconds, ticks = TIMELINE_SPANS[span]
    height = _ROW * max(1, len(names)) + 30
    colours = dict(_MARK_COLOURS)
    rows = {name: index for index, name in enumerate(names)}
    labels = [f'<svg class="labels" height="{height}" aria-hidden="true">']
    marks = [f'<svg class="marks" height="{height}" role="img" aria-label="Decisions of the last '
             f'{"24 hours" if span == "day" else "hour"}, one row per action">']
    for name, index in rows.items():
        y = 20 + index * _ROW
        labels.append(f'<text x="0" y="{y + 4}" font-size="12">{html.escape(name[:28])}</text>')
        marks.append(f'<line x1="0" y1="{y}" x2="100%" y2="{y}" stroke="#eee"/>')
    for before, text in ticks + [(0, "now")]:
        x = 100 * (1 - before / seconds)
        anchor = "start" if before == seconds else "end" if before == 0 else "middle"
        marks.append(f'<text x="{x:.2f}%" y="{height - 4}" font-size="10" fill="#6e7781" text-anchor="{anchor}">'
                     f'{text}</text>')
    for event in decisions:
        index = rows.get(event.get("alertname", ""))
        if index is None or now - event["ts"] > seconds:
            continue
        x = 100 * (1 - (now - event["ts"]) / seconds)
        result = event.get("result", "")
        marks.append(f'<circle cx="{x:.3f}%" cy="{20 + index * _ROW}" r="4" fill="{colours.get(result, "#999")}">'
                     f'<title>{html.escape(result)} at {format_rfc3339(event["ts"])}</title></circle>')
    scroll = ' id="timeline"' if span == "day" else ""
    return (f'<div class="timeline">{"".join(labels)}</svg><div class="wrap scroll"{scroll}>{"".join(marks)}</svg>'
            '</div></div>')


def render_timelines(names: List[str], decisions: List[Mapping[str, Any]], now: float) -> str:
    """The day's picture, its last hour behind a zoom that needs no script, and the legend."""
    legend = " ".join(f'<span style="color:{colour}">&#9679;</span> {result}' for result, colour in _MARK_COLOURS)
    return (render_timeline(names, decisions, now) +
            f'<details><summary>zoom: the last hour</summary>{render_timeline(names, decisions, now, "hour")}'
            f'</details><p class="muted">{legend}</p>')


def _action_rows(status: Mapping[str, Any], decisions: List[Mapping[str, Any]], heals: List[Mapping[str, Any]],
                 now: float) -> str:
    """A row per action: its command, cooldown, time left, last decision, verdict and buttons."""
    import html

    esc = html.escape
    last_decision: Dict[Any, Mapping[str, Any]] = {}
    for event in decisions:  # newest first
        last_decision.setdefault(event.get("alertname"), event)
    last_heal: Dict[Any, Mapping[str, Any]] = {}
    for event in heals:
        last_heal.setdefault(event.get("alertname"), event)
    rows = []
    for name in status["actions"]:
        cooldown = status["cooldowns"][name]
        remaining = cooldown["remaining_seconds"]
        left = (f'<span class="countdown" data-until="{format_rfc3339(now + remaining)}">'
                f'{esc(format_duration(remaining))}</span>' if remaining > 0 else "ready")
        if "soonest_seconds" in cooldown:  # per target: how many are cooling, and the first to end
            total, soonest = cooldown.get("targets_total", 0), cooldown["soonest_seconds"]
            left = "ready" if not total else (
                f'{total} target{"s" if total != 1 else ""} cooling, the first ready in <span class="countdown" '
                f'data-until="{format_rfc3339(now + soonest)}">{esc(format_duration(soonest))}</span>')
        decision = last_decision.get(name)
        last = (f'<span class="r-{esc(decision["result"])}">{esc(decision["result"])}</span> '
                f'{_time_tag(decision["ts"])}' if decision else "none yet")
        run = (status.get("runs") or {}).get(name)
        if run is not None:  # the latest run, and its own verdict: never an older run's
            verdict = run.get("verdict") or "no verdict"
            healed = (f'<span class="r-{esc(run["result"])}">{esc(run["result"])}</span> '
                      f'{_time_tag(parse_rfc3339(run["at"]))}: <span class="r-{esc(verdict)}">'
                      f'{esc(verdict.replace("_", " "))}</span>')
        else:
            heal = last_heal.get(name)
            healed = (f'<span class="r-{esc(heal["result"])}">{esc(heal["result"].replace("_", " "))}</span>' if heal
                      else '<span class="muted">no run yet</span>')
        switch = "enable" if name in status.get("disabled_actions", []) else "disable"
        rows.append(
            f'<tr><td class="value"><b class="name">{esc(name)}</b>{" <em>(disabled)</em>" if switch == "enable" else ""}'
            f'<br><code>{esc(status["commands"][name])}</code></td>'
            f'<td>{esc(format_duration(cooldown["cooldown_seconds"]))}</td><td>{left}</td><td>{last}</td>'
            f'<td>{healed}</td><td><button data-command="rearm {esc(name)}">rearm</button>'
            f'<button data-command="{switch} {esc(name)}">{switch}</button></td></tr>')
    return "".join(rows)


def _override_items(status: Mapping[str, Any]) -> str:
    """The overrides in force, each with who set it, until when, and an undo button."""
    import html

    esc = html.escape
    items = [
        f'<li>#{o["id"]} <b>{esc(o["setting"])}</b>{" " + esc(o["alertname"]) if o["alertname"] else ""} = '
        f'{esc(json.dumps(o["value"]))} by {esc(o["by"])}'
        f'{" until " + _time_tag(parse_rfc3339(o["until"])) if o["until"] else ""} '
        f'<button data-command="undo {o["id"]}">undo</button></li>' for o in status.get("overrides", [])]
    return "".join(items) or '<li class="muted">none: the environment is in force</li>'


def _approval_items(status: Mapping[str, Any]) -> str:
    """The open approvals, each with Approve and Deny for a token holder (nothing when none)."""
    import html

    esc = html.escape
    items = [f'<li>#{a["id"]} <b>{esc(a["alertname"])}</b>: <code>{esc(str(a.get("action")))}</code>'
             f'{esc(_where(a))} until {_time_tag(parse_rfc3339(a["expires_at"]))} '
             f'<button data-command="approve {a["id"]}">approve</button>'
             f'<button data-command="deny {a["id"]}">deny</button></li>' for a in status.get("approvals") or []]
    return f'<h2>Waiting for approval</h2><ul id="approvals">{"".join(items)}</ul>' if items else ""


def render_status_page(status: Mapping[str, Any], decisions: List[Mapping[str, Any]],
                       heals: List[Mapping[str, Any]], events: List[Mapping[str, Any]], now: float) -> str:
    """GET / for people: complete as of the load without script; page.js keeps it live."""
    import html

    esc = html.escape
    budget = status.get("max_actions_per_hour") or 0
    budget_text = (f"{budget - (status.get('action_budget_remaining') or 0)} of {budget} actions used this hour"
                   if budget else "no hourly budget")
    note = f'<p class="muted">{esc(status["overrides_note"])}</p>' if status.get("overrides_note") else ""
    coordination = status.get("coordination")
    replica = ""
    if coordination:  # replicas: which one this is, and whether etcd answers (else nothing runs)
        replica = (f'<p>Replica <code>{esc(coordination["replica"])}</code>, coordinated through etcd: ' + (
            "answering.</p>" if coordination["up"] else
            f'<strong>NOT ANSWERING: no action runs</strong> ({esc(coordination["error"] or "")}).</p>'))
    blank_line = EVENT_LINE.format(result="", kind="", why="", alertname="", time="<time></time>")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">' + _NO_ICON +
        f"<title>autoheal: {esc(mode_text(status))}</title><style>{_STATUS_STYLE}</style></head><body>"
        f'<h1>autoheal is <span id="mode" class="mode mode-{status["mode"]}">{_mode_markup(status)}</span></h1>'
        f'<p>{esc(budget_text)}. Alertmanager: <code>{esc(status["alertmanager_url"])}</code>. '
        f'Version {esc(status["version"])}.</p>{replica}'
        '<h2>Actions</h2><div class="wrap"><table><thead><tr><th>action</th><th>cooldown</th><th>left</th>'
        '<th>last decision</th><th>latest run: verdict</th><th></th></tr></thead>'
        f'<tbody>{_action_rows(status, decisions, heals, now)}</tbody></table></div>'
        f'{_approval_items(status)}<h2>Overrides</h2>{note}<ul id="overrides">{_override_items(status)}</ul>'
        '<div class="controls"><label>Admin token <input id="token" type="password" autocomplete="off" '
        'size="24" placeholder="AUTOHEAL_ADMIN_TOKEN"></label><br>'
        '<button data-command="disable 1h">disable 1h</button><button data-command="enable">enable</button>'
        '<button data-command="dry-run on">dry-run on</button><button data-command="dry-run off">dry-run off</button>'
        '<span id="answer" class="muted" role="status"></span></div>'
        f'<h2>The last 24 hours</h2>{render_timelines(status["actions"], decisions, now)}'
        f'<h2>Latest events</h2><ul id="events">{"".join(render_event_line(e) for e in events)}</ul>'
        f'<template id="event-line">{blank_line}</template>'
        '<script src="page.js"></script></body></html>\n')


PAGE_SCRIPT = r"""'use strict';
(function () {
  var token = '';  // kept in this page's memory only: never in a URL, storage or the history
  var WORDS = {off: 'OFF', dry_run: 'DRY-RUN', live: 'LIVE', paused: 'PAUSED', halted: 'HALTED'};
  var WHY_MAX = 160;  // WHY_MAX_CHARS

  // A time in the reader's local time, and how long ago or from now.
  function local(iso) {
    var when = new Date(iso);
    var seconds = Math.round((when - Date.now()) / 1000);
    var a = Math.abs(seconds);
    var rel = a < 60 ? a + ' s'
      : a < 3600 ? Math.round(a / 60) + ' min'
      : a < 86400 ? Math.round(a / 3600) + ' h'
      : Math.round(a / 86400) + ' d';
    return when.toLocaleString() + ' (' + (a < 5 ? 'just now' : seconds > 0 ? 'in ' + rel : rel + ' ago') + ')';
  }

  function times(root) {
    root.querySelectorAll('time[datetime]').forEach(function (t) {
      t.textContent = local(t.getAttribute('datetime'));
    });
  }

  function tick() {
    document.querySelectorAll('.countdown').forEach(function (c) {
      var left = Math.round((new Date(c.getAttribute('data-until')) - Date.now()) / 1000);
      c.textContent = left > 0 ? Math.floor(left / 60) + 'm' + ('0' + (left % 60)).slice(-2) + 's' : 'ready';
    });
    times(document);
  }

  // Times in a server's text (RFC 3339, UTC) in the reader's local time, as the page shows them.
  function localText(text) {
    return String(text).replace(/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z/g, local);
  }

  // Why, after an event line's result: the server's event_why() in the same words.
  function why(event) {
    var text = '';
    if (event.kind === 'control') {
      if (event.command) { text = ': ' + event.command; }
      if (event.by) { text += ' by ' + event.by; }
    } else if (event.reason || event.error) {
      text = ' (' + (event.reason || event.error) + ')';
    }
    return text.length <= WHY_MAX ? text : text.slice(0, WHY_MAX - 3) + '...';
  }

  function setTime(t, iso) {
    t.setAttribute('datetime', iso);
    t.title = iso;
  }

  // One event, from the page's own template of an event line (EVENT_LINE).
  function show(event) {
    var line = document.getElementById('event-line').content.firstElementChild.cloneNode(true);
    var result = String(event.result || '');
    line.querySelector('.what').className = 'what r-' + result;
    line.querySelector('.kind').textContent = String(event.kind || '');
    line.querySelector('.result').textContent = result;
    line.querySelector('.why').textContent = why(event);
    line.querySelector('.alertname').textContent = event.kind === 'control' ? '' : String(event.alertname || '');
    setTime(line.querySelector('time'), new Date(event.ts * 1000).toISOString());
    var list = document.getElementById('events');
    list.insertBefore(line, list.firstChild);
    times(line);
  }

  function listen() {
    var source = new EventSource('events');  // reconnects by itself, with Last-Event-ID
    source.onmessage = function (message) {
      var event = JSON.parse(message.data);
      show(event);
      if (event.kind === 'control' || event.kind === 'approval') { refresh(); }
    };
  }

  function text(parent, words) {
    parent.appendChild(document.createTextNode(words));
  }

  // The overrides in force, as the server's _override_items() lists them, each with its undo.
  function showOverrides(overrides) {
    var list = document.getElementById('overrides');
    list.textContent = '';
    overrides.forEach(function (o) {
      var item = document.createElement('li');
      text(item, '#' + o.id + ' ');
      var setting = document.createElement('b');
      setting.textContent = o.setting;
      item.appendChild(setting);
      text(item, (o.alertname ? ' ' + o.alertname : '') + ' = ' + JSON.stringify(o.value) + ' by ' + o.by);
      if (o.until) {
        text(item, ' until ');
        var t = document.createElement('time');
        setTime(t, o.until);
        item.appendChild(t);
      }
      text(item, ' ');
      var undo = document.createElement('button');
      undo.setAttribute('data-command', 'undo ' + o.id);
      undo.textContent = 'undo';
      item.appendChild(undo);
      list.appendChild(item);
    });
    if (!overrides.length) {
      var none = document.createElement('li');
      none.className = 'muted';
      none.textContent = 'none: the environment is in force';
      list.appendChild(none);
    }
    times(list);
  }

  // The open approvals, as the server's _approval_items() lists them: answered ones go at once.
  function showApprovals(approvals) {
    var list = document.getElementById('approvals');
    if (!list) { return; }  // none when the page loaded: a reload shows new ones
    var open = {};
    approvals.forEach(function (a) { open[a.id] = true; });
    Array.prototype.slice.call(list.children).forEach(function (item) {
      var button = item.querySelector('button[data-command^="approve "]');
      if (button && !open[button.getAttribute('data-command').slice(8)]) { list.removeChild(item); }
    });
  }

  // The badge and the overrides, from GET /: the same words the server renders.
  function refresh() {
    fetch('./', {headers: {'Accept': 'application/json'}})
      .then(function (r) { return r.json(); })
      .then(function (s) {
        var el = document.getElementById('mode');
        el.textContent = WORDS[s.mode] || s.mode;
        if (s.paused_until) {
          text(el, ' until ');
          var t = document.createElement('time');
          setTime(t, s.paused_until);
          el.appendChild(t);
          if (WORDS[s.mode_after_pause]) { text(el, ', then ' + WORDS[s.mode_after_pause]); }
          times(el);
        }
        el.className = 'mode mode-' + s.mode;
        document.title = 'autoheal: ' + el.textContent;
        showOverrides(s.overrides || []);
        showApprovals(s.approvals || []);
      });
  }

  function send(command) {
    var answer = document.getElementById('answer');
    token = document.getElementById('token').value || token;
    if (!token) { answer.textContent = 'enter the admin token first'; return; }
    fetch('control', {
      method: 'POST',
      headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + token},
      body: JSON.stringify({command: command, by: 'status page', source: 'page'})
    })
      .then(function (r) { return r.json(); })
      .then(function (body) { answer.textContent = localText(body.ok ? body.text : body.error); refresh(); });
  }

  document.addEventListener('click', function (e) {
    var command = e.target && e.target.getAttribute && e.target.getAttribute('data-command');
    if (command) { send(command); }
  });
  tick();
  setInterval(tick, 1000);
  document.querySelectorAll('.timeline .scroll').forEach(function (marks) {
    marks.scrollLeft = marks.scrollWidth;  // a narrow screen starts at "now"
  });
  document.querySelectorAll('details').forEach(function (zoom) {
    zoom.addEventListener('toggle', function () {
      zoom.querySelectorAll('.scroll').forEach(function (marks) { marks.scrollLeft = marks.scrollWidth; });
    });
  });
  if (document.getElementById('events')) { listen(); }  // the status page; the ack pages only show times
})();
"""



# ---------------------------------------------------------------------------------------------
# Reading requests: HTTP/1.1 framing and parsing
# ---------------------------------------------------------------------------------------------

_HEAD_END = re.compile(rb"\n\r?\n")


def frame_request(buffer: bytes, max_body: int) -> int:
    """Length of the first whole request in buffer; 0 while its head is incomplete, and minus its
    length while its body is (the length it will have); HttpError for bad framing.

    Only framing is checked here (request line, head size, Content-Length); parse_request reads
    the request itself once it is whole.
    """
    match = _HEAD_END.search(buffer, 0, MAX_HEAD_BYTES + 4)
    first_line_end = buffer.find(b"\n", 0, MAX_REQUEST_LINE + 2)
    if first_line_end < 0 and len(buffer) > MAX_REQUEST_LINE:
        raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    if match is None:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HttpError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
        return 0
    head_end = match.end()
    lines = buffer[:match.start()].split(b"\n")
    method = lines[0].split(b" ", 1)[0]
    lengths = set()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            lengths.add(bytes(value.strip()))  # a large request is framed again as its bytearray
        elif name == b"transfer-encoding":
            raise HttpError(411, "Transfer-Encoding is not accepted; send the body with a Content-Length")
    if len(lengths) > 1:
        raise HttpError(400, "conflicting Content-Length headers")
    if not lengths:
        if method == b"POST":
            raise HttpError(411, "Content-Length is required on POST")
        return head_end
    raw = lengths.pop()
    if not raw.isdigit() or len(raw) > 18:
        raise HttpError(400, f"Content-Length must be a whole number, got {raw[:40].decode('latin-1')!r}")
    length = int(raw)
    if length > max_body:
        raise HttpError(413, f"body of {length} bytes is over AUTOHEAL_MAX_BODY_BYTES ({max_body})")
    if len(buffer) < head_end + length:
        return -(head_end + length)
    return head_end + length

_EXPECT_CONTINUE = re.compile(rb"\nexpect:[ \t]*100-continue", re.IGNORECASE)


def parse_query(query: str) -> Dict[str, str]:
    """Query or form parameters; the first of a repeated name wins."""
    if not query:
        return {}
    import urllib.parse

    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=64)
    except ValueError as exc:
        raise HttpError(400, f"query: {exc}") from None
    params: Dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)
    return params


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS_PHRASES = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    409: "Conflict", 421: "Misdirected Request", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
}
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_HEADERS = 100


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (RFC 9110 5.6.7), independent of the locale."""
    t = time.gmtime(timestamp)
    return (f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


class Request:
    """One HTTP request, parsed from bytes that frame_request found whole."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "client")

    def __init__(self, method: str, target: str, version: str, headers: Dict[str, str], body: bytes, client: str):
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.version = version
        self.headers = headers
        self.body = body
        self.client = client

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked."""
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in connection
        return "keep-alive" in connection


def parse_request(raw: bytes, client: str) -> Request:
    """Parse a whole request (RFC 9112): request line, header fields, body; HttpError if malformed.

    The request was framed by frame_request already (lengths and limits), so this only has to
    read it.  Header names are lower-cased; of a repeated field the first one counts.  A large
    request comes as the bytearray it was read into (_Connection.read_into), and becomes its body.
    """
    match = _HEAD_END.search(raw)
    head_end = match.end() if match else len(raw)
    lines = raw[:match.start() if match else len(raw)].decode("latin-1").split("\n")
    words = lines[0].rstrip("\r").split(" ")
    if len(words) != 3 or not words[1]:
        raise HttpError(400, "malformed request line; expected METHOD TARGET HTTP/1.1")
    method, target, version = words
    if not _TOKEN.match(method):
        raise HttpError(400, "malformed method in the request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(400, f"unsupported HTTP version {version[:20]!r}; use HTTP/1.1")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: Dict[str, str] = {}
    hosts = 0
    for line in lines[1:]:
        line = line[:-1] if line.endswith("\r") else line
        if line[:1] in (" ", "\t"):
            raise HttpError(400, "obsolete line folding in the header fields")
        # RFC 9112 2.2 and 5: a bare CR or a NUL in a header line is refused, never read past;
        # behind a lenient proxy such lines are how request smuggling starts.
        if "\r" in line or "\0" in line:
            raise HttpError(400, "a header field holds a bare CR or a NUL")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise HttpError(400, "malformed header field")
        name = name.lower()
        hosts += name == "host"
        headers.setdefault(name, value.strip(" \t"))
    # RFC 9112 3.2: an HTTP/1.1 request has exactly one Host field.
    if version == "HTTP/1.1" and hosts != 1:
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header field" if hosts
                        else "an HTTP/1.1 request needs a Host header field")
    if isinstance(raw, bytearray):  # a large request, read into its own buffer: its body, not a copy
        del raw[:head_end]  # (dropping the front of a bytearray moves its start, O(1))
        return Request(method, target, version, headers, raw, client)
    return Request(method, target, version, headers, raw[head_end:], client)


# ---------------------------------------------------------------------------------------------
# The HTTP handler: routes, and what each answers
# ---------------------------------------------------------------------------------------------


@record_type
class Route:
    """One endpoint, everything about it in one row: its handler (Handler.route_<name>), its
    methods, the pool that serves it (see Server), whether it changes something (then a cross-site
    request is refused), the token that guards it, whether it reads a form body, and whether
    people read its errors (an HTML page for a browser), and whether the selector thread answers
    it itself while nothing can run (see Server: dry-run webhooks up to INLINE_MAX_BYTES)."""

    name: str
    methods: Tuple[str, ...]
    pool: str
    changes: bool = False
    token: Optional[str] = None  # "webhook": Authorization: Bearer; "ack": token= in the query or form
    form: bool = False
    for_people: bool = False
    inline: bool = False


# The worker pools a Route names, and how many threads each has (None: AUTOHEAL_WORKERS).  However
# many slow actions or silent Alertmanager calls fill "main" and "ack", GET / (the health check)
# and /metrics are still answered by "quick", and acks never hold a worker a webhook needs.
POOLS: Dict[str, Optional[int]] = {
    "main": None,  # webhooks and their commands
    "ack": 4,  # acks, which wait on Alertmanager
    "quick": 2,  # what never waits on a command or a peer, only on SQLite: the health check, the scrape
    "control": 2,  # runtime control, answering while actions run wild
}
ROUTES: Dict[str, Route] = {
    "/": Route("status", ("GET",), "quick"),
    "/metrics": Route("metrics", ("GET",), "quick"),
    "/alert": Route("alert", ("POST",), "main", changes=True, token="webhook", inline=True),
    "/ack": Route("ack", ("GET",), "ack", changes=True, token="ack", for_people=True),
    "/ack/undo": Route("undo", ("POST",), "ack", changes=True, token="ack", form=True, for_people=True),
    "/history": Route("history", ("GET",), "quick"),
    "/events": Route("events", ("GET",), "quick"),
    "/page.js": Route("script", ("GET",), "quick"),
    "/control": Route("control", ("POST",), "control", changes=True),
    "/slack/command": Route("slack", ("POST",), "control"),
    "/slack/interact": Route("interact", ("POST",), "control"),
}


def pool_sizes(config: Config) -> Dict[str, int]:
    """The threads of each pool of POOLS under this configuration."""
    return {name: config.workers if size is None else size for name, size in POOLS.items()}


def route_path(target: str) -> Optional[str]:
    """The path of ROUTES a request target names, in origin or absolute form (RFC 9112 3.2); None
    for anything else.  Dispatch, the choice of worker pool and the metric labels all use it."""
    path = target.partition("?")[0]
    if "://" in path:
        import urllib.parse

        try:
            path = urllib.parse.urlsplit(target).path or "/"
        except ValueError:
            return None
    return path if path in ROUTES else None


_SILENCE_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_ack_request(params: Mapping[str, str], max_seconds: float) -> Tuple[Dict[str, str], float, str]:
    """An /ack link's labels, duration (seconds) and the silence's comment; HttpError 400 naming
    what is wrong."""
    labels = parse_ack_labels(params.get("labels"))
    raw_duration = params.get("duration")
    if not raw_duration:
        raise HttpError(400, "duration: missing; expected a duration such as 30m, 2h or 1d")
    try:
        seconds = parse_duration(raw_duration)
    except ValueError as exc:
        raise HttpError(400, f"duration: {exc}, got {raw_duration[:40]!r}") from None
    if seconds > max_seconds:
        raise HttpError(400, f"duration: {raw_duration} is longer than AUTOHEAL_ACK_MAX_DURATION "
                             f"({format_duration(max_seconds)})")
    comment = params.get("comment", "")
    runbook = params.get("runbook", "")
    if len(comment) > 1000 or len(runbook) > 2000:
        raise HttpError(400, "comment: longer than 1000 characters (or runbook longer than 2000)")
    return labels, seconds, "ACK!" + (f" {comment}" if comment else "") + (f" runbook: {runbook}" if runbook else "")


def parse_history_query(params: Mapping[str, str], now: float) -> Dict[str, Any]:
    """/history's parameters as App.history's arguments; HttpError 400 naming a bad or unknown one."""
    unknown = sorted(set(params) - set(HISTORY_PARAMETERS))
    if unknown:
        raise HttpError(400, f"unknown parameter {unknown[0][:40]!r}; /history takes {', '.join(HISTORY_PARAMETERS)}")
    query: Dict[str, Any] = {"limit": 100}
    if "limit" in params:
        try:
            query["limit"] = parse_int(params["limit"], 1, HISTORY_LIMIT_MAX)
        except ValueError as exc:
            raise HttpError(400, f"limit: {exc}, got {params['limit'][:40]!r}") from None
    if "before" in params:
        if not re.fullmatch(r"[0-9]{1,18}", params["before"]):
            raise HttpError(400, f"before: expected the id of an event (as a truncated answer gives it), "
                                 f"got {params['before'][:40]!r}")
        query["before"] = int(params["before"])
    if "since" in params:
        raw = params["since"].strip()
        try:
            if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", raw):
                query["since"] = float(raw)
            elif _DURATION.match(raw):
                query["since"] = now - parse_duration(raw)  # a relative age: since=10m
            else:
                query["since"] = parse_rfc3339(raw)
        except ValueError:
            raise HttpError(400, f"since: expected Unix time, an RFC 3339 time or an age such as 10m, "
                                 f"got {raw[:40]!r}") from None
    for name in ("alertname", "kind", "result"):
        if len(params.get(name, "")) > 256:
            raise HttpError(400, f"{name}: longer than 256 characters")
        query[name] = params.get(name) or None
    kind, result = query["kind"], query["result"]
    if kind is not None and kind not in EVENT_KINDS:
        raise HttpError(400, f"kind: unknown kind {kind[:40]!r}; the history holds {', '.join(EVENT_KINDS)}")
    results = EVENT_KINDS[kind] if kind is not None else EVENT_RESULTS
    if result is not None and result not in results:
        raise HttpError(400, f"result: {result[:40]!r} is no result of {'a ' + kind if kind else 'any'} event; "
                             f"expected one of {', '.join(results)}")
    return query


class Handler:
    """Answers one request: routes it, turns errors into JSON (or HTML for people), builds the bytes."""

    server_version = f"autoheal/{__version__}"

    def __init__(self, server: "Server", request: Request, settings: Optional[Settings] = None):
        self.server = server
        self.request = request
        self.settings = settings  # of a webhook, when the server looked at them to answer it itself
        self.headers = request.headers
        self.command = request.method
        self.close_connection = not request.keep_alive
        self.stream: Optional[Subscriber] = None
        self.out: Union[bytes, List[bytes]] = b""
        # What the answer was made from (a webhook's alerts and decisions): a storm's are some 50,000
        # objects, 3 ms to free, which the server frees once a large request's answer is sent.
        self.leftovers: Any = None

    @property
    def app(self) -> App:
        return self.server.app

    def handle(self) -> Union[bytes, List[bytes]]:
        """Route the request; return the whole answer."""
        self._dispatch(self.request.method)
        return self.out

    def _dispatch(self, method: str) -> None:
        path = route_path(self.request.target)
        query = self.request.query
        try:
            self._refuse_rebound_host()
            if path is None:
                shown = self.request.path[:200]
                raise HttpError(404, f"no such path {shown!r}; GET / shows the status")
            route = ROUTES[path]
            methods = route.methods
            if method not in methods and not (method == "HEAD" and "GET" in methods):
                allow = ", ".join(methods + (("HEAD",) if "GET" in methods else ()))
                raise HttpError(405, f"{method[:20]} is not allowed on {path}; use {allow}", {"Allow": allow})
            if route.changes:
                self._refuse_cross_site(method)
            params = parse_query(query)
            if route.form:
                params.update(self._form())
            self._guard(route, params)
            try:
                getattr(self, "route_" + route.name)(method, params)
            except Unknown as exc:  # domain answers from App, turned into HTTP here
                raise HttpError(404, str(exc)) from None
            except Forbidden as exc:
                raise HttpError(403, str(exc)) from None
            except PeerError as exc:
                raise HttpError(502, str(exc)) from None
        except HttpError as exc:
            self.app.rejected(method, path, exc.status, exc.message, self.request.client)
            if path is not None and ROUTES[path].for_people and self._wants_html():
                page = render_page("autoheal: nothing was done", [exc.message])
                self._send(exc.status, page.encode("utf-8"), "text/html; charset=utf-8", exc.headers)
            else:
                self._send_json(exc.status, {"ok": False, "error": exc.message}, exc.headers)
        except Exception as exc:  # the boundary: log the traceback, never show it
            import traceback

            self.app.log({"event": "error", "message": f"unexpected {type(exc).__name__} on {method[:20]} {path or 'other'}",
                          "traceback": traceback.format_exc()}, "error")
            self.app.rejected(method, path, 500, f"unexpected {type(exc).__name__}", self.request.client)
            self.close_connection = True
            self._send_json(500, {"ok": False, "error": "internal error; autoheal's log has the details"})

    # -- responses ------------------------------------------------------------------------

    def _head(self, status: int, fields: List[Tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_STATUS_PHRASES.get(status, 'Status')}", f"Server: {self.server_version}",
                 f"Date: {http_date(time.time())}"]
        lines.extend(f"{name}: {value}" for name, value in fields)
        if self.close_connection or self.server.stopping:
            self.close_connection = True
            lines.append("Connection: close")
        elif self.request.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status: int, body: Union[bytes, List[bytes]], content_type: str,
              headers: Optional[Mapping[str, str]] = None) -> None:
        """The whole answer in self.out: one buffer, or (a body given in parts) the head and the
        parts, for one sendmsg (send_parts)."""
        length = len(body) if isinstance(body, bytes) else sum(len(part) for part in body)
        fields = [("Content-Type", content_type), ("Content-Length", str(length)), ("Cache-Control", "no-store")]
        headers = dict(headers or {})
        if content_type.startswith("text/html"):
            # Pages are never framed by another site (clickjacking of the undo button), and run
            # nothing but what autoheal itself serves.
            fields += [("X-Frame-Options", "DENY"),
                       ("Content-Security-Policy", headers.pop("Content-Security-Policy", PAGE_POLICY))]
        fields.extend(headers.items())
        # One buffer, one send: headers and body in separate sends would meet Nagle's delay.
        head = self._head(status, fields)
        if self.command == "HEAD":
            self.out = head
        elif isinstance(body, bytes):
            self.out = head + body
        else:
            self.out = [head, *body]

    def _send_json(self, status: int, document: Any, headers: Optional[Mapping[str, str]] = None) -> None:
        self._send(status, json.dumps(document).encode("utf-8"), "application/json", headers)

    def _wants_html(self) -> bool:
        return "text/html" in self.headers.get("accept", "")

    def _read_body(self) -> bytes:
        if "content-length" not in self.headers:
            raise HttpError(411, "Content-Length is required")
        return self.request.body

    def _form(self) -> Dict[str, str]:
        """The form fields of a POST body (application/x-www-form-urlencoded)."""
        body = self._read_body()
        try:
            return parse_query(body.decode("utf-8")) if body else {}
        except UnicodeDecodeError:
            raise HttpError(400, "body is not UTF-8 form data") from None

    def _guard(self, route: Route, params: Mapping[str, str]) -> None:
        """The token a route declares: the webhook's bearer (401) or the ack token= (403)."""
        config = self.app.config
        if route.token == "webhook":
            scheme, _, token = self.headers.get("authorization", "").partition(" ")
            self._check_token(config.webhook_token, token.strip() if scheme.lower() == "bearer" else None,
                              401, "Authorization: Bearer token")
        elif route.token == "ack":
            self._check_token(config.ack_token, params.get("token"), 403, "token")

    def _check_token(self, expected: Optional[str], given: Optional[str], status: int, what: str) -> None:
        if expected is None:
            return
        import hmac  # only deployments with a token pay for it (it loads OpenSSL)

        # Constant-time comparison; the token is never logged nor echoed.
        if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
            headers = {"WWW-Authenticate": 'Bearer realm="autoheal"'} if status == 401 else None
            raise HttpError(status, f"{what} is missing or wrong", headers)

    def _refuse_rebound_host(self) -> None:
        """A browser's request (it says Origin or Sec-Fetch-*) is served only for a Host that is an
        IP address, localhost, AUTOHEAL_PUBLIC_URL's host or one of AUTOHEAL_ALLOWED_HOSTS: a
        page whose name was rebound to autoheal's address (DNS rebinding) is same-origin to the
        browser, and would pass every cross-site check.  Machine clients send neither header."""
        headers = self.headers
        if "origin" not in headers and not any(name.startswith("sec-fetch-") for name in headers):
            return
        raw = headers.get("host", "").strip().lower()
        host = raw[1:raw.find("]")] if raw.startswith("[") else raw.rpartition(":")[0] if re.search(
            r":[0-9]*$", raw) else raw
        host = host.rstrip(".")
        if host == "localhost" or host in self.app.config.allowed_hosts or host == self._public_host():
            return
        import ipaddress

        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            raise HttpError(421, f"a browser reached autoheal by the name {host[:80]!r}, which it does not answer to: "
                                 "use its address, localhost, AUTOHEAL_PUBLIC_URL's host, or list the name in "
                                 "AUTOHEAL_ALLOWED_HOSTS") from None

    def _public_host(self) -> str:
        import urllib.parse

        try:
            return (urllib.parse.urlsplit(self.app.config.public_url).hostname or "").rstrip(".")
        except ValueError:
            return ""

    def _refuse_cross_site(self, method: str) -> None:
        """A page on another site must not change anything through the visitor's browser.

        Browsers say where a request comes from (Sec-Fetch-Site, Origin).  A link followed from
        Slack is a cross-site top-level navigation, and that is an ack; anything else a hostile
        page can make a browser send (an image, a script's fetch, a form posted cross-site) is
        refused.  Alertmanager and curl send neither header and are not affected.
        """
        site = self.headers.get("sec-fetch-site", "").lower()
        origin = self.headers.get("origin")
        navigation = (self.headers.get("sec-fetch-mode", "navigate").lower() == "navigate"
                      and self.headers.get("sec-fetch-dest", "document").lower() == "document")
        if method in ("GET", "HEAD"):
            if site == "cross-site" and not navigation:
                raise HttpError(403, "a cross-site request that is not a link being opened cannot acknowledge; "
                                     "open the link itself")
            return
        if site == "cross-site" or (origin is not None and not self._same_origin(origin)):
            raise HttpError(403, f"a cross-site request cannot change anything here (Origin {origin!r:.80}, "
                                 f"Sec-Fetch-Site {site!r:.20})")

    def _same_origin(self, origin: str) -> bool:
        """Whether an Origin header names this server: its Host, or AUTOHEAL_PUBLIC_URL."""
        import urllib.parse

        try:
            netloc = urllib.parse.urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        public = urllib.parse.urlsplit(self.app.config.public_url).netloc.lower()
        return bool(netloc) and netloc in (self.headers.get("host", "").lower(), public)

    def _is_prefetch(self) -> bool:
        """A browser's speculative load (prefetch, prerender) is a preview: it creates nothing."""
        purpose = " ".join(self.headers.get(name, "") for name in ("sec-purpose", "purpose", "x-purpose", "x-moz"))
        return any(word in purpose.lower() for word in ("prefetch", "prerender", "preview"))

    # -- routes ---------------------------------------------------------------------------

    def route_status(self, method: str, params: Mapping[str, str]) -> None:
        if self._prefers_html():  # a browser: the page for people; everything else keeps its JSON
            page = self.app.status_page().encode("utf-8")
            self._send(200, page, "text/html; charset=utf-8", {"Content-Security-Policy": STATUS_PAGE_POLICY})
            return
        self._send_json(200, self.app.status())

    def route_script(self, method: str, params: Mapping[str, str]) -> None:
        self._send(200, PAGE_SCRIPT.encode("utf-8"), "text/javascript; charset=utf-8")

    def _prefers_html(self) -> bool:
        """Whether Accept prefers text/html to JSON, as a browser's does (curl's */* does not)."""
        accept = self.headers.get("accept", "").lower()
        html_at = accept.find("text/html")
        json_at = accept.find("application/json")
        return html_at >= 0 and (json_at < 0 or html_at < json_at)

    def route_metrics(self, method: str, params: Mapping[str, str]) -> None:
        self._send(200, self.app.exposition.parts(), "text/plain; version=0.0.4; charset=utf-8")

    def route_alert(self, method: str, params: Mapping[str, str]) -> None:
        alerts = validate_webhook(parse_json_body(self._read_body()))
        decisions, results = self.app.handle_webhook(alerts, self.settings)
        self.leftovers = (alerts, decisions)
        # An alert that failed closed (etcd or the state file did not answer) is not lost:
        # Alertmanager delivers a webhook again after a 5xx, and the next delivery is judged anew.
        failed = [d for d in decisions if d.result == "error" and d.reason in FAIL_CLOSED_REASONS]
        if failed:
            error = (f"{len(failed)} alert(s) failed closed ({failed[0].reason}): nothing of them ran; "
                     "Alertmanager delivers this webhook again")
            self._send_results(503, f'{{"ok":false,"error":{compact_json(error)},"results":['.encode(), results)
            return
        self._send_results(200, b'{"ok":true,"results":[', results)

    def _send_results(self, status: int, opening: bytes, results: str) -> None:
        """A webhook's answer: its results' text (made from the decisions', Decision.answer_text,
        never as a document) between opening and its end.  A storm's is sent in parts as it is
        encoded: its 600 kB copied once, not five times (fresh pages each)."""
        parts = [opening, results.encode(), b"]}"]
        self._send(status, parts if len(results) > 65536 else b"".join(parts), "application/json")

    def route_ack(self, method: str, params: Mapping[str, str]) -> None:
        config = self.app.config
        labels, seconds, text = parse_ack_request(params, config.ack_max_duration_sec)
        user_agent = self.headers.get("user-agent", "")
        preview = method == "HEAD" or bool(PREVIEW_AGENTS.search(user_agent)) or self._is_prefetch()
        result = self.app.acks.acknowledge(labels, seconds, text, self.request.client, user_agent[:300], preview)
        if not self._wants_html():
            self._send_json(200, result)
            return
        labels = {m["name"]: m["value"] for m in result["matchers"]}
        if result.get("preview"):
            page = render_page("autoheal: preview", [
                f"Opening this link silences these labels for {result['duration']}. A preview creates nothing."],
                labels)
        else:
            import html

            undo = {"silence_id": result["silence_id"]}
            if config.ack_token:
                undo["token"] = params.get("token", "")
            verb = {"created": "Silenced", "existing": "Already silenced", "extended": "Silence extended"}
            silence = html.escape(result["silence_id"])
            ui = html.escape((config.alertmanager_public_url or config.alertmanager_url.split(",")[0]).rstrip("/"))
            extra = (f'<p>For <b>{html.escape(format_duration(seconds))}</b> (the duration chosen), until '
                     f'{_time_tag(parse_rfc3339(result["ends_at"]))}.</p>'
                     f'<p class="scroll">Silence <code>{silence}</code>: '
                     f'<a href="{ui}/#/silences/{silence}">see it in Alertmanager</a></p>')
            page = render_page(f"{verb[result['outcome']]} for {format_duration(seconds)}", [
                "Alerts with exactly these labels notify again when the silence ends, or now if you undo it."],
                labels, undo, extra, "page.js")
        self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")

    def route_undo(self, method: str, params: Mapping[str, str]) -> None:
        import urllib.parse

        silence_id = params.get("silence_id", "")
        if not silence_id and params.get("id"):
            try:
                event_id = parse_int(params["id"], 1, 2**62)
            except ValueError:
                raise HttpError(400, f"id: expected the id of an ack event in /history, "
                                     f"got {params['id'][:40]!r}") from None
            silence_id = self.app.acks.silence_of_event(event_id)  # an ack withdrawn by its history id
        if not _SILENCE_ID.fullmatch(silence_id):
            raise HttpError(400, "silence_id: expected the id (a UUID) of a silence that autoheal created")
        result = self.app.acks.undo(silence_id, self.request.client, self.headers.get("user-agent", "")[:300])
        if self._wants_html():
            import html

            # Not a dead end: the same labels can be acknowledged again, for the usual durations.
            again = "".join(
                f'<a class="button" href="../ack?{html.escape(urllib.parse.urlencode(query))}">Acknowledge again '
                f"for {duration}</a>"
                for duration in ("30m", "2h", "24h")
                for query in [{"labels": json.dumps(result["labels"]), "duration": duration,
                               **({"token": params["token"]} if params.get("token") else {})}])
            page = render_page("Silence expired", [
                "These labels notify again. The silence has ended in Alertmanager."],
                result["labels"], extra=f'<p class="scroll">Silence <code>{html.escape(result["silence_id"])}</code>'
                f"</p><p>{again}</p>", script="../page.js")
            self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
        else:
            self._send_json(200, result)

    def route_history(self, method: str, params: Mapping[str, str]) -> None:
        query = parse_history_query(params, self.app.clock())
        self._send(200, self.app.history(**query).encode("utf-8"), "application/json")

    def route_control(self, method: str, params: Mapping[str, str]) -> None:
        """POST /control: one runtime control command, with the admin token."""
        config = self.app.config
        if config.admin_token is None:
            raise HttpError(403, "runtime control over HTTP is off: set AUTOHEAL_ADMIN_TOKEN to turn it on")
        body = parse_json_body(self._read_body())
        if not isinstance(body, dict) or not isinstance(body.get("command", ""), str):
            raise HttpError(400, 'body must be a JSON object {"command": "<text>", "reason": "...", "by": "..."}')
        for key in ("reason", "by"):
            if not isinstance(body.get(key, ""), str) or len(body.get(key) or "") > 200:
                raise HttpError(400, f"{key}: expected a string of at most 200 characters")
        by = (body.get("by") or "admin").strip() or "admin"
        # Where it was typed, for the audit: the page and --control say so; any other client is http.
        source = body.get("source") if body.get("source") in ("page", "cli") else "http"
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        try:
            self._check_token(config.admin_token, token.strip() if scheme.lower() == "bearer" else None, 401,
                              "Authorization: Bearer admin token")
        except HttpError as exc:  # a refused attempt is recorded, with who and from where (routine history)
            result, _change, message = self.app.control.run(body.get("command", ""), source, by, self.request.client,
                                                            body.get("reason"), may_change=False,
                                                            attempt_refused=exc.message)
            if result == "throttled":  # past REFUSALS_PER_MINUTE: not even recorded
                raise HttpError(429, message, {"Retry-After": "60"}) from None
            raise
        result, change, message = self.app.control.run(body.get("command", ""), source, by, self.request.client,
                                                       body.get("reason"))
        if result != "applied":  # does not parse: 400; cannot apply (nothing to undo): 409; etcd silent: 503
            raise HttpError({"invalid": 400, "unavailable": 503, "throttled": 429}.get(result, 409), message)
        self._send_json(200, {"ok": True, "change": change, "status": self.app.status(), "text": message})

    def _slack_form(self, body: bytes) -> Dict[str, str]:
        """The form of a request from Slack, once its signature over the raw body and its time
        are verified (HttpError 403 with the Slack door off, 401 for a wrong or old signature)."""
        secret = self.app.config.slack_signing_secret
        if secret is None:
            raise HttpError(403, "the Slack door is off: set AUTOHEAL_SLACK_SIGNING_SECRET to the app's signing secret")
        import hmac

        timestamp = self.headers.get("x-slack-request-timestamp", "")
        signature = self.headers.get("x-slack-signature", "")
        if not re.fullmatch(r"[0-9]{1,12}", timestamp) or not hmac.compare_digest(
                signature.encode("latin-1"), slack_signature(secret, timestamp, body).encode("ascii")):
            raise HttpError(401, "X-Slack-Signature is missing or wrong")
        if abs(self.app.clock() - int(timestamp)) > SLACK_MAX_SKEW_SEC:
            raise HttpError(401, "X-Slack-Request-Timestamp is more than 5 minutes from now: a replay")
        if not self.app.slack_signatures.first(signature, self.app.clock()):
            raise HttpError(401, "this signed request was accepted once already: a replayed request runs nothing")
        try:
            return parse_query(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise HttpError(400, "body is not UTF-8 form data") from None

    def route_interact(self, method: str, params: Mapping[str, str]) -> None:
        """POST /slack/interact: a click on a button of autoheal's Slack messages (SlackButtons)."""
        self._send_json(200, self.app.buttons.click(self._slack_form(self._read_body()), self.request.client))

    def route_slack(self, method: str, params: Mapping[str, str]) -> None:
        """POST /slack/command: a Slack slash command, verified by its signature over the raw body."""
        config = self.app.config
        body = self._read_body()
        if body == b"ssl_check=1" or body.startswith(b"ssl_check=1&"):  # Slack's probe: changes nothing
            self._send_json(200, {"ok": True})
            return
        form = self._slack_form(body)
        user_id = form.get("user_id", "")[:40]
        by = f"{user_id} ({form.get('user_name', '')[:80]})" if form.get("user_name") else user_id
        app = self.app
        answers: "queue.SimpleQueue[Dict[str, Any]]" = queue.SimpleQueue()

        def run() -> None:
            try:
                result, change, message = app.control.run(form.get("text", ""), "slack", by, self.request.client,
                                                          may_change=user_id in config.slack_admins)
            except Exception as exc:  # logged with its type, answered in words: the thread ends either way
                app.log({"event": "error", "message": f"slack command: {type(exc).__name__}: {exc}"}, "error")
                answers.put({"response_type": "ephemeral", "text": "Not done (error): autoheal's log has the details"})
                return
            if result == "applied" and change is not None:
                # Said in the channel, with a mention, so that everyone sees who changed what.
                answers.put({"response_type": "in_channel",
                             "text": f"<@{user_id}> changed autoheal: {message}\n{describe_settings(app.status())}"})
            else:
                prefix = "" if result == "applied" else f"Not done ({result}): "
                answers.put({"response_type": "ephemeral", "text": prefix + message})

        # Slack waits 3 s for an answer.  A command still committing then (a slow state file)
        # answers through the request's response_url when it is done.
        worker = threading.Thread(target=run, name="slack-command", daemon=True)
        worker.start()
        try:
            self._send_json(200, answers.get(timeout=SLACK_ANSWER_SEC))
            return
        except queue.Empty:
            pass
        def follow_up() -> None:
            worker.join()
            answer_slack(app, form.get("response_url", ""), answers.get())

        threading.Thread(target=follow_up, name="slack-follow-up", daemon=True).start()
        self._send_json(200, {"response_type": "ephemeral",
                              "text": "Working on it: the state file is slow; the answer follows here."})

    def route_events(self, method: str, params: Mapping[str, str]) -> None:
        if method == "HEAD":
            self._send(200, b"", "text/event-stream")
            return
        raw = self.headers.get("last-event-id")
        last_event_id = None
        if raw:  # an EventSource reconnecting: first what it missed, from the history
            if not re.fullmatch(r"[0-9]{1,18}", raw):
                raise HttpError(400, f"Last-Event-ID: expected the id of an event, got {raw[:40]!r}")
            last_event_id = int(raw)
        subscriber = self.app.feed.subscribe(last_event_id)
        if subscriber is None:
            raise HttpError(429, f"every /events slot is taken (AUTOHEAL_MAX_EVENT_LISTENERS="
                                 f"{self.app.config.max_event_listeners})", {"Retry-After": "10"})
        self.close_connection = True
        self.out = self._head(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store")])
        self.out += b": connected\n\n"
        self.stream = subscriber


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

def send_parts(sock: socket.socket, answer: Union[bytes, List[bytes]]) -> None:
    """sendall, for one buffer or several: several go out with sendmsg, in one system call when
    the socket takes them, without being copied into one first."""
    if isinstance(answer, bytes) or not hasattr(sock, "sendmsg"):
        sock.sendall(answer if isinstance(answer, bytes) else b"".join(answer))
        return
    parts = [memoryview(part) for part in answer if part]
    while parts:
        _drop_sent(parts, sock.sendmsg(parts[:512]))  # within IOV_MAX (1,024 on Linux)


def _drop_sent(views: List[memoryview], sent: int) -> None:
    """Take what a send took off the front of views."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views.pop(0))
        else:
            views[0] = views[0][sent:]
            sent = 0


def send_some(sock: socket.socket, parts: List[Any]) -> List[memoryview]:
    """Send what a non-blocking socket takes now (sendmsg: several parts in one system call,
    none copied into another); the parts not sent yet.  OSError when the client is gone."""
    views = [part if isinstance(part, memoryview) else memoryview(part) for part in parts if part]
    try:
        while views:
            _drop_sent(views, sock.sendmsg(views[:512]) if hasattr(sock, "sendmsg") else sock.send(views[0]))
    except (BlockingIOError, InterruptedError):
        pass
    return views


def simple_response(status: int, message: str) -> bytes:
    """A whole JSON error response, for refusals made before a request reaches a handler."""
    body = json.dumps({"ok": False, "error": message}).encode("utf-8")
    phrase = _STATUS_PHRASES.get(status, "Status")
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode("latin-1") + body


class _Pool:
    """One pool of POOLS: one worker thread from the start, more as work arrives, up to size,
    and kept.  A server that has not been asked for much has started few of them (each
    thread's stack and state count in an idle server's memory; 24 threads started for nothing,
    0.4 MiB).  When no more thread can be started (a limit of the system's), the work waits for
    the workers there are."""

    def __init__(self, name: str, size: int, work: Callable[["_Pool"], None]):
        self.name = name
        self.size = size
        self.threads: List[threading.Thread] = []
        self.tasks: "queue.SimpleQueue[Optional[Tuple[_Connection, bytes]]]" = queue.SimpleQueue()
        self._work = work
        self._lock = threading.Lock()
        self._backlog = 0  # tasks put, not taken yet
        self._idle = 0  # workers waiting for a task (or about to)
        with self._lock:
            self._start()  # the first: this one must start (a server that cannot start it does not serve)

    def put(self, task: Tuple["_Connection", bytes]) -> None:
        """Hand a task to a worker: a new one when every worker started is busy, up to size."""
        with self._lock:
            self._backlog += 1
            if self._backlog > self._idle and len(self.threads) < self.size:
                with contextlib.suppress(RuntimeError):  # "can't start new thread": the others take it
                    self._start()
        self.tasks.put(task)

    def _start(self) -> None:
        thread = threading.Thread(target=self._work, args=(self,), name=f"{self.name}-{len(self.threads)}",
                                  daemon=True)
        thread.start()
        self.threads.append(thread)

    def take(self) -> Optional[Tuple["_Connection", bytes]]:
        """A worker's next task (None: stop)."""
        with self._lock:
            self._idle += 1
        task = self.tasks.get()
        with self._lock:
            self._idle -= 1
            self._backlog -= task is not None
        return task

    def stop(self) -> List[threading.Thread]:
        """Tell every worker to stop; its threads, to join."""
        with self._lock:
            threads = list(self.threads)
        for _thread in threads:
            self.tasks.put(None)
        return threads


class _Connection:
    __slots__ = ("sock", "address", "buffer", "deadline", "continued", "closing", "unsent", "unsent_bytes",
                 "waiting", "into", "got", "leftovers")

    def __init__(self, sock: socket.socket, address: Any, deadline: float):
        self.sock = sock
        self.address = address
        self.buffer = b""
        self.deadline = deadline
        self.continued = False
        self.closing = False
        self.unsent: List[memoryview] = []  # what the socket did not take yet of its answer
        self.unsent_bytes = 0
        self.waiting = False  # its answer waits for its records' commit (an inline round)
        # A large request arriving: one buffer of its whole length, read into (got: the bytes in it).
        self.into: Optional[bytearray] = None
        self.got = 0
        # Not None: its answer is a large request's, made from these (its body and handler).  Once
        # it is sent they are freed and the collection the request owes runs (LargeRequests); once
        # the connection is dropped they are freed (_close: the loop that dropped it may hold it).
        self.leftovers: Any = None

    def read_into(self, buffer: bytes, length: int) -> int:
        """Read the rest of a large request into one buffer of its whole length, what came already
        first (receive): not joined from 64 KiB pieces once whole.  1.9 MB arrived in 30 reads,
        each into memory the heap had given back after the last storm, then was copied whole
        again (and twice more by partitioning the request line): 1,400 fresh pages before the
        request reached a worker, 500 now.  The bytes it adds to what the connection holds
        (Server._buffered)."""
        into = self.into = bytearray(length)
        into[:len(buffer)] = buffer
        self.got, self.buffer = len(buffer), b""
        return length - len(buffer)

    def receive(self) -> Tuple[bytes, int]:
        """What arrived and its size; a large request's goes straight into its buffer: (b"", size)."""
        if self.into is None:
            data = self.sock.recv(65536)
            return data, len(data)
        with memoryview(self.into) as view:
            size = self.sock.recv_into(view[self.got:])
        self.got += size
        return b"", size

    @property
    def client(self) -> str:
        """Its client's address, as requests name it."""
        return str(self.address[0]) if isinstance(self.address, tuple) else ""

    def let_go(self) -> bool:
        """Free what a large request's answer was made from, its answer sent or never to be (the
        connection dropped, or not the selector's to send): whether there was any."""
        if self.leftovers is None:
            return False
        self.leftovers = None
        LARGE_REQUESTS.answered()
        return True


class EventStreams:
    """The /events streams, each on a thread of its own once its answer's head is sent (their
    number is bounded by the feed's subscriptions: AUTOHEAL_MAX_EVENT_LISTENERS)."""

    def __init__(self, feed: EventFeed, heartbeat: float, timeout: float):
        self.feed = feed
        self.heartbeat = heartbeat
        self.timeout = timeout
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()  # workers add streams side by side

    def start(self, sock: socket.socket, subscriber: Subscriber, head: Union[bytes, List[bytes]]) -> None:
        thread = threading.Thread(target=self._stream, args=(sock, subscriber, head), name="events", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def threads(self) -> List[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def _stream(self, sock: socket.socket, subscriber: Subscriber, head: Union[bytes, List[bytes]]) -> None:
        """Send the answer's head, then each new event as one Server-Sent Event (its history id as
        the SSE id) until the client goes away, or stops reading for AUTOHEAL_REQUEST_TIMEOUT_SEC."""
        heartbeat = self.heartbeat
        last_sent = time.monotonic()
        try:
            sock.settimeout(self.timeout)
            send_parts(sock, head)
            while True:
                events = self.feed.events_after(subscriber, min(1.0, heartbeat))
                if events is None:
                    break
                if events:
                    sock.sendall("".join(f"id: {event_id}\ndata: {text}\n\n" for event_id, text in events)
                                 .encode("utf-8"))
                    subscriber.cursor = events[-1][0]
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= heartbeat:
                    sock.sendall(b": heartbeat\n\n")
                    last_sent = time.monotonic()
                else:
                    # A client that went away frees its slot within a second, not at the next write.
                    sock.setblocking(False)
                    try:
                        if sock.recv(1024) == b"":
                            break
                    except (BlockingIOError, InterruptedError):
                        pass
                    finally:
                        sock.settimeout(self.timeout)
        except OSError:
            pass
        finally:
            self.feed.unsubscribe(subscriber)
            sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking socket listening on host:port (IPv6 for an address with a colon)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


class RoundCommitter:
    """Commits the records of the rounds of webhooks the selector thread answered itself, one
    round at a time and in order, on a thread of its own; each round committed (or not) goes to
    done, and wake tells the selector thread."""

    def __init__(self, journal: Journal, log: Callable[..., None], wake: Callable[[], None]):
        self.journal = journal
        self.log = log
        self.wake = wake
        self.done: collections.deque = collections.deque()  # (answered, committed), in order
        self._rounds: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="round-commit", daemon=True)
        self.thread.start()

    def hand(self, answered: List[Any], held: List[Any]) -> None:
        """The webhooks answered in one round of the selector wait for their records' commit (one
        for them all).  The selector thread makes it only when that waits on nobody; else this
        committer makes it: another program holding the state file's lock must not stop the
        server from reading connections.  Their answers are sent once it is done (deliver)."""
        try:
            done = self.journal.settle_now(held)
        except Exception as exc:  # no answer without its commit: the round's connections are dropped
            with contextlib.suppress(Exception):
                self.log({"event": "error", "message": f"round: {type(exc).__name__}: {exc}"}, "error")
            self.done.append((answered, False))
            return
        if done is None:  # it would wait (another commit, or another program's lock): the committer's
            self._rounds.put((answered, held))
        else:  # settled at once; a failed commit drops the round's connections: no answer without it
            self.done.append((answered, done))

    def deliver(self, send: Callable[..., None], drop: Callable[[Any], None], now: float) -> None:
        """Send the answers of the rounds committed (or drop their connections: not committed)."""
        while self.done:
            answered, committed = self.done.popleft()
            for connection, answer, close in answered:
                connection.waiting = False
                if connection.sock.fileno() < 0:
                    continue  # dropped meanwhile, to make room for a new connection
                if committed:
                    send(connection, answer, close, now)
                else:
                    drop(connection)

    def close(self) -> None:
        self._rounds.put(None)

    def _loop(self) -> None:
        while True:
            item = self._rounds.get()
            if item is None:
                return
            answered, held = item
            try:
                committed = self.journal.settle(held)
            except Exception as exc:  # no answer without its commit: the round's connections are dropped
                committed = False
                with contextlib.suppress(Exception):
                    self.log({"event": "error", "message": f"round: {type(exc).__name__}: {exc}"}, "error")
            self.done.append((answered, committed))
            del item, answered, held
            self.wake()


class Server:
    """The HTTP server: one selector thread gathers whole requests, a fixed pool handles them.

    A thread per connection (socketserver's ThreadingMixIn) lets slow or half-open clients
    hold threads without bound; a fixed pool reading sockets itself lets them hold every
    worker.  Here the selector thread reads all connections without blocking and hands a
    request to the pool only once it is whole (framed by frame_request), so the pool's
    threads count requests being handled, never connections still sending one.  Workers
    parse the request from memory (parse_request) and answer it (Handler); the answer goes back
    to the selector thread, which writes what the socket takes (one sendmsg, most often all of
    it) and the rest when the socket is writable again: a client that never reads its answers
    costs a connection and a bounded buffer, never a worker: it gets no further answer before
    the last is out, and is dropped at its deadline (autoheal_connections_dropped_total).  The
    request is parsed here rather than by http.server because
    http.server imports http.client, email and ssl: measured, about 45 ms of start-up and 8 MiB
    of memory, most of the budget of issue 8, and a sixth of the CPU of each webhook.
    Every connection has a deadline: a request must arrive whole within
    AUTOHEAL_REQUEST_TIMEOUT_SEC of the connection going idle, else it is dropped; idle
    keep-alive connections close the same way.  Past AUTOHEAL_MAX_CONNECTIONS, the connection
    idle the longest is dropped to make room, so a flood cannot lock out Alertmanager.
    /events streams leave the pool for threads of their own (AUTOHEAL_MAX_EVENT_LISTENERS).

    One kind of request skips the pool: a webhook of at most INLINE_MAX_BYTES while nothing
    can run (dry-run mode or the master switch off, no etcd to ask).  Judging it waits on
    nothing, so the selector thread answers it itself; every such webhook read in one round of
    the selector is committed together, and the answers are sent after that commit
    (RoundCommitter.hand: by the selector thread when that waits on nobody, else by the
    committer's thread).  Handing each one to a worker and the worker's records to the writer
    thread cost more than judging it: measured with 16 connections on one core, about 5,500
    webhooks a second that way and 9,500 this way, p99 9.5 against 3.5 ms.
    """

    def __init__(self, app: App, host: str, port: int):
        self.app = app
        self.config = app.config
        self.socket = listener = listening_socket(host, port)
        self.server_address = listener.getsockname()[:2]
        self.port = self.server_address[1]
        self.stopping = False
        self._accept_paused_until = 0.0
        self.max_connections, self.fd_warning = connection_limit(self.config)
        self._stop_requested = threading.Event()
        self.served = 0  # counts each request begun, and each a worker ended: what App.housekeeping watches
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._connections: Dict[int, _Connection] = {}
        # Bytes held in incomplete requests across all connections: bounded, so that many
        # clients each sending most of a large body cannot exhaust memory together.
        self._buffered = 0
        self._buffered_limit = max(16 << 20, 8 * self.config.max_body_bytes)
        self._returned: collections.deque = collections.deque()
        self._round: List[Tuple[_Connection, Any, bool]] = []  # answered here, sent once committed
        # Bytes of answers waiting for clients to read them, across all connections: bounded, so
        # that clients that never read cannot exhaust memory together (one answer each at most).
        self._unsent = 0
        self._unsent_limit = max(64 << 20, 8 * self.config.max_body_bytes)
        # The pools of POOLS, chosen by the route (Route.pool).
        self._pools = {name: _Pool(name, size, self._work) for name, size in pool_sizes(self.config).items()}
        self._busy = 0
        self._busy_changed = threading.Condition()
        self.streams = EventStreams(app.feed, self.config.events_heartbeat_sec, self.config.request_timeout_sec)
        self._stopped = threading.Event()
        self.rounds = RoundCommitter(app.journal, app.log, self._wake)

    # -- the selector thread --------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept and read until stop() is called."""
        next_sweep = time.monotonic() + 0.5
        threading.Thread(target=housekeeping, args=(self.app, lambda: self.served, self._stop_requested),
                         name="memory", daemon=True).start()
        try:
            while not self._stop_requested.is_set():
                for key, mask in self._selector.select(timeout=0.1 if self._accept_paused_until else 0.5):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    elif mask & selectors.EVENT_WRITE:
                        self._write(key.data)
                    else:
                        self._read(key.data)
                while self._round:  # answering may read a pipelined request: a round of its own
                    answered, self._round = self._round, []
                    self.rounds.hand(answered, self.app.journal.take_held())
                    self.rounds.deliver(self._send_answer, self._close, time.monotonic())
                now = time.monotonic()
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._selector.register(self.socket, selectors.EVENT_READ, "accept")
                if now >= next_sweep:
                    next_sweep = now + 0.5
                    for connection in [c for c in self._connections.values() if c.deadline <= now]:
                        if connection.unsent:  # a client that does not read its answers
                            self.app.counters.add("autoheal_connections_dropped_total", ("unread_answer",))
                        self._close(connection)
        finally:
            self.stopping = True
            if not self._accept_paused_until:
                self._selector.unregister(self.socket)
            self.socket.close()
            for connection in list(self._connections.values()):
                self._close(connection)
            self._stopped.set()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of file descriptors (EMFILE): the pending connection stays in the backlog and
                # the socket stays readable, so retrying at once would spin.  Make room by dropping
                # the longest-idle connection, and stop accepting for a moment.
                if self._connections:
                    self._close(min(self._connections.values(), key=lambda c: c.deadline))
                self._selector.unregister(self.socket)
                self._accept_paused_until = time.monotonic() + 0.1
                return
            if len(self._connections) + self._busy >= self.max_connections:
                if self._connections:
                    self._close(min(self._connections.values(), key=lambda c: c.deadline))
                else:
                    sock.close()
                    continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            connection = _Connection(sock, address, time.monotonic() + self.config.request_timeout_sec)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> None:
        try:
            data, size = connection.receive()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if not size:
            self._close(connection)
            return
        if connection.closing:
            return  # refused already: read and drop until the client closes or the deadline
        into = connection.into
        if into is not None:  # a large request, counted in _buffered already
            if connection.got < len(into):
                return
            connection.buffer, connection.into, connection.got = into, None, 0  # whole: the request
        elif self._buffered + size > self._buffered_limit:
            self._close(connection)  # the server is holding too much unfinished input already
            return
        else:
            self._buffered += size
            connection.buffer += data
        self._try_dispatch(connection)

    def _try_dispatch(self, connection: _Connection) -> None:
        if connection.waiting or connection.unsent:
            return  # the next request once this answer is out: answers go in order, one at a time
        buffer = connection.buffer
        if buffer[:1] in (b"\r", b"\n"):
            buffer = buffer.lstrip(b"\r\n")  # RFC 9112: ignore blank lines before a request
            self._buffered -= len(connection.buffer) - len(buffer)
            connection.buffer = buffer
        try:
            length = frame_request(buffer, self.config.max_body_bytes)
        except HttpError as exc:
            self._refuse(connection, exc)
            return
        if length <= 0:
            if -length - len(buffer) > 65536:  # a large body: into one buffer, counted whole at once
                if self._buffered - len(buffer) - length > self._buffered_limit:
                    self._close(connection)  # announced is held: a body sent or not, it is the same
                    return
                self._buffered += connection.read_into(buffer, -length)
            if not connection.continued and _EXPECT_CONTINUE.search(buffer, 0, MAX_HEAD_BYTES) and (
                    _HEAD_END.search(buffer, 0, MAX_HEAD_BYTES + 4)):
                # curl and others wait for this before sending a body (RFC 9110 10.1.1).
                connection.continued = True
                try:
                    connection.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
            return
        connection.continued = False
        request = buffer if length == len(buffer) else buffer[:length]  # a large one's buffer is not copied
        # The route decides the pool, whatever form its target takes.  Anything unknown is only
        # refused, which waits on nothing; a method a quick route does not take is refused too.
        # From the request line alone: partitioning the whole request copied a storm's 1.9 MB twice.
        _method, _, rest = request[:MAX_REQUEST_LINE + 2].partition(b" ")
        path = route_path(rest.partition(b" ")[0].decode("latin-1"))
        route = ROUTES[path] if path is not None else None
        if route is not None and route.inline and length <= INLINE_MAX_BYTES and self.app.coordination is None:
            settings = self.app.effective()
            if not settings.executes:  # nothing will run: answered here (see the class)
                self._buffered -= length
                connection.buffer = buffer[length:]
                if not self._round:
                    self.app.journal.hold()
                try:
                    answer, handler = self._respond(connection, request, settings)
                except Exception as exc:  # the selector thread must survive whatever one request does
                    self.app.log({"event": "error", "message": f"selector: {type(exc).__name__}: {exc}"}, "error")
                    answer, handler = simple_response(500, "internal error; autoheal's log has the details"), None
                connection.waiting = True
                self._round.append((connection, answer, handler is None or handler.close_connection))
                return
        # The connection leaves the selector with whatever it holds; counted again on return.
        self._buffered -= len(buffer)
        connection.buffer = buffer[length:] if length < len(buffer) else b""
        self._leave(connection)
        self._pools["quick" if route is None else route.pool].put((connection, request))

    def _leave(self, connection: _Connection) -> None:
        """A connection goes to a worker: out of the selector until the worker returns it."""
        self._selector.unregister(connection.sock)
        del self._connections[connection.sock.fileno()]
        with self._busy_changed:
            self._busy += 1

    def _send_answer(self, connection: _Connection, answer: Union[bytes, List[bytes]], close: bool, now: float) -> None:
        """Send an answer, from the selector thread: what the socket does not take now waits for
        it to be writable (EVENT_WRITE), within the bounds of unsent output; then the next request."""
        connection.closing = close
        try:
            unsent = send_some(connection.sock, [answer] if isinstance(answer, bytes) else answer)
        except OSError:
            self._close(connection)
            return
        if not unsent:
            self._after_answer(connection, now)
            return
        # Only what is left is kept: a view of the rest would keep the whole answer alive (a 4 MiB
        # /history answer of which the kernel took most is then 4 MiB held, not what is unsent).
        unsent = [memoryview(bytes(view)) for view in unsent]
        size = sum(len(view) for view in unsent)
        if self._unsent + size > self._unsent_limit:  # too much output waits for clients that do not read
            self.app.counters.add("autoheal_connections_dropped_total", ("unsent_output_bound",))
            self._close(connection)
            return
        connection.unsent, connection.unsent_bytes = unsent, size
        self._unsent += size
        connection.deadline = now + self.config.request_timeout_sec
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)

    def _write(self, connection: _Connection) -> None:
        """The socket takes more of an answer: send it; once all is sent, the next request."""
        try:
            unsent = send_some(connection.sock, connection.unsent)
        except OSError:
            self._close(connection)
            return
        size = sum(len(view.obj) for view in unsent)  # what the parts left still hold in memory
        now = time.monotonic()
        if sum(map(len, unsent)) < sum(map(len, connection.unsent)):  # progress: the client reads
            connection.deadline = now + self.config.request_timeout_sec
        self._unsent -= connection.unsent_bytes - size
        connection.unsent, connection.unsent_bytes = unsent, size
        if not unsent:
            self._selector.modify(connection.sock, selectors.EVENT_READ, connection)
            self._after_answer(connection, now)

    def _after_answer(self, connection: _Connection, now: float) -> None:
        """An answer is all sent: read the next request, or close gracefully.  After a storm's
        answer, what it was made from is freed and the full collection it owes runs (LargeRequests):
        its memory goes back now, not at the next quiet moment, and not before the answer went
        (freeing and the collector hold the interpreter)."""
        if connection.let_go():
            LARGE_REQUESTS.collect_owed(trim=True)
        if connection.closing or self.stopping:
            self._linger(connection, now)
            return
        connection.deadline = now + self.config.request_timeout_sec
        if connection.buffer:
            self._try_dispatch(connection)  # a pipelined request already waiting

    def _linger(self, connection: _Connection, now: float) -> None:
        """Close after an answer, gracefully: unread input must not reset the answer away."""
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)
            return
        self._drop_input(connection)
        connection.closing = True
        connection.deadline = min(connection.deadline, now + 2.0)

    def _refuse(self, connection: _Connection, error: HttpError) -> None:
        """Answer a framing error and close gracefully.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        answer before the client reads it; so the answer is sent, the sending side shut, and the
        rest of the input read and dropped for a moment (as web servers' lingering close does).
        """
        self._rejected(connection.buffer, error, connection.client)
        try:
            connection.sock.send(simple_response(error.status, error.message))
        except OSError:
            self._close(connection)
            return
        self._linger(connection, time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        now = time.monotonic()
        while self._returned:  # back from a worker, its answer partly sent (or not at all)
            connection, answer = self._returned.popleft()
            self._buffered += len(connection.buffer)
            self._connections[connection.sock.fileno()] = connection
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
            self._send_answer(connection, answer, connection.closing, now)
        self.rounds.deliver(self._send_answer, self._close, now)

    def _drop_input(self, connection: _Connection) -> None:
        """Forget a connection's unread input (a large body's buffer too, counted whole)."""
        self._buffered -= len(connection.buffer) + len(connection.into or b"")
        connection.buffer, connection.into, connection.got = b"", None, 0

    def _close(self, connection: _Connection) -> None:
        self._drop_input(connection)
        self._unsent -= connection.unsent_bytes
        connection.let_go()  # a large request's answer that will never go
        connection.unsent, connection.unsent_bytes = [], 0
        fileno = connection.sock.fileno()
        if self._connections.get(fileno) is connection:
            del self._connections[fileno]
            try:
                self._selector.unregister(connection.sock)
            except (KeyError, ValueError):
                pass
        connection.sock.close()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except OSError:
            pass

    # -- the workers ----------------------------------------------------------------------

    def _work(self, pool: _Pool) -> None:
        """A worker answers whole requests and hands each answer to the selector thread, which
        writes what the socket takes: a client that does not read its answers never holds one."""
        while True:
            task = pool.take()
            if task is None:
                return
            connection, request = task
            large = len(request) >= TRIM_AFTER_BYTES
            if large:
                LARGE_REQUESTS.begin()
            answer: Any = None
            handler: Optional[Handler] = None
            try:
                try:
                    answer, handler = self._respond(connection, request)
                finally:
                    if large:  # before the answer goes: the selector collects and frees once it is sent
                        LARGE_REQUESTS.end()
                        connection.leftovers = (request, handler)  # its body, alerts and decisions
                connection.closing = handler is None or handler.close_connection
                if handler is not None and handler.stream is not None:
                    self.streams.start(connection.sock, handler.stream, answer)  # its thread sends it all
                    answer = None
            except Exception as exc:  # a worker must survive whatever one request does
                self.app.log({"event": "error", "message": f"worker: {type(exc).__name__}: {exc}"}, "error")
                answer = simple_response(500, "internal error; autoheal's log has the details")
                connection.closing = True
            # An idle worker must not keep its last request alive (its handler holds it, and its
            # answer): a storm's is megabytes, and each of the pool's workers would keep one.
            del task, request, handler
            if answer is None or self.stopping:  # its answer is not the selector's to send (a stream)
                connection.let_go()
            if answer is not None and not self.stopping:
                self._returned.append((connection, answer))
                self._wake()
            elif answer is not None:  # shutting down, the selector gone: the answer still goes out
                with contextlib.suppress(OSError):
                    connection.sock.settimeout(min(5.0, self.config.request_timeout_sec))
                    send_parts(connection.sock, answer)
                connection.sock.close()
            del connection, answer
            self.served += 1  # ended: a quiet moment counts from here, not from its start
            with self._busy_changed:
                self._busy -= 1
                self._busy_changed.notify_all()

    def _rejected(self, raw: bytes, error: HttpError, client: str) -> None:
        """Log and count a request refused before it reached a handler, by its request line."""
        words = raw.partition(b"\n")[0].split(b" ")
        target = words[1].decode("latin-1") if len(words) > 1 else ""
        self.app.rejected(words[0][:20].decode("latin-1"), route_path(target), error.status, error.message, client)

    def _respond(self, connection: _Connection, raw: bytes,
                 settings: Optional[Settings] = None) -> Tuple[Union[bytes, List[bytes]], Optional["Handler"]]:
        """The answer to one whole request, and its handler (None: the request did not parse)."""
        self.served += 1  # for App.housekeeping; a lost increment under a race only delays a trim
        client = connection.client
        try:
            request = parse_request(raw, client)
        except HttpError as exc:
            self._rejected(raw, exc, client)
            return simple_response(exc.status, exc.message), None
        handler = Handler(self, request, settings)
        return handler.handle(), handler

    # -- stopping -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask serve_forever to return; safe from a signal handler."""
        self._stop_requested.set()
        self._wake()

    def drain(self, grace: float) -> None:
        """After serve_forever returned: let in-flight requests finish, kill what outlives grace."""
        self._stopped.wait(5)
        deadline = time.monotonic() + grace
        with self._busy_changed:
            while self._busy and time.monotonic() < deadline:
                self._busy_changed.wait(deadline - time.monotonic())
            still_busy = self._busy
        if still_busy:
            killed = self.app.processes.kill_all()
            self.app.log({"event": "shutdown", "message": f"grace period over; killed {killed} running command(s)"},
                         "warning")
            with self._busy_changed:
                end = time.monotonic() + 5
                while self._busy and time.monotonic() < end:
                    self._busy_changed.wait(end - time.monotonic())
        workers = [thread for pool in self._pools.values() for thread in pool.stop()]
        self.rounds.close()
        self.app.feed.close()
        for thread in workers + [self.rounds.thread] + self.streams.threads():
            thread.join(timeout=2)
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()


_HEAP: List[Optional[Callable[[], Any]]] = []


def heap_trimmer() -> Optional[Callable[[], Any]]:
    """glibc's malloc_trim(0), through ctypes, once glibc is told to keep at most two malloc
    arenas (M_ARENA_MAX): by default each new thread gets one of its own, up to 8 per core, and
    each keeps what it once held (MALLOC_ARENA_MAX=2 from outside did the same, for the image
    only).  glibc fixes its limit while the first threads make their arenas, so main asks here
    before any thread starts (asked later, it changed nothing: measured).  None where there is
    no glibc (musl, macOS) or no ctypes."""
    if not _HEAP:
        _HEAP.append(_heap_trimmer())
    return _HEAP[0]


def _heap_trimmer() -> Optional[Callable[[], Any]]:
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (ImportError, OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(-8, 2)  # M_ARENA_MAX, from malloc.h
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def connection_limit(config: Config) -> Tuple[int, Optional[str]]:
    """AUTOHEAL_MAX_CONNECTIONS, kept below the file-descriptor limit (RLIMIT_NOFILE), with a
    warning when it had to be lowered.  The soft limit is raised toward the hard one first."""
    import resource

    # Besides connections: the workers' sockets in flight, /events streams, SQLite, the pipes of
    # running commands, outgoing calls, and some to spare.
    reserve = sum(pool_sizes(config).values()) + config.max_event_listeners \
        + 2 * config.max_concurrent_actions + 64
    wanted = config.max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return config.max_connections, None
    limit = max(8, soft - reserve)
    return limit, (f"AUTOHEAL_MAX_CONNECTIONS={config.max_connections} does not fit the file-descriptor limit "
                   f"(ulimit -n {soft}); serving at most {limit} connections")


def make_server(app: App, host: Optional[str] = None, port: Optional[int] = None) -> Server:
    """A listening server for app (port 0: any free port, see server.port)."""
    return Server(app, app.config.host if host is None else host, app.config.port if port is None else port)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


CONTRACT_SERIES = ("autoheal_enabled", "autoheal_actions_total", "autoheal_action_last_timestamp",
                   "autoheal_cooldown_remaining_seconds")
SMOKE_ALERTNAME = "AutohealSmokeTest"


def smoke(args: List[str], env: Mapping[str, str]) -> int:
    """--smoke: check a live deployment, one PASS/FAIL line per check; 0 only if every check passed.

    It never runs an action nor touches a cooldown: its webhook carries an alertname that is not
    in the action map, and its silence is for a label set of its own, expired before it ends.
    """
    import urllib.parse

    options = {"--url": None, "--alertmanager": None, "--prometheus": None}
    words = list(args)
    while words:
        word = words.pop(0)
        name, _, value = word.partition("=")
        if name not in options or (not value and not words):
            print(f"error: --smoke takes --url URL, --alertmanager URL, --prometheus URL; got {word!r}", file=sys.stderr)
            return 2
        options[name] = (value or words.pop(0)).rstrip("/")
    base = options["--url"] or f"http://127.0.0.1:{env.get('AUTOHEAL_PORT', str(DEFAULT_PORT)).strip()}"
    # Without an Alertmanager URL of its own the smoke test asks the instance, which knows its own.
    alertmanager_url = options["--alertmanager"] or env.get("ALERTMANAGER_URL") or None
    outcomes: List[bool] = []

    def report(passed: bool, check: str, detail: str) -> bool:
        print(f"{'PASS' if passed else 'FAIL'} {check}: {detail}", flush=True)
        outcomes.append(passed)
        return passed

    def get_json(url: str) -> Any:
        status, raw = http_request("GET", url)
        if status != 200:
            raise OSError(f"GET {url} answered {status}: {raw[:200].decode('utf-8', 'replace')}")
        return json.loads(raw.decode("utf-8"))

    status: Dict[str, Any] = {}
    try:
        status = get_json(base + "/")
        report(status.get("status") == "ok", "status", f"{base}/ answered status={status.get('status')!r}, "
               f"mode={status.get('mode')}, enabled={status.get('enabled')}, dry_run={status.get('dry_run')}, "
               f"{len(status.get('actions') or [])} actions")
        coordination = status.get("coordination")
        if coordination is not None:  # replicas: no action can run while etcd does not answer
            report(bool(coordination.get("up")), "etcd",
                   f"replica {coordination.get('replica')!r} " + ("reaches etcd" if coordination.get("up") else
                   f"cannot reach etcd, so no action runs (mode halted): {coordination.get('error')}"))
    except OSError as exc:
        report(False, "status", f"{base}/: autoheal {describe_failure(exc, 5)}")
    except ValueError as exc:
        report(False, "status", f"{base}/: {exc}")

    try:
        code, raw = http_request("GET", base + "/metrics")
        families = {line.split()[2] for line in raw.decode("utf-8", "replace").splitlines() if line.startswith("# TYPE ")}
        missing = [name for name in CONTRACT_SERIES if name not in families]
        names = status.get("actions") or []
        text = raw.decode("utf-8", "replace")
        unseen = [name for name in names if f'autoheal_cooldown_remaining_seconds{{alertname="{name}"}}' not in text]
        report(code == 200 and not missing and not unseen, "metrics",
               f"{len(CONTRACT_SERIES) - len(missing)}/{len(CONTRACT_SERIES)} contract series"
               + (f", missing {', '.join(missing)}" if missing else "")
               + (f", no series for {', '.join(unseen)}" if unseen else f", every one of {len(names)} actions present"))
    except OSError as exc:
        report(False, "metrics", f"{base}/metrics: autoheal {describe_failure(exc, 5)}")

    if options["--prometheus"]:
        prometheus = options["--prometheus"]
        try:
            found = {}
            for query in ("autoheal:cooldown_active", "autoheal:actions:rate_5m", 'up{job="autoheal"}'):
                answer = get_json(prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": query}))
                found[query] = answer.get("data", {}).get("result", [])
            up = [sample["value"][1] for sample in found['up{job="autoheal"}']]
            report(bool(found["autoheal:cooldown_active"]) and bool(found["autoheal:actions:rate_5m"]) and "1" in up,
                   "prometheus", f"autoheal:cooldown_active {len(found['autoheal:cooldown_active'])} series, "
                   f"autoheal:actions:rate_5m {len(found['autoheal:actions:rate_5m'])} series, "
                   f"up{{job=\"autoheal\"}} = {','.join(up) or 'absent'}")
        except (OSError, ValueError, AttributeError) as exc:
            report(False, "prometheus", f"{prometheus}: {exc}")

    report(*_smoke_ack(base, alertmanager_url, env))

    overrides = status.get("overrides") or []
    report(True, "overrides", "; ".join(f"#{o['id']} {o['setting']}{' ' + o['alertname'] if o.get('alertname') else ''}"
                                        f" = {json.dumps(o['value'])} by {o['by']}"
                                        + (f" until {o['until']}" if o.get("until") else "") for o in overrides)
           or "none: the environment is in force")

    cooldowns = status.get("cooldowns") or {}
    report(bool(cooldowns) and set(cooldowns) == set(status.get("actions") or []), "cooldowns", ", ".join(
        f"{name} {format_value(value.get('cooldown_seconds', 0))}s"
        f" (remaining {format_value(round(value.get('remaining_seconds', 0)))}s)" for name, value in sorted(cooldowns.items()))
        or "the instance reports none")

    if SMOKE_ALERTNAME in (status.get("actions") or []):
        report(False, "webhook", f"{SMOKE_ALERTNAME} has an action here; the smoke test will not send it")
    else:
        payload = {"version": "4", "status": "firing", "receiver": "autoheal-smoke", "alerts": [{
            "status": "firing", "labels": {"alertname": SMOKE_ALERTNAME}, "annotations": {"autoheal": "true"},
            "startsAt": format_rfc3339(time.time()), "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "smoke"}]}
        headers = {"Content-Type": "application/json"}
        if env.get("AUTOHEAL_WEBHOOK_TOKEN"):
            headers["Authorization"] = f"Bearer {env['AUTOHEAL_WEBHOOK_TOKEN']}"
        try:
            code, raw = http_request("POST", base + "/alert", json.dumps(payload).encode("utf-8"), headers)
            if code == 401:
                raise ValueError("/alert answered 401: set AUTOHEAL_WEBHOOK_TOKEN to the instance's webhook token")
            results = json.loads(raw.decode("utf-8")).get("results") if code == 200 else None
            result = results[0] if results else {}
            report(result.get("result") == "skipped" and result.get("reason") == "not_allowlisted", "webhook",
                   f"{SMOKE_ALERTNAME} answered {code} " + (f"{result.get('result')}/{result.get('reason')}" if result
                                                            else raw[:200].decode("utf-8", "replace")))
        except (OSError, ValueError, AttributeError) as exc:
            report(False, "webhook", f"{base}/alert: {exc}")

    print(f"{sum(outcomes)} passed, {len(outcomes) - sum(outcomes)} failed")
    return 0 if all(outcomes) else 1


def _smoke_ack(base: str, alertmanager_url: Optional[str], env: Mapping[str, str]) -> Tuple[bool, str, str]:
    """The ack round trip: create a silence through /ack, find it again, expire it through /ack/undo.

    The instance is asked twice: a second /ack answering "existing" with the same id proves
    that Alertmanager holds that silence, active, with exactly these matchers.  Only with an
    Alertmanager URL of its own (--alertmanager or ALERTMANAGER_URL) does the smoke test also
    read the silence there.  The undo goes through the instance, which knows its Alertmanager,
    so the silence is expired whatever failed on the way.
    """
    import urllib.parse

    labels = {"alertname": SMOKE_ALERTNAME, "smoke_run": os.urandom(6).hex()}
    query = {"labels": json.dumps(labels), "duration": "5m", "comment": "autoheal --smoke round trip"}
    token = {"token": env["AUTOHEAL_ACK_TOKEN"]} if env.get("AUTOHEAL_ACK_TOKEN") else {}
    silence_id = None
    expired = False

    def ack() -> Dict[str, Any]:
        code, raw = http_request("GET", base + "/ack?" + urllib.parse.urlencode({**query, **token}),
                                 headers={"User-Agent": "autoheal-smoke"})
        answer = decode_answer(raw)
        if code == 403:
            raise ValueError("/ack answered 403: set AUTOHEAL_ACK_TOKEN to the instance's ack token")
        if code != 200 or not isinstance(answer, dict):
            raise ValueError(f"/ack answered {code}: {answer_reason(answer) if answer else ''}")
        return answer

    def undo() -> int:
        code, _raw = http_request("POST", base + "/ack/undo", urllib.parse.urlencode(
            {"silence_id": silence_id, **token}).encode("ascii"), {"Content-Type": "application/x-www-form-urlencoded"})
        return code

    try:
        first = ack()
        silence_id = first["silence_id"]
        again = ack()
        if (again.get("outcome"), again.get("silence_id")) != ("existing", silence_id):
            return False, "ack", f"a second /ack answered {again.get('outcome')} {again.get('silence_id')}, " \
                                 f"not the silence {silence_id} it created"
        seen = "found again through the instance"
        if alertmanager_url:
            stored = AlertmanagerClient(alertmanager_url, 5).get_silence(silence_id)
            if matcher_key(stored.get("matchers") or []) != matcher_key(matchers_for(labels)):
                return False, "ack", f"silence {silence_id} in Alertmanager has other matchers"
            seen += f" and in Alertmanager at {alertmanager_url}"
        code = undo()
        expired = code == 200
        return expired, "ack", f"silence {silence_id} created through /ack, {seen}, undo answered {code}"
    except OSError as exc:
        return False, "ack", f"round trip through {base}/ack: autoheal {describe_failure(exc, 5)}"
    except PeerError as exc:
        return False, "ack", f"silence {silence_id} created through /ack, but {exc}"
    except (ValueError, KeyError, AttributeError) as exc:
        return False, "ack", f"round trip through {base}/ack: {exc}"
    finally:
        if silence_id and not expired:
            try:  # nothing is left behind, whatever failed above
                undo()
            except OSError:
                pass


def control_cli(args: List[str], env: Mapping[str, str]) -> int:
    """--control "<command>" [--reason TEXT] [--by NAME] [--url URL]: one command to the running
    instance (recorded with source "cli"), its answer printed for people; 0 when applied (or
    status and help), 1 when refused, 2 on misuse."""
    words = list(args)
    options: Dict[str, Optional[str]] = {"--reason": None, "--url": None, "--by": None}
    text = None
    while words:
        word = words.pop(0)
        name, equals, value = word.partition("=")
        if name in options and (equals or words):
            options[name] = value if equals else words.pop(0)
        elif text is None and not word.startswith("--"):
            text = word
        else:
            print(f'error: --control takes "<command>" [--reason TEXT] [--by NAME] [--url URL]; got {word!r}',
                  file=sys.stderr)
            return 2
    token = env.get("AUTOHEAL_ADMIN_TOKEN")
    if not token:
        print("error: set AUTOHEAL_ADMIN_TOKEN to the instance's admin token", file=sys.stderr)
        return 2
    base = (options["--url"] or f"http://127.0.0.1:{env.get('AUTOHEAL_PORT', str(DEFAULT_PORT)).strip()}").rstrip("/")
    body = {"command": text or "", "by": options["--by"] or env.get("USER") or "admin", "source": "cli"}
    if options["--reason"]:
        body["reason"] = options["--reason"]
    try:
        status, raw = http_request("POST", base + "/control", json.dumps(body).encode("utf-8"),
                                   {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}, timeout=10)
    except OSError as exc:
        print(f"error: autoheal at {base} {describe_failure(exc, 10)}", file=sys.stderr)
        return 1
    answer = decode_answer(raw)
    if status != 200 or not isinstance(answer, dict):
        why = answer.get("error") if isinstance(answer, dict) else answer
        print(f"refused ({status}): {why}", file=sys.stderr)
        return 1
    if answer.get("change"):
        print(answer.get("text", ""))
        print(describe_settings(answer["status"]))
    else:
        print(answer.get("text", ""))
    return 0


def notify_test(env: Mapping[str, str]) -> int:
    """--notify-test: one test message to each channel; each channel's answer printed (by its
    name: the URLs are secrets); exit 0 only when every channel took it."""
    try:
        config = Config.from_env(env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    channels = channels_of(config)
    if not channels:
        print("error: no channel to test: set AUTOHEAL_NOTIFY_SLACK_URL or AUTOHEAL_NOTIFY_WEBHOOK_URLS",
              file=sys.stderr)
        return 2
    text = (f"autoheal {__version__} on {config.replica}: a test message (--notify-test). If you read this, "
            f"autoheal's notifications reach you. Its page: {config.public_url}")
    event = make_event("control", time.time(), result="applied", source="cli", by="--notify-test", command="test")
    failed = 0
    for channel in channels:
        body = {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(text)}}]}
        error = Notifier.post(channel, body if channel.slack else {"text": text, "event": event})
        print(f"{channel.name}: {'took it' if error is None else 'NOT taken: ' + error}")
        failed += error is not None
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None, detach: bool = False) -> Optional[int]:
    """Run autoheal; returns the process exit status.  detach (python3 autoheal.py): once the
    server is listening, return None and serve when the script has ended (see the end)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    if args[:1] == ["--version"]:
        print(f"autoheal {__version__}")
        return 0
    if args[:1] == ["--check"]:
        return check(os.environ)
    if args[:1] == ["--smoke"]:
        return smoke(args[1:], os.environ)
    if args[:1] == ["--control"]:
        return control_cli(args[1:], os.environ)
    if args[:1] == ["--notify-test"]:
        return notify_test(os.environ)
    if args:
        print(f"error: unknown argument {args[0]!r}; see --help", file=sys.stderr)
        return 2
    heap_trimmer()  # before the first thread: see there
    try:
        config = Config.from_env(os.environ)
        app = App(config, env=os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        server = make_server(app)
    except OSError as exc:
        print(f"error: AUTOHEAL_HOST/AUTOHEAL_PORT: cannot listen on {config.host}:{config.port}: {exc}",
              file=sys.stderr)
        app.close()
        return 2

    def request_stop(signum: int, _frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # What this instance will do, in one line; tokens only as set or not.
    app.log({"event": "started", "version": __version__, "host": server.server_address[0], "port": server.port,
             "enabled": config.enabled, "dry_run": config.dry_run, "alertmanager_url": config.alertmanager_url,
             "public_url": config.public_url, "webhook_token_set": config.webhook_token is not None,
             "ack_token_set": config.ack_token is not None, "admin_token_set": config.admin_token is not None,
             "slack_signing_secret_set": config.slack_signing_secret is not None,
             "notify": {"channels": [channel.name for channel in app.notifier.channels],
                        "outbox": "state file" if app.store.persistent else "memory only: lost at a restart"}
             if app.notifier else None,
             "state_file": config.state_file if app.store.persistent else None,
             "etcd": {"endpoints": list(config.etcd_endpoints), "prefix": config.etcd_prefix, "replica": config.replica,
                      "user": config.etcd_user, "password_set": config.etcd_password is not None,
                      "ca_file": config.etcd_ca_file, "cert_file": config.etcd_cert_file,
                      "coordination_up": app.coordination.up if app.coordination else None}
             if config.etcd_endpoints else None,
             "actions": [{"alertname": action.alertname, "command": action.display,
                          "cooldown_seconds": action.cooldown_sec} for action in app.actions.values()]})
    if server.fd_warning:
        app.log({"event": "warning", "message": server.fd_warning}, "warning")
    if config.webhook_token is None and not is_loopback(config.host):
        app.log({"event": "warning", "message": f"listening on {config.host} beyond loopback without "
                 "AUTOHEAL_WEBHOOK_TOKEN: anyone who reaches this port can post alerts"}, "warning")

    def serve() -> None:
        server.serve_forever()
        server.drain(config.shutdown_grace_sec)
        app.close()
        app.log({"event": "stopped"})

    if not detach:
        serve()
        return 0

    def serve_then_exit() -> None:  # with the exit status an exception in serve() would have given
        try:
            serve()
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)

    import atexit

    atexit.register(serve_then_exit)
    return None


def bytecode_hand_over() -> None:
    """Started as a script (python3 autoheal.py, no arguments: the server), become the module
    loaded from its bytecode cache: the same interpreter, its flags and sys.path (this file's
    folder first), exec'd in place (the same process id).  Returns, doing nothing, where that
    cache can be neither read nor written.

    Why: CPython compiles a script in full to run it, and what the compiler frees stays
    scattered among what it made: 2-3 MiB resident for good, measured.  Loaded from bytecode,
    the module is laid out densely.  The price is one more interpreter start and the module's
    import from bytecode (30-50 ms in all) on top of the compile that already happened."""
    import importlib.util

    source = os.path.abspath(__file__)
    module = os.path.splitext(os.path.basename(source))[0]  # the file's name: autoheal, or a copy's
    if __spec__ is not None or not module.isidentifier() or module in getattr(sys, "stdlib_module_names", ()):
        return  # python -m autoheal runs from its bytecode already
    try:
        cache = importlib.util.cache_from_source(source)
    except NotImplementedError:  # no bytecode cache in this Python (sys.implementation.cache_tag)
        return
    try:
        with open(cache, "rb") as file:
            head = file.read(16)
        stat = os.stat(source)
        fresh = (head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == bytes(4)
                 and int.from_bytes(head[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
                 and int.from_bytes(head[12:16], "little") == stat.st_size & 0xFFFFFFFF)
    except OSError:  # none yet, or not readable
        fresh = False
    folder = os.path.dirname(cache)
    writable = not sys.dont_write_bytecode and (
        os.access(folder, os.W_OK) if os.path.isdir(folder) else os.access(os.path.dirname(folder), os.W_OK))
    if not (fresh or writable) or not sys.executable or not sys.path or sys.path[0] != os.path.dirname(source):
        return
    import subprocess

    flags = getattr(subprocess, "_args_from_interpreter_flags", None)  # -O, -X ..., -W ...: as given
    if flags is None:
        return
    # -c puts '' (the working folder) first on sys.path: this file's folder takes its place.
    code = (f"import sys; sys.path[0:1 if sys.path[:1] == [''] else 0] = [{sys.path[0]!r}]; "
            f"import {module} as autoheal; raise SystemExit(autoheal.main([]))")
    try:
        os.execv(sys.executable, [sys.executable, *flags(), "-c", code])
    except OSError:
        return


if __name__ == "__main__":
    if not sys.argv[1:]:  # the server; the short commands (--check, --control, ...) stay as they are
        bytecode_hand_over()
    # Run as a script, CPython keeps the file's whole syntax tree (about 11 MiB here) until the
    # script's code returns.  So the script returns once the server listens, and the main thread
    # serves from an exit handler: the first thing the interpreter does after the script (every
    # thread of autoheal is a daemon), with everything still in place, signals included.
    # (python3 -m autoheal frees the tree after compiling; it loses nothing by this.)
    status = main(detach=True)
    if status is not None:
        raise SystemExit(status)
