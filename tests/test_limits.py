"""The shared limit helpers: source keys, the token bucket and the once-a-minute limit log."""

import logging

from common.limits import LimitLog, TokenBucket, source_key


def test_source_key_groups_an_ipv6_64_and_keeps_ipv4_addresses_apart():
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("192.0.2.1") != source_key("192.0.2.2")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("not an address") == "not an address"


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=10, burst=5)
    now = bucket.stamp
    assert all(bucket.take(now=now) for _ in range(5))
    assert not bucket.take(now=now)
    assert bucket.take(now=now + 0.15)  # one token back after 1/rate seconds
    assert not bucket.take(now=now + 0.15)


def test_limit_log_logs_once_per_source_per_interval_but_counts_every_bite(caplog):
    limits = LimitLog(logging.getLogger("chuantou.test"), interval=60.0)
    with caplog.at_level(logging.WARNING, logger="chuantou.test"):
        for _ in range(5):
            limits.bit("handshakes", "192.0.2.1", "too many handshakes from %s", "192.0.2.1")
        limits.bit("handshakes", "192.0.2.2", "too many handshakes from %s", "192.0.2.2")
    assert limits.count("handshakes") == 6
    assert len([r for r in caplog.records if r.name == "chuantou.test"]) == 2
