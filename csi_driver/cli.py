"""``fusepath-csi``: run the driver, or (``fusepath-csi client ...``) talk to one."""

from __future__ import annotations

import sys

from csi_driver import config as config_mod
from csi_driver import logs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "client":
        from csi_driver.client import main as client_main

        return client_main(argv[1:])
    args = config_mod.build_parser().parse_args(argv)
    cfg = config_mod.from_args(args)
    logs.configure(cfg.log_format, cfg.log_level)
    from csi_driver.app import run
    from csi_driver.instance import StartupError

    try:
        return run(cfg)
    except StartupError as exc:
        print(f"fusepath-csi: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
