"""One client process of `secdfd bench load`: detects images one after another and writes one JSON line
per request (to stdout) with its outcome, so that the load driver can check every answer.

    python -m secdfd.common.bench.load_client KEYS SERVER_A SERVER_B IMAGES_DIR --count N | --until T

Each line: {"image": i, "start": t0, "end": t1, "ok": bool, "p_fake": p, "error": class name,
"message": text, "attempts": k}. Busy answers are retried after a short pause (counted in
`attempts`); any other error ends that request. Times are time.time() (the driver compares them
across processes). It imports no click: the driver passes arguments by position.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from secdfd.common.errors import Busy, SecDFDError
from secdfd.common.service.client import Client, ClientConfig

BUSY_PAUSE = 0.5  # seconds before a request answered Busy is sent again
MAX_ATTEMPTS = 40


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="secdfd.common.bench.load_client")
    ap.add_argument("keys", type=Path)
    ap.add_argument("server_a")
    ap.add_argument("server_b")
    ap.add_argument("images", type=Path)
    ap.add_argument("--count", type=int, default=None)
    ap.add_argument("--until", type=float, default=None, help="time.time() to stop at")
    ap.add_argument("--first", type=int, default=0, help="index of the first image")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    images = sorted(args.images.glob("*.png"))
    if not images:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    client = Client(ClientConfig(args.keys, args.server_a, args.server_b, args.timeout))
    try:
        i = args.first
        done = 0
        while (args.count is None or done < args.count) and (args.until is None or time.time() < args.until):
            print(json.dumps(_one(client, images[i % len(images)], i % len(images))), flush=True)
            i += 1
            done += 1
    finally:
        client.close()
    return 0


def _one(client: Client, image: Path, index: int) -> dict[str, object]:
    start = time.time()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            r = client.detect(image)
        except Busy as e:
            if attempt == MAX_ATTEMPTS:
                return _failed(index, start, e, attempt)
            time.sleep(BUSY_PAUSE)
            continue
        except SecDFDError as e:
            return _failed(index, start, e, attempt)
        return {"image": index, "start": start, "end": time.time(), "ok": True, "p_fake": r["p_fake"],
                "attempts": attempt, "online_seconds": r["online_seconds"]}
    raise AssertionError("unreachable")


def _failed(index: int, start: float, e: SecDFDError, attempts: int) -> dict[str, object]:
    return {"image": index, "start": start, "end": time.time(), "ok": False, "error": type(e).__name__,
            "message": str(e)[:300], "attempts": attempts}


if __name__ == "__main__":
    sys.exit(main())
