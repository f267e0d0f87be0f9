"""End-to-end test of fusepath on a real cluster (the one KUBECONFIG names).

Run it as ``python -m tests.e2e --help`` or through pytest with
``FUSEPATH_E2E=1``; without a cluster it skips and says why.
"""
