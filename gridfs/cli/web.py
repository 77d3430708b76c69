"""``gridfs web``: ``gridfs status`` as a small local web page (and JSON).

``GET /`` is a page that refreshes itself every few seconds: the grid map
(each server with its shares, use and free space), queue backlogs, the
node's last lease renewal, unlink and check, and each mount's transfers.
``GET /status.json`` is the same as ``gridfs status --json``, with every
cap in it replaced by its log name (:func:`gridfs.caps.log_name`).

Any local process, and any web page a local browser shows, can reach a
loopback port, so: it listens on loopback only, serves no cap, and answers
only requests whose Host header names the address it listens on (a page
from a DNS name rebound to 127.0.0.1 sends its own name, and gets a 421).
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import json
from typing import Any

import trio

from ..caps import redact_caps
from ..client.grid import GridClient, open_grid
from ..config import NodeDir, resolve_node_dir
from ..errors import GridError, UsageError, unwrap
from .files import add_node_option
from .mount import gather_status

MAX_REQUEST = 8192
REFRESH = 5


def register(sub: Any) -> None:
    w = sub.add_parser("web", help="serve gridfs status as a local web page (and JSON)")
    w.add_argument("--port", type=tcp_port, default=3456, help="default: 3456 (0: any free port)")
    w.add_argument(
        "--host",
        type=loopback_host,
        default="127.0.0.1",
        help="a loopback address (default: 127.0.0.1; also ::1 or localhost)",
    )
    add_node_option(w)
    w.set_defaults(func=cmd_web)


def tcp_port(text: str) -> int:
    """A TCP port number (0 picks a free one); anything else is a usage error."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r} (0 to 65535)")
    return int(text)


def loopback_host(text: str) -> str:
    """The address to listen on: loopback only (the page is for this
    machine's owner; status shows server names, paths and errors)."""
    if text == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(text).is_loopback:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"not a loopback address: {text!r} (127.0.0.1 or ::1)")


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values that name this server: its address or
    ``localhost``, with the port (bare only for port 80)."""
    names = {f"[{host}]" if ":" in host else host, "localhost"}
    if ipaddress.ip_address(host).version == 4:
        names.add("127.0.0.1")
    out = {f"{name}:{port}" for name in names}
    if port == 80:
        out |= names
    return frozenset(out)


def header(request: bytes, name: str) -> str | None:
    """The value of header ``name`` in a raw request head (None if absent)."""
    for line in request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, sep, value = line.decode("latin-1").partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def scrub(value: Any) -> Any:
    """``value`` with every cap in its strings replaced by its log name."""
    if isinstance(value, str):
        return redact_caps(value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def cmd_web(args: argparse.Namespace) -> int:
    node = NodeDir(resolve_node_dir(args.node))
    node.config()

    async def main() -> None:
        async with open_grid(node) as grid:
            try:
                listeners = await trio.open_tcp_listeners(args.port, host=args.host)
            except OSError as e:
                raise UsageError(
                    f"cannot listen on {args.host}:{args.port}: {e.strerror}"
                ) from None
            port = listeners[0].socket.getsockname()[1]
            hosts = allowed_hosts(args.host, port)
            shown = f"[{args.host}]" if ":" in args.host else args.host
            print(f"serving http://{shown}:{port}/ (Ctrl-C stops)", flush=True)

            async def handler(stream: trio.SocketStream) -> None:
                await serve(stream, node, grid, hosts)

            await trio.serve_listeners(handler, listeners)

    trio.run(main)
    return 0


async def serve(
    stream: trio.abc.Stream, node: NodeDir, grid: GridClient, hosts: frozenset[str]
) -> None:
    """Answer one HTTP/1.0-style request, then close.  A request whose Host
    header is not in ``hosts`` gets a 421.  A status that cannot be gathered
    (a mount's control socket failing, say) is a 503 with the reason, never
    the end of the server."""
    try:
        with trio.move_on_after(10):
            request = b""
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = line.partition(" ")
            path = rest.split(" ", 1)[0]
            host = header(request, "host")
            if host is None or host.lower() not in hosts:
                await respond(stream, 421, "text/plain", b"wrong Host: this server is local\n")
            elif method != "GET":
                await respond(stream, 405, "text/plain", b"only GET\n")
            elif path not in ("/", "/status.json"):
                await respond(stream, 404, "text/plain", b"not found\n")
            else:
                try:
                    status = scrub(await gather_status(node, grid))
                except* GridError as group:
                    reason = redact_caps(f"status unavailable: {unwrap(group)}\n").encode()
                    await respond(stream, 503, "text/plain", reason)
                else:
                    if path == "/status.json":
                        await respond(stream, 200, "application/json", json.dumps(status).encode())
                    else:
                        page = render(status).encode()
                        await respond(stream, 200, "text/html; charset=utf-8", page)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    503: "Service Unavailable",
}


async def respond(stream: trio.abc.Stream, status: int, kind: str, body: bytes) -> None:
    reason = REASONS[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)


def _mib(n: Any) -> str:
    return f"{int(n or 0) / 2**20:,.0f} MiB"


def render(status: dict[str, Any]) -> str:
    """The status page: plain HTML tables, no script."""
    e = html.escape
    rows = []
    for s in status["servers"]:
        if "error" in s:
            rows.append(f"<tr><td>{e(s['name'])}</td><td colspan=4>{e(str(s['error']))}</td></tr>")
            continue
        total = int(s.get("total", 0)) or 1
        bar = min(100, 100 * int(s.get("used", 0)) // total)
        rows.append(
            f"<tr><td>{e(s['name'])}</td><td>{s.get('shares', 0)}</td>"
            f"<td>{_mib(s.get('used'))}</td><td>{_mib(s.get('available'))}</td>"
            f"<td><div class=bar><div style='width:{bar}%'></div></div></td></tr>"
        )
    queues = "".join(
        f"<li>queue {e(q['queue'][:8])}: {q['pending']} pending, {q['failing']} failing</li>"
        for q in status["queues"]
    )
    upkeep = "".join(
        f"<li>{e(task)}: "
        + ", ".join(f"{e(k)} {e(str(v))}" for k, v in sorted(r.items()) if k != "at")
        + "</li>"
        for task, r in sorted(status["maintenance"].items())
    )
    transfers = []
    for m in status["mounts"]:
        t = m.get("transfers", {})
        for x in t.get("active", []) + t.get("recent", []):
            state = "running" if x in t.get("active", []) else "done"
            transfers.append(
                f"<tr><td>{e(m['mountpoint'])}</td><td>{e(x['kind'])}</td>"
                f"<td>{e(x['name'])}</td><td>{x['done'] >> 10} / {x['size'] >> 10} KiB</td>"
                f"<td>{x['rate'] / 1e6:.1f} MB/s</td><td>{state}</td></tr>"
            )
    return f"""<!doctype html>
<html><head><meta charset=utf-8><meta http-equiv=refresh content={REFRESH}>
<title>gridfs status</title>
<style>body{{font:14px sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}
.bar{{width:120px;height:10px;background:#ddd}}.bar div{{height:10px;background:#48c}}</style>
</head><body><h1>gridfs</h1>
<h2>Grid map ({len(status["servers"])} servers)</h2>
<table><tr><th>server</th><th>shares</th><th>used</th><th>available</th><th>use</th></tr>
{"".join(rows)}</table>
<h2>Work queues</h2><ul>{queues or "<li>none</li>"}</ul>
<h2>Maintenance</h2><ul>{upkeep or "<li>nothing recorded yet</li>"}</ul>
<h2>Transfers ({len(status["mounts"])} mounts)</h2>
<table><tr><th>mount</th><th>kind</th><th>file</th><th>progress</th><th>rate</th><th></th></tr>
{"".join(transfers)}</table>
</body></html>
"""
