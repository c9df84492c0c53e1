"""python -m stack install|up|status|down|logs — see stack/__init__.py."""
from __future__ import annotations

import argparse
import logging
import sys

from . import runner, services
from .config import StackConfigError, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack",
                                 description="The local stack of real services.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    names = {"nargs": "*", "metavar": "SERVICE",
             "help": f"any of {', '.join(services.ORDER)} (default: all)"}
    sub.add_parser("install", help="fetch what is missing (idempotent)").add_argument(
        "services", **names)
    p_up = sub.add_parser("up", help="start and wait until each service answers")
    p_up.add_argument("services", **names)
    p_up.add_argument("--jobs", type=int, default=3,
                      help="services booting at the same time (default 3)")
    sub.add_parser("status", help="address, state and RSS of every service")
    sub.add_parser("down", help="stop (reverse order)").add_argument("services", **names)
    p_logs = sub.add_parser("logs", help="show a service's log")
    p_logs.add_argument("service")
    p_logs.add_argument("-n", "--lines", type=int, default=100)
    p_logs.add_argument("-f", "--follow", action="store_true")
    args = ap.parse_args(argv)
    # Health probes use real client libraries; their retry chatter ("Unable
    # connect to ...") while a server boots is expected, not worth printing.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for noisy in ("aiokafka", "kafka", "paho", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    try:
        cfg = load()
        if args.cmd == "install":
            rc = runner.install(cfg, args.services)
            if not args.services:  # the whole stack: also the tools tests need (chromium)
                from .tools import ensure_tools
                rc = max(rc, ensure_tools(runner.say))
            return rc
        if args.cmd == "up":
            return runner.up(cfg, args.services, jobs=args.jobs)
        if args.cmd == "status":
            return runner.status(cfg)
        if args.cmd == "down":
            return runner.down(cfg, args.services)
        return runner.logs(cfg, args.service, args.lines, args.follow)
    except (StackConfigError, services.UnknownService, services.Unavailable) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
