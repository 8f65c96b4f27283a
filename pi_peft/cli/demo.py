"""`pi-peft demo [--quick]`: the PI paper in miniature, on CPU, offline (see `pi_peft.demo`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from . import positive_int


def cli_main(argv: list[str]) -> int:
    from ..demo import QUICK, DemoConfig, run_demo

    parser = argparse.ArgumentParser(prog="pi-peft demo", description="The PI paper in miniature, on CPU, offline.")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of the whole pipeline (about a minute); checks no claim"
    )
    parser.add_argument("--output-dir", default=None, help="default: outputs/demo (outputs/demo-quick with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (the demo is timed on 2)")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where pretrained bases are kept (default: $XDG_CACHE_HOME/pi_peft/demo, i.e. ~/.cache/pi_peft/demo; "
        "--quick never uses it)",
    )
    parser.add_argument("--no-cache", action="store_true", help="pretrain again and keep no copy")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a DemoConfig field (experiments)"
    )
    args = parser.parse_args(argv)
    cfg = replace(DemoConfig(**(QUICK if args.quick else {})), seed=args.seed, threads=args.threads)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in DemoConfig.__dataclass_fields__:
            raise ValueError(
                f"`--set {item}`: unknown field {name!r}; fields: {sorted(DemoConfig.__dataclass_fields__)}."
            )
        try:
            cfg = replace(cfg, **{name: type(getattr(cfg, name))(json.loads(value))})
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(
                f"`--set {item}`: the value must be JSON of the field's type, like its current value "
                f"`--set {name}={json.dumps(getattr(cfg, name))}` ({exc})"
            ) from None
    output_dir = args.output_dir or ("outputs/demo-quick" if args.quick else "outputs/demo")
    cache_dir = None if args.no_cache or args.quick else (args.cache_dir or "auto")
    run_demo(cfg, output_dir, cache_dir=cache_dir)
    return 0
