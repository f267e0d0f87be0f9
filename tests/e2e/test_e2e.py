"""The end-to-end scenario under pytest.

It deploys to a cluster, so it runs only when asked: FUSEPATH_E2E=1, against
the cluster KUBECONFIG (or ~/.kube/config) names. Otherwise, and whenever no
cluster answers, it skips and says why. FUSEPATH_E2E_MODE picks what to
deploy (manifests, single-node, driver-on-host, none) and
FUSEPATH_E2E_DRIVER_IMAGE overrides the driver image.
"""

from __future__ import annotations

import os

import pytest

from .harness import Options, Scenario, failed, no_kubeconfig_reason, table, unreachable_reason


def options() -> Options:
    opts = Options(mode=os.environ.get("FUSEPATH_E2E_MODE", "manifests"),
                   driver_image=os.environ.get("FUSEPATH_E2E_DRIVER_IMAGE") or None)
    if os.environ.get("FUSEPATH_E2E_TIMEOUT"):
        opts.timeout = float(os.environ["FUSEPATH_E2E_TIMEOUT"])
    return opts


def test_end_to_end() -> None:
    opts = options()
    reason = no_kubeconfig_reason(opts.kubeconfig)
    if reason:
        pytest.skip(f"e2e: {reason}")
    if os.environ.get("FUSEPATH_E2E") != "1":
        pytest.skip("e2e: a kubeconfig exists, but FUSEPATH_E2E=1 is not set; the test deploys "
                    "fusepath, so it never runs against a cluster unasked")
    reason = unreachable_reason(opts)
    if reason:
        pytest.skip(f"e2e: {reason}")
    steps = Scenario(opts).run()
    print("\n" + table(steps))
    assert not failed(steps), "\n" + table(steps)
