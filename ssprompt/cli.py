"""The ``ssprompt`` command line: pretrain, eval, train, study, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def _cmd_pretrain(a: argparse.Namespace) -> None:
    from .pretrain import pretrain

    info = pretrain(Path(a.out), minutes=a.minutes, steps=a.steps, batch=a.batch, lr=a.lr,
                    pool_size=a.pool, seed=a.seed)
    print(info)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssprompt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("pretrain", help="pretrain the embedded SFM on the source corpus")
    s.add_argument("--out", default="weights")
    s.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget")
    s.add_argument("--steps", type=int, default=100_000, help="step cap")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--pool", type=int, default=6000, help="source scenes composed up front")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"ssprompt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
