"""Named forensic questions against a real embedded ClickHouse holding a
known story of transfers (written through the same Avro insert path as the
sink and `fdpass run`)."""

from __future__ import annotations

import pytest

from fdpass import questions as Q
from fdpass.errors import UserError
from fdpass.schemas.synthetic import make_event

T0 = 1_795_000_000_000_000_000  # 2026-11-18
SEC = 1_000_000_000
CONTAINER = "c0ffee" + "0" * 58


def ev(n: int, direction: str, *, pid, comm, sock, peer, fd, file_ino, path, t, container=None, mntns=4026531841,
       host="node-1", fd_index=0, seq=None, run=1, verified=True, abi="X86_64") -> dict:
    e = make_event(n)
    e.update(direction=direction, syscall="SENDMSG" if direction == "SEND" else "RECVMSG", pid=pid, tid=pid,
             comm=comm, sock_ino=sock, peer_sock_ino=peer, fd=fd, file_ino=file_ino, file_dev=2049,
             file_path=path, time_ns=T0 + t * SEC, container_id=container, mntns_id=mntns, host=host,
             host_id=host * 4, fd_index=fd_index, fd_count=1, seq=(run << 48) | (n if seq is None else seq),
             event_id=f"{host}:{n}:{direction}", file_verified=verified, abi=abi)
    return e


def story() -> list[dict]:
    """helper(100) -> daemon(200): /etc/shadow twice over one socket pair, then a
    memfd into a container (pid 300, other mntns; a 32-bit receiver whose file the
    kernel's list did not confirm), and one send never received (unconfirmed too)."""
    out = []
    n = 0

    def pair(s_pid, s_comm, r_pid, r_comm, ssock, rsock, sfd, rfd, ino, path, t, container=None, mntns=4026531841,
             deliver=True, s_verified=True, r_verified=True, r_abi="X86_64"):
        nonlocal n
        out.append(ev(n, "SEND", pid=s_pid, comm=s_comm, sock=ssock, peer=rsock, fd=sfd, file_ino=ino, path=path, t=t,
                      verified=s_verified))
        n += 1
        if deliver:
            out.append(ev(n, "RECV", pid=r_pid, comm=r_comm, sock=rsock, peer=ssock, fd=rfd, file_ino=ino, path=path,
                          t=t + 1, container=container, mntns=mntns, verified=r_verified, abi=r_abi))
        n += 1

    pair(100, "helper", 200, "daemon", 11, 12, 5, 7, 777, "/etc/shadow", 0)
    pair(100, "helper", 200, "daemon", 11, 12, 5, 8, 777, "/etc/shadow", 10)
    pair(100, "runtime", 300, "app", 21, 22, 9, 3, 888, "/memfd:payload (deleted)", 20, container=CONTAINER,
         mntns=4026532999, r_verified=False, r_abi="IA32")
    pair(100, "helper", 0, "", 31, 32, 6, 0, 999, "/tmp/lost", 30, deliver=False, s_verified=False)
    return out


def handover_story() -> list[dict]:
    """node-3: run 3, then run 4 took over from it (collector/handover.py: HANDOVER_RUN_BIT; its numbers 0-2
    went to transfers before the cutover, which run 3 stored), then run 5 restarted without a handover."""
    from fdpass.collector.handover import HANDOVER_RUN_BIT

    def one(i, t, run, seq):
        return ev(80 + i, "SEND", pid=3, comm="h", sock=1, peer=2, fd=1, file_ino=1, path="/h", t=t, host="node-3",
                  run=run, seq=seq)

    return ([one(i, 100 + i, 3, i) for i in range(3)] + [one(3 + i, 103 + i, 4 | HANDOVER_RUN_BIT, 3 + i)
                                                          for i in range(3)]
            + [one(6, 120, 5, 0)])


@pytest.fixture(scope="module", params=["transfer-ids", "no-ids"])
def store(request, tmp_path_factory):
    """The story twice: as v3 collectors store it (most SENDs and RECVs carry their list's
    transfer_id; one RECV does not) and with no ids at all (the old rule alone)."""
    from fdpass.schemas import avro, codec
    from fdpass.schemas.clickhouse import ensure_schema
    from fdpass.sinks import conversion
    from fdpass.sinks.store import open_store

    s = open_store(f"chdb://{tmp_path_factory.mktemp('questions')}/store")
    client = s.client()
    ensure_schema(client)
    events = story()
    if request.param == "no-ids":
        events = [e | {"transfer_id": None} for e in events]
    # a sequence hole (n=50..51 missing) and a second collector run on node-1
    events.append(ev(50 - 2, "SEND", pid=1, comm="x", sock=1, peer=2, fd=1, file_ino=1, path="/x", t=40, seq=8))
    events.append(ev(60, "SEND", pid=1, comm="x", sock=1, peer=2, fd=1, file_ino=1, path="/x", t=41, seq=11))
    events.append(ev(61, "SEND", pid=1, comm="x", sock=1, peer=2, fd=1, file_ino=1, path="/x", t=50, seq=0, run=2))
    events.extend(handover_story())
    client.raw_insert("fdpass.events", insert_block=conversion.avro_container(
        avro.CURRENT_VERSION, [codec.encode(e) for e in events]), fmt="Avro")
    # an event stored by a v2-era collector, on another host: no file_verified, so unverified
    old = ev(70, "SEND", pid=7, comm="old", sock=1, peer=2, fd=4, file_ino=5, path="/old", t=60, host="node-2")
    client.raw_insert("fdpass.events", insert_block=conversion.avro_container(
        2, [codec.Encoder(2).encode(old | {"file_verified": True})]), fmt="Avro",
        settings={"input_format_avro_allow_missing_fields": 1})
    yield client
    s.close()


def ask(client, name, limit=1000, **options):
    """The answer; a paired question's is the same whether its CTEs are materialized or inlined."""
    answers = []
    for materialize in (False, True) if name in ("transfers", "cross-container") else (False,):
        sql, params = Q.build(name, options, limit, materialize)
        r = client.query(sql, parameters=params)
        answers.append([dict(zip(r.column_names, row)) for row in r.result_rows])
    assert all(a == answers[0] for a in answers)
    return answers[0]


def test_transfers_pair_each_send_with_its_own_receive(store):
    rows = ask(store, "transfers", path="/etc/shadow")
    assert [(r["sender_fd"], r["receiver_fd"], r["status"]) for r in rows] == [(5, 7, "delivered"), (5, 8, "delivered")]
    assert {(r["sender_comm"], r["receiver_comm"], r["receiver_pid"]) for r in rows} == {("helper", "daemon", 200)}


def test_transfers_show_undelivered_sends(store):
    rows = ask(store, "transfers", path="/tmp/lost")
    assert [(r["file"], r["status"], r["receiver_pid"]) for r in rows] == [("/tmp/lost", "undelivered", None)]


def test_time_filter_does_not_shift_the_pairing(store):
    """--since cuts the first shadow transfer: the second still pairs with fd 8, not 7."""
    from datetime import datetime, timezone

    since = datetime.fromtimestamp(T0 / SEC + 5, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    rows = ask(store, "transfers", path="/etc/shadow", since=since)
    assert [(r["sender_fd"], r["receiver_fd"]) for r in rows] == [(5, 8)]


def test_cross_container(store):
    rows = ask(store, "cross-container")
    assert [(r["sender_comm"], r["receiver_comm"], r["receiver_container"], r["receiver_mntns"]) for r in rows] == [
        ("runtime", "app", CONTAINER, 4026532999)]


def test_process_filters_match_either_side_of_a_transfer(store):
    assert len(ask(store, "transfers", pid=200)) == 2
    assert len(ask(store, "transfers", comm="runtime")) == 1
    assert len(ask(store, "transfers", container=CONTAINER[:8])) == 1


def test_file_process_host_timeline(store):
    assert {(r["direction"], r["abi"]) for r in ask(store, "file", path="/memfd:%")} == {("SEND", "X86_64"),
                                                                                       ("RECV", "IA32")}
    assert {r["pid"] for r in ask(store, "process", comm="daemon")} == {200}
    assert len(ask(store, "host", host="node-1")) == 10
    assert len(ask(store, "timeline", host="node-1", limit=3)) == 3


def _at(t: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(T0 / SEC + t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def test_unverified_lists_the_events_the_kernel_did_not_confirm(store):
    rows = ask(store, "unverified")
    assert list(rows[0]) == ["time", "host", "direction", "syscall", "abi", "pid", "comm", "fd", "file", "probe"]
    assert [(r["host"], r["direction"], r["syscall"], r["abi"], r["pid"], r["comm"], r["fd"], r["file"])
            for r in rows] == [
        ("node-1", "RECV", "RECVMSG", "IA32", 300, "app", 3, "/memfd:payload (deleted)"),
        ("node-1", "SEND", "SENDMSG", "X86_64", 100, "helper", 6, "/tmp/lost"),
        ("node-2", "SEND", "SENDMSG", "X86_64", 7, "old", 4, "/old"),  # stored before v3: false by default
    ]
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows) and rows[0]["probe"] == "tracepoint"
    assert [r["file"] for r in ask(store, "unverified", host="node-1", pid=100)] == ["/tmp/lost"]
    assert [r["file"] for r in ask(store, "unverified", container=CONTAINER[:8])] == ["/memfd:payload (deleted)"]
    assert [r["host"] for r in ask(store, "unverified", since=_at(40))] == ["node-2"]
    assert [r["file"] for r in ask(store, "unverified", until=_at(40))] == ["/memfd:payload (deleted)", "/tmp/lost"]
    assert [r["file"] for r in ask(store, "unverified", limit=1)] == ["/memfd:payload (deleted)"]
    assert "unverified" in Q.QUERY_EPILOG


def test_gaps_find_sequence_holes_and_restarts(store):
    rows = ask(store, "gaps", host="node-1")
    kinds = {(r["what"].split()[0], r["missing"]) for r in rows}
    assert ("records", 2) in kinds  # seq 9 and 10 of run 1 never arrived
    assert any(r["what"].startswith("collector restarted") for r in rows)


def test_gaps_show_no_hole_at_a_handover_but_a_restart_after_it(store):
    from fdpass.collector.handover import HANDOVER_RUN_BIT

    rows = ask(store, "gaps", host="node-3")
    assert [(r["what"].split(":")[0], r["run"]) for r in rows] == [("collector restarted", 5)], rows
    assert HANDOVER_RUN_BIT | 4 not in {r["run"] for r in rows}


@pytest.mark.parametrize("value", ["x' OR 1=1 --", "'; DROP TABLE fdpass.events; --", "%' OR '1'='1", "\\' \" `"])
def test_values_are_bound_not_injected(store, value):
    assert ask(store, "transfers", comm=value) == []
    assert ask(store, "file", path=value) == []
    assert ask(store, "host", host=value) == []
    assert store.query("SELECT count() FROM fdpass.events").result_rows[0][0] == 18  # still all there


def test_bad_question_options():
    with pytest.raises(UserError, match="unknown question"):
        Q.build("nope", {})
    with pytest.raises(UserError, match="needs --host"):
        Q.build("timeline", {})
    with pytest.raises(UserError, match="does not take --pid"):
        Q.build("gaps", {"pid": 3})


def test_relative_times():
    assert Q.absolute_time("2h", now=7200.0) == "1970-01-01 00:00:00"
    assert Q.absolute_time("2026-01-01") == "2026-01-01"
