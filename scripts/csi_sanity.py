#!/usr/bin/env python3
"""Run csi-sanity against a freshly started local driver.

    scripts/csi_sanity.py --sanity /path/to/csi-sanity [--block] [--param mounter=bind]
        [--engine kernel|libfuse] [-- extra ginkgo flags]

csi-sanity is built separately from kubernetes-csi/csi-test (it is not part
of this repository). This script only starts ``fusepath-csi --mode=all
--enable-attach`` in a scratch directory with the flags the conformance run
needs (``--engine`` picks the embedded fusefs daemon's engine, as
``--fusefs-engine`` does for the driver; by default the driver's own default
or ``$FUSEPATH_FUSEFS_ENGINE``), points csi-sanity at it, prints the exact command line and the
result, and tears everything down (driver, embedded fusefs, mounts).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Driver  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sanity", required=True, help="path to the csi-sanity binary")
    p.add_argument("--block", action="store_true", help="--csi.testvolumeaccesstype block")
    p.add_argument("--param", action="append", default=[], help="a StorageClass parameter key=value")
    p.add_argument("--volume-size", default="1073741824")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--engine", choices=("libfuse", "kernel"),
                   help="the embedded fusefs daemon's engine (the driver's --fusefs-engine)")
    p.add_argument("extra", nargs="*", help="more csi-sanity flags (after --)")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fusepath-sanity-"))
    engine = [f"--fusefs-engine={args.engine}"] if args.engine else []
    driver = Driver(root, "--enable-attach", "--max-volumes-per-node=3", "--log-level=info", *engine)
    driver.start()
    params = root / "params.yaml"
    params.write_text("".join(f"{kv.split('=', 1)[0]}: \"{kv.split('=', 1)[1]}\"\n" for kv in args.param) or "{}\n")
    mutable = root / "mutable.yaml"
    mutable.write_text('ioBytesPerSecond: "104857600"\nioOpsPerSecond: "100000"\n')
    command = [
        args.sanity, f"--csi.endpoint={driver.endpoint}",
        f"--csi.mountdir={driver.kubelet_dir / 'mnt'}", f"--csi.stagingdir={driver.kubelet_dir / 'staging'}",
        f"--csi.testvolumesize={args.volume_size}", f"--csi.testvolumeparameters={params}",
        "--csi.testnodevolumeattachlimit", f"--csi.testvolumemutableparameters={mutable}",
        *(["--csi.testvolumeaccesstype=block"] if args.block else []), *args.extra,
    ]
    print("$", " ".join(command), flush=True)
    try:
        result = subprocess.run(command, check=False, env={**os.environ, "TMPDIR": str(root)})
    finally:
        driver.teardown()
        if not args.keep:
            subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
