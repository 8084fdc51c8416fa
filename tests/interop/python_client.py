"""Interop check from outside Rust: a Python client generated from proto/ by
grpcio-tools, and an audit-chain verifier written only from README.md's
"Audit entry encoding" section.

Usage: python_client.py HOST:PORT TOKEN TLS_DIR [POSTGRES_DSN]
  TOKEN carries the roles front_desk and compliance; TLS_DIR holds the files
  of `carevault certs dev` (ca.pem, client.pem, client.key). The server
  requires a client certificate (mutual TLS). With POSTGRES_DSN (the server
  runs on that database), the chain is also read with SQL, as README.md's
  "On PostgreSQL" section documents the tables, and verified the same way.
Exit 0 when everything checks out.
"""
import hashlib
import struct
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from carevault.v1 import audit_pb2, audit_pb2_grpc, coverage_pb2, coverage_pb2_grpc, patient_pb2, patient_pb2_grpc


def decode_entry(e: bytes) -> dict:
    """Parses one entry exactly as README.md documents it; raises on any deviation."""
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(e):
            raise ValueError("truncated")
        out = e[pos:pos + n]
        pos += n
        return out

    def u32():
        return struct.unpack(">I", take(4))[0]

    def u64():
        return struct.unpack(">Q", take(8))[0]

    def s():
        return take(u32()).decode("utf-8")

    def strs():
        return [s() for _ in range(u32())]

    tag = take(18) if len(e) >= 18 else b""
    if tag not in (b"carevault.audit.v1", b"carevault.audit.v2"):
        raise ValueError("unknown format")
    d = {"format": int(tag[-1:]), "sequence": u64(), "previous_hash": take(32), "time": struct.unpack(">q", take(8))[0]}
    d["actor"] = s()
    d["scopes"] = strs()
    for k in ("client_address", "request_id", "action", "resource_type", "resource_id", "patient_id"):
        d[k] = s()
    d["record_version"] = u64()
    d["outcome"] = s()
    d["key_version"] = u32()
    present = take(1)[0]
    if present not in (0, 1):
        raise ValueError("bad presence byte")
    d["result_count"] = u64() if present else None
    d["returned_patient_ids"] = strs()
    if tag == b"carevault.audit.v2":
        d["service"] = s()
        d["roles"] = strs()
        d["purpose"] = s()
        d["disclosed"] = strs()
        d["break_glass"] = s()
        d["details"] = strs()
    if pos != len(e):
        raise ValueError("trailing bytes")
    return d


class Failed(Exception):
    """The first failure, as README.md classifies it."""

    def __init__(self, sequence, cls):
        super().__init__(f"{cls} at {sequence}")
        self.sequence, self.cls = sequence, cls


def verify(items, anchor=None):
    """README.md's checks, in order, over ExportedAuditEntry messages.
    anchor: (sequence, hash) recorded earlier, or None to verify from genesis.
    Returns (entries checked, (head sequence, head hash)); raises Failed."""
    expected, prev = (anchor[0] + 1, anchor[1]) if anchor else (0, b"\0" * 32)
    head, checked, seen_v2 = anchor, 0, False
    decoded = []
    for item in items:
        try:
            decoded.append(decode_entry(item.entry))
        except ValueError as err:
            decoded.append(err)
    for i, item in enumerate(items):
        d = decoded[i]
        if isinstance(d, ValueError):
            raise Failed(expected, "unknown_format" if str(d) == "unknown format" else "content_altered")
        if d["format"] == 1 and seen_v2:
            raise Failed(expected, "unknown_format")
        seen_v2 = seen_v2 or d["format"] == 2
        h = hashlib.sha256(item.entry).digest()
        if h != item.hash or item.sequence != d["sequence"]:
            raise Failed(expected, "content_altered")
        if d["sequence"] < expected:
            raise Failed(expected, "out_of_order")
        if d["sequence"] > expected:
            nxt = decoded[i + 1] if i + 1 < len(items) else None
            behind = isinstance(nxt, dict) and nxt["sequence"] < d["sequence"]
            raise Failed(expected, "out_of_order" if behind else "gap")
        if d["sequence"] == 0 and d["action"] != "audit.genesis":
            raise Failed(expected, "no_genesis")
        if d["previous_hash"] != prev:
            raise Failed(expected, "link_broken")
        prev, expected, checked, head = h, expected + 1, checked + 1, (d["sequence"], h)
    if head is None:
        raise Failed(0, "no_genesis")
    return checked, head


def main() -> int:
    addr, token, tls = sys.argv[1], sys.argv[2], sys.argv[3]
    md = [("authorization", f"Bearer {token}"), ("x-request-id", "py-interop-1"), ("x-purpose-of-use", "TREAT")]
    read = lambda name: open(f"{tls}/{name}", "rb").read()
    creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    port = addr.rsplit(":", 1)[1]
    ch = grpc.secure_channel(f"localhost:{port}", creds)

    # Without a client certificate the handshake is refused.
    bare = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(read("ca.pem")))
    try:
        audit_pb2_grpc.AuditServiceStub(bare).GetAuditHead(audit_pb2.GetAuditHeadRequest(), metadata=md, timeout=5)
        raise AssertionError("call without a client certificate accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    patients = patient_pb2_grpc.PatientServiceStub(ch)
    coverages = coverage_pb2_grpc.CoverageServiceStub(ch)
    audit = audit_pb2_grpc.AuditServiceStub(ch)

    created = patients.CreatePatient(
        patient_pb2.CreatePatientRequest(
            patient=patient_pb2.Patient(
                names=[patient_pb2.HumanName(family="Pythonson", given=["Ada"])],
                birth_date="1991-03-04",
                identifiers=[patient_pb2.Identifier(system="https://hospital.example/mrn", value="PY-1",
                                                    type=patient_pb2.IDENTIFIER_TYPE_MR)],
            )
        ),
        metadata=md,
    ).patient
    assert created.version == 1 and created.active, created
    coverages.CreateCoverage(
        coverage_pb2.CreateCoverageRequest(
            coverage=coverage_pb2.Coverage(
                patient_id=created.id, status=coverage_pb2.COVERAGE_STATUS_ACTIVE, type=coverage_pb2.COVERAGE_TYPE_HMO,
                payor=coverage_pb2.Payor(name="Acme"), subscriber_id="PYM1",
                relationship=coverage_pb2.SUBSCRIBER_RELATIONSHIP_PATIENT, order=1,
            )
        ),
        metadata=md,
    )
    found = patients.SearchPatients(
        patient_pb2.SearchPatientsRequest(member_id=patient_pb2.MemberIdQuery(member_id="pym1")), metadata=md
    )
    assert [p.id for p in found.patients] == [created.id], found

    # A bad request carries google.rpc.BadRequest naming each field.
    try:
        patients.CreatePatient(patient_pb2.CreatePatientRequest(patient=patient_pb2.Patient(birth_date="1991-02-30")),
                               metadata=md)
        raise AssertionError("invalid patient accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        fields = []
        for detail in rpc_status.from_call(err).details:
            br = error_details_pb2.BadRequest()
            if detail.Unpack(br):
                fields += [v.field for v in br.field_violations]
        assert fields == ["patient.names", "patient.birth_date"], fields

    # Verify the exported chain independently, from genesis.
    head = audit.GetAuditHead(audit_pb2.GetAuditHeadRequest(), metadata=md)
    items = [i for msg in audit.ExportAuditEvents(audit_pb2.ExportAuditEventsRequest(start_sequence=0), metadata=md)
             for i in msg.entries]
    count, last = verify(items)
    recorded = [i for i in items if i.sequence == head.sequence]
    assert recorded and hashlib.sha256(recorded[0].entry).digest() == head.hash, "recorded head missing or different"
    services = {d["service"] for d in map(lambda i: decode_entry(i.entry), items) if d["action"] == "patient.create"}
    for d in map(lambda i: decode_entry(i.entry), items):
        if d["action"] == "patient.create":
            assert d["purpose"] == "TREAT" and "front_desk" in d["roles"], d
    assert services == {"spiffe://carevault.dev/client"}, services

    # Then only what came after that head, anchored at it.
    patients.GetPatient(patient_pb2.GetPatientRequest(patient_id=created.id), metadata=md)
    later = [i for msg in audit.ExportAuditEvents(audit_pb2.ExportAuditEventsRequest(start_sequence=last[0] + 1),
                                                  metadata=md) for i in msg.entries]
    more, _ = verify(later, anchor=last)
    assert more == 2, more  # the read and the export itself
    # And the rules catch what they should.
    for mutate, cls in [(lambda l: l[1:], "gap"), (lambda l: [l[1], l[0]] + l[2:], "out_of_order")]:
        try:
            verify(mutate(list(items)))
            raise AssertionError(f"{cls} not caught")
        except Failed as f:
            assert f.cls == cls, (f.cls, cls)
    try:
        verify(later, anchor=(last[0], b"\x11" * 32))
        raise AssertionError("a wrong anchor was accepted")
    except Failed as f:
        assert (f.cls, f.sequence) == ("link_broken", last[0] + 1), f
    if len(sys.argv) > 4:
        verify_from_sql(sys.argv[4], head)
    print(f"python interop: ok ({count} entries verified from the README's encoding)")
    return 0


class Row:
    """One row of audit_entries, shaped like an ExportedAuditEntry."""

    def __init__(self, seq, entry, hash_):
        self.sequence, self.entry, self.hash = seq, bytes(entry), bytes(hash_)


def verify_from_sql(dsn, head):
    """Reads the chain from PostgreSQL (README.md: table audit_entries, and
    chain_head's single row) and verifies it with the same rules."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = [Row(*r) for r in conn.execute("SELECT seq, entry, hash FROM audit_entries ORDER BY seq")]
        seq, hash_ = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
    count, last = verify(rows)
    assert last == (seq, bytes(hash_)), ("chain_head is not the newest entry", last, seq)
    assert any(r.sequence == head.sequence and r.hash == head.hash for r in rows), "the recorded head is in the table"
    print(f"python interop: {count} entries verified from PostgreSQL's tables")


if __name__ == "__main__":
    sys.exit(main())
