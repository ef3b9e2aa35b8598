"""The client's session book on its own: no socket, no thread, handles are stand-ins."""

import time

import pytest

from chuantou_client.sessions import SessionBook


class FakePipe:
    """Like a Pipe: ``sent[0]`` a -> b, ``sent[1]`` b -> a; counts its aborts."""

    def __init__(self, a_to_b=0, b_to_a=0):
        self.sent = [a_to_b, b_to_a]
        self.aborts = 0

    def abort(self):
        self.aborts += 1


class FakeFlow:
    """Like a UDP flow: abort() and no byte counts."""

    def __init__(self):
        self.aborts = 0

    def abort(self):
        self.aborts += 1


class FakeProxy:
    pass


def a_facts(proxy=None, protocol="tcp"):
    return {"peer": "B", "port": 22, "protocol": protocol, "local_port": 2222, "owner": proxy}


def b_facts(protocol="tcp"):
    return {"peer": "A", "port": 80, "protocol": protocol}


def test_a_record_lives_while_tracked_and_is_listed_once_its_handle_is_attached():
    book = SessionBook()
    before = time.time()
    with book.track("s1", "A", **a_facts()) as record:
        assert book.get("s1") is record and record.started_at >= before
        assert book.records() == [] and len(book) == 0  # still joining its data channel
        pipe = FakePipe()
        book.attach(record, pipe)
        assert book.records() == [record] and len(book) == 1 and record.handle is pipe
    assert book.get("s1") is None and book.records() == [] and len(book) == 0
    assert pipe.aborts == 0


def test_leaving_the_block_by_an_exception_untracks_the_session():
    book = SessionBook()
    with pytest.raises(RuntimeError):
        with book.track("s1", "B", handle=FakeFlow(), **b_facts("udp")):
            raise RuntimeError("the serving thread failed")
    assert book.get("s1") is None and len(book) == 0


def test_a_session_the_relay_closed_before_its_handle_came_is_aborted_when_it_comes():
    book = SessionBook()
    with book.track("s1", "B", **b_facts()) as record:
        assert book.closed("s1", "the requester went away") == (None, None)
        pipe = FakePipe()
        book.attach(record, pipe)
        assert pipe.aborts == 1
        assert record.reason == "the requester went away"
    # So is one tracked only after the relay closed it, with its handle from the start.
    book.closed("s2", "gone")
    flow = FakeFlow()
    with book.track("s2", "B", handle=flow, **b_facts("udp")):
        assert flow.aborts == 1


def test_closing_a_running_session_gives_its_handle_and_its_proxy_once():
    book, proxy, pipe = SessionBook(), FakeProxy(), FakePipe()
    with book.track("s1", "A", handle=pipe, **a_facts(proxy)):
        assert book.closed("s1", "the target reset it") == (pipe, proxy)
        assert book.closed("s1", "again") == (pipe, None)
        assert book.close_reason("s1") == "again"
    assert book.closed("s1", "late") == (None, None)  # not remembered as an ended owner either


def test_a_reason_that_comes_after_the_session_ended_still_reaches_its_proxy():
    book, proxy = SessionBook(), FakeProxy()
    with book.track("s1", "A", **a_facts(proxy)):
        pass  # e.g. joining the data channel failed
    assert book.closed("s1", "the target refused") == (None, proxy)
    assert book.closed("s1", "twice") == (None, None)
    with book.track("s2", "B", **b_facts()):  # sessions as B have no owner to remember
        pass
    assert book.closed("s2", "whatever") == (None, None)


def test_the_memories_of_reasons_and_of_ended_owners_are_bounded():
    book = SessionBook(reasons=3, owners=2)
    for i in range(5):
        book.closed(f"r{i}", f"reason {i}")
    assert [book.close_reason(f"r{i}") for i in range(5)] == [None, None, "reason 2", "reason 3", "reason 4"]
    proxies = [FakeProxy() for _ in range(3)]
    for i, proxy in enumerate(proxies):
        with book.track(f"o{i}", "A", **a_facts(proxy)):
            pass
    assert [book.closed(f"o{i}", "x")[1] for i in range(3)] == [None, proxies[1], proxies[2]]


def test_bytes_of_sessions_as_b_reach_the_totals_and_stay_there_when_they_end():
    book = SessionBook()
    b_pipe, a_pipe = FakePipe(), FakePipe()  # B: Pipe(relay, service); A: Pipe(user, relay)
    with book.track("b", "B", handle=b_pipe, **b_facts()):
        with book.track("a", "A", handle=a_pipe, **a_facts()):
            b_pipe.sent[:] = [100, 7]  # received from the relay 100, sent back 7
            a_pipe.sent[:] = [5000, 9000]  # A's bytes count in its proxy's figures, not here
            assert book.byte_totals() == (100, 7)
        assert book.byte_totals() == (100, 7)
        b_pipe.sent[:] = [150, 8]
    assert book.byte_totals() == (150, 8)
    book.add_bytes(1, 2)  # a closed proxy's
    assert book.byte_totals() == (151, 10)
    with book.track("u", "B", handle=FakeFlow(), **b_facts("udp")):  # UDP flows have no counts here
        pass
    assert book.byte_totals() == (151, 10)


def test_connection_info_says_what_each_side_sent_and_received():
    book = SessionBook()
    with book.track("a" * 32, "A", handle=FakePipe(10, 20), **a_facts()) as on_a, \
            book.track("b" * 32, "B", handle=FakePipe(30, 40), **b_facts()) as on_b, \
            book.track("c" * 32, "A", handle=FakeFlow(), **a_facts(protocol="udp")) as udp:
        info = on_a.connection_info()
        assert info == {"id": "a" * 32, "shortId": "a" * 8, "side": "A", "peer": "B", "port": 22, "protocol": "tcp",
                        "startedAt": on_a.started_at, "sealed": True, "path": "relay", "localPort": 2222,
                        "bytesSent": 10, "bytesReceived": 20}
        info = on_b.connection_info()
        assert "localPort" not in info and (info["bytesReceived"], info["bytesSent"]) == (30, 40)
        info = udp.connection_info()
        assert info["protocol"] == "udp" and info["localPort"] == 2222 and "bytesSent" not in info
        assert info["sealed"] is True  # UDP is sealed too (udpseal.py), unless the peer cannot seal
        assert info["path"] == "relay"  # a flow that has not gone direct (FakeFlow has no path)
        udp.sealed = False  # such a peer, allowed by --allow-unsealed
        assert udp.connection_info()["sealed"] is False


def test_abort_all_aborts_running_sessions_or_only_the_tcp_ones():
    book = SessionBook()
    pipe_a, pipe_b, flow = FakePipe(), FakePipe(), FakeFlow()
    with book.track("a", "A", handle=pipe_a, **a_facts()), book.track("b", "B", handle=pipe_b, **b_facts()), \
            book.track("u", "A", handle=flow, **a_facts(protocol="udp")), book.track("j", "B", **b_facts()):
        assert book.abort_all(tcp_only=True) == 2
        assert (pipe_a.aborts, pipe_b.aborts, flow.aborts) == (1, 1, 0)
        assert book.abort_all() == 3
        assert (pipe_a.aborts, pipe_b.aborts, flow.aborts) == (2, 2, 1)


def test_an_older_record_with_the_same_id_leaving_does_not_untrack_the_newer():
    book = SessionBook()
    older = book.track("s1", "B", **b_facts())
    older.__enter__()
    with book.track("s1", "B", handle=FakePipe(), **b_facts()) as newer:
        older.__exit__(None, None, None)
        assert book.get("s1") is newer
    assert book.get("s1") is None
