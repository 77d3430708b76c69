"""``gridfs debug``: the offline format tools (zfec/zunfec with integrity)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..codec import DEFAULT_K, DEFAULT_N, DEFAULT_SEGMENT_SIZE
from ..errors import UsageError
from ..offline import decode_to, encode_file


def register(sub: Any) -> None:
    debug = sub.add_parser("debug", help="offline tools for the share format")
    dsub = debug.add_subparsers(dest="debug_command", metavar="COMMAND", required=True)

    enc = dsub.add_parser(
        "encode",
        help="encode FILE into share files; print its read cap",
        description="Encrypt and erasure-code FILE into n self-contained share files in "
        "DIR, any k of which rebuild it. Prints the read cap alone on stdout.",
    )
    enc.add_argument("file", type=Path, metavar="FILE")
    enc.add_argument("--out", "-o", type=Path, required=True, metavar="DIR")
    enc.add_argument("--k", type=int, default=DEFAULT_K, help="shares needed (default %(default)s)")
    enc.add_argument("--n", type=int, default=DEFAULT_N, help="shares made (default %(default)s)")
    enc.add_argument(
        "--segment-size",
        type=int,
        default=DEFAULT_SEGMENT_SIZE,
        metavar="N",
        help="maximum segment size in bytes (default %(default)s)",
    )
    enc.add_argument(
        "--convergence-secret-file",
        type=Path,
        metavar="FILE",
        help="derive the key from this secret and the contents (same file, same cap); "
        "without it every encode uses a fresh random key",
    )
    enc.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    enc.set_defaults(func=cmd_encode)

    dec = dsub.add_parser(
        "decode",
        help="rebuild a file from the share files in DIR",
        description="Rebuild the file named by CAP from whatever share files DIR holds, "
        "skipping corrupt or foreign ones. Nothing is left at OUT on failure.",
    )
    dec.add_argument("cap", metavar="CAP")
    dec.add_argument("dir", type=Path, metavar="DIR")
    dec.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    dec.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    dec.set_defaults(func=cmd_decode)


def cmd_encode(args: argparse.Namespace) -> int:
    secret = None
    if args.convergence_secret_file is not None:
        secret = args.convergence_secret_file.read_bytes()
        if len(secret) < 16:
            raise UsageError("a convergence secret must be at least 16 bytes")
    if not args.file.is_file():
        raise UsageError(f"{args.file} is not a regular file")
    cap = encode_file(args.file, args.out, args.k, args.n, args.segment_size, secret, args.workers)
    print(cap.to_string())
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    def warn(msg: str) -> None:
        print(f"gridfs: {msg}", file=sys.stderr)

    decode_to(args.cap, args.dir, args.output, warn, args.workers)
    return 0
