"""``retina-fast info``: versions, build flags, CPU features, GPUs and the backend table."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, build flags, CPU/GPU features and usable backends")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from retina_fast.info import collect, format_info

    data = collect()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0
