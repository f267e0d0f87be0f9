"""The committed gRPC stubs must be exactly what ``make proto`` generates."""

from __future__ import annotations

from pathlib import Path

from csi_driver import protogen

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path):
    written = protogen.generate(tmp_path)
    assert written, "no proto was generated"
    stale = []
    for fresh in written:
        committed = REPO / fresh.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(committed.relative_to(REPO)))
    assert not stale, f"stale generated code, run `make proto`: {stale}"


def test_csi_proto_is_the_v1_wire_interface():
    from csi_driver.gen import csi_pb2

    services = csi_pb2.DESCRIPTOR.services_by_name
    assert set(services) >= {"Identity", "Controller", "Node", "GroupController"}
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    # a few field numbers the sidecars depend on
    create = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert (create["name"].number, create["capacity_range"].number, create["secrets"].number,
            create["volume_content_source"].number, create["mutable_parameters"].number) == (1, 2, 5, 6, 8)
    assert csi_pb2.NodeGetVolumeStatsResponse.DESCRIPTOR.fields_by_name["volume_condition"].number == 2
