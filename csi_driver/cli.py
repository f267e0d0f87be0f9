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
    parser = config_mod.build_parser()
    parser.usage = "%(prog)s [--flag=value ...]\n       %(prog)s client COMMAND [options]"
    parser.epilog = ("fusepath-csi client COMMAND ...: call any CSI RPC on a running driver and print JSON "
                     "(create-volume, list-volumes, node-publish, call Service.Method '{json}', ...); "
                     "`fusepath-csi client --help` lists the commands.")
    args = parser.parse_args(argv)
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
