"""``python -m tests.e2e``: run the end-to-end scenario and print a summary table.

Exit status: 0 every step passed (or was skipped for a stated reason), 1 a
step failed, 3 no cluster to run against.
"""

from __future__ import annotations

import argparse
import sys

from .harness import MODES, Options, Scenario, failed, table, unreachable_reason

EXIT_SKIPPED = 3


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m tests.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, then ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--mode", choices=sorted(MODES), default="manifests",
                     help="what to apply: deploy/manifests (default), an overlay, or none (use what is installed)")
    how.add_argument("--driver-on-host", dest="mode", action="store_const", const="driver-on-host",
                     help="run fusepath-csi on this host (root, a one-node cluster whose node is this machine) "
                          "and apply only the sidecars: for clusters that cannot pull the fusepath image")
    p.add_argument("--driver-image", help="use this image instead of ghcr.io/fusepath/fusepath:v0.1.0")
    p.add_argument("--node-name", help="with --driver-on-host: this host's Kubernetes node name (default: hostname)")
    p.add_argument("--image", help="image of the test pods (needs sh, dd, md5sum, df)")
    p.add_argument("--storage-class", default="fusepath")
    p.add_argument("--snapshot-class", default="fusepath")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each thing (default 180)")
    p.add_argument("--keep", action="store_true", help="leave the test namespace and its volumes in place")
    p.add_argument("--undeploy", action="store_true", help="remove the driver afterwards")
    a = p.parse_args(argv)
    opts = Options(kubeconfig=a.kubeconfig, context=a.context, mode=a.mode, driver_image=a.driver_image,
                   storage_class=a.storage_class, snapshot_class=a.snapshot_class, timeout=a.timeout,
                   keep=a.keep, undeploy=a.undeploy)
    if a.image:
        opts.image = a.image
    if a.node_name:
        opts.node_name = a.node_name
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    reason = unreachable_reason(opts)
    if reason:
        print(f"e2e skipped: {reason}")
        return EXIT_SKIPPED
    steps = Scenario(opts).run()
    print()
    print(table(steps))
    return 1 if failed(steps) else 0


if __name__ == "__main__":
    sys.exit(main())
