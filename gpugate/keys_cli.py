"""`gpugate keys …`: API keys managed through the admin API (`/admin/keys`), so that every
change is validated and audited in one place. The API is `--url` (default
`http://GPUGATE_HOST:GPUGATE_PORT`), the admin key `GPUGATE_ADMIN_KEY`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from shared.budget import Budget
from shared.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    keys: argparse.ArgumentParser = sub.add_parser(
        "keys", help="create, list, change, rotate and revoke API keys"
    )
    keys.add_argument("--url", help="the gpugate API (default http://GPUGATE_HOST:GPUGATE_PORT)")
    verbs = keys.add_subparsers(dest="verb", required=True)

    create = verbs.add_parser("create", help="a new key (printed once)")
    create.add_argument("name")
    _limits(create)
    verbs.add_parser("list", help="every key, with its running jobs and budget use")
    show = verbs.add_parser("show", help="one key's record")
    show.add_argument("name")
    change = verbs.add_parser("set", help="change a key's limits (none, or clear: '')")
    change.add_argument("name")
    _limits(change)
    on_off = change.add_mutually_exclusive_group()
    on_off.add_argument("--disable", action="store_true", help="refuse the key until enabled")
    on_off.add_argument("--enable", action="store_true")
    rotate = verbs.add_parser("rotate", help="a new key (printed once); the old one stops")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=int, default=0, help="seconds the old key still works")
    revoke = verbs.add_parser("revoke", help="delete the key: refused from now on")
    revoke.add_argument("name")
    return keys


def _limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tier")
    parser.add_argument("--models", help="allowed models, names or patterns: llama3.2,qwen2.5:*")
    parser.add_argument("--max-running", help="its jobs running at once, fleet-wide")
    parser.add_argument("--budget", help="tokens per UTC period: 1000000/day|week|month")
    parser.add_argument("--expires", help="2027-01-01 or 2027-01-01T12:00:00Z")
    parser.add_argument("--webhook-url")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The record fields the options name; an empty value clears one."""
    out: dict[str, Any] = {}
    if args.tier is not None:
        out["tier"] = args.tier or None
    if args.models is not None:
        out["models"] = [m.strip() for m in args.models.split(",") if m.strip()] or None
    if args.max_running is not None:
        out["max_running"] = int(args.max_running) if args.max_running else None
    if args.budget is not None:
        try:
            out["budget"] = Budget.parse(args.budget).public() if args.budget else None
        except ValueError as exc:
            sys.exit(f"gpugate: --budget: {exc}")
    if args.expires is not None:
        expires = args.expires
        out["expires_at"] = (expires + "T00:00:00Z" if len(expires) == 10 else expires) or None
    if args.webhook_url is not None:
        out["webhook_url"] = args.webhook_url or None
    if getattr(args, "disable", False):
        out["disabled"] = True
    if getattr(args, "enable", False):
        out["disabled"] = False
    return out


def run(settings: Settings, args: argparse.Namespace) -> None:
    if settings.admin_key is None:
        sys.exit("gpugate: set GPUGATE_ADMIN_KEY (the admin API's key)")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = (args.url or f"http://{host}:{settings.port}").rstrip("/")
    headers = {"X-Admin-Key": settings.admin_key.get_secret_value()}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        try:
            _verb(client, args)
        except httpx.HTTPError as exc:
            sys.exit(f"gpugate: the API at {url} did not answer: {exc.__class__.__name__}")


def _call(client: httpx.Client, method: str, path: str, body: Any = None) -> dict[str, Any]:
    response = client.request(method, path, json=body)
    if response.status_code >= 400:
        try:
            detail = response.json().get("message", response.text)
        except ValueError:
            detail = response.text
        sys.exit(f"gpugate: {response.status_code}: {detail}")
    return dict(response.json())


def _verb(client: httpx.Client, args: argparse.Namespace) -> None:
    verb = args.verb
    if verb == "list":
        _table(_call(client, "GET", "/admin/keys")["keys"])
    elif verb == "show":
        _print_record(_call(client, "GET", f"/admin/keys/{args.name}"))
    elif verb == "create":
        record = _call(client, "POST", "/admin/keys", {"name": args.name, **_fields(args)})
        _print_record(record)
        _print_once(record)
    elif verb == "set":
        _print_record(_call(client, "PATCH", f"/admin/keys/{args.name}", _fields(args)))
    elif verb == "rotate":
        body = {"grace_seconds": args.grace}
        record = _call(client, "POST", f"/admin/keys/{args.name}/rotate", body)
        _print_record(record)
        _print_once(record)
        if args.grace:
            print(f"the old key keeps working for {args.grace} s")
    elif verb == "revoke":
        record = _call(client, "DELETE", f"/admin/keys/{args.name}")
        print(f"revoked {record['name']} ({record['fingerprint']})")


def _print_once(record: dict[str, Any]) -> None:
    print(f"key: {record['key']}")
    if record.get("webhook_secret"):
        print(f"webhook_secret: {record['webhook_secret']}")
    print("(shown this once: gpugate keeps only its SHA-256)")


def _print_record(record: dict[str, Any]) -> None:
    shown = {k: v for k, v in record.items() if k not in ("key", "webhook_secret")}
    usage = shown.pop("usage", {}) or {}
    for name, value in shown.items():
        print(f"{name}: {_value(value)}")
    for name, value in usage.items():
        print(f"usage.{name}: {_value(value)}")


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and set(value) == {"tokens", "period"}:
        return f"{value['tokens']}/{value['period']}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value if isinstance(value, str) else json.dumps(value)


def _table(records: list[dict[str, Any]]) -> None:
    columns = ("name", "source", "tier", "models", "max_running", "running", "budget", "used")
    rows = [columns]
    for r in records:
        usage = r.get("usage") or {}
        state = " (disabled)" if r.get("disabled") else ""
        rows.append(
            (
                r["name"] + state,
                r["source"],
                r["tier"],
                _value(r.get("models")),
                _value(r.get("max_running")),
                _value(usage.get("running")),
                _value(r.get("budget")),
                _value(usage.get("budget_used")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
