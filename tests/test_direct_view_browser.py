"""The direct path on the admin pages, in headless Chromium (issue 15): the client page shows a
UDP flow's path and the NAT, the relay page shows the session as direct and the bytes the
clients report beside what it relayed. Screenshots go to test-artifacts/."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from admin_support import client_app, relay  # noqa: F401 (fixtures)
from helpers import UdpEchoService, udp_roundtrip, wait_until
from test_admin_browser import CHROMEDRIVER, LAPTOP, Console, cell, find, log_in, parse_bytes, screenshot, wait
from test_admin_browser import driver  # noqa: F401 (fixture)

from selenium.webdriver.common.by import By  # noqa: E402 (test_admin_browser skips without selenium)

pytestmark = pytest.mark.skipif(not Path(CHROMEDRIVER).exists(),
                                reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.mark.timeout(120)
def test_both_pages_show_a_direct_flow(relay, client_app, make_client, services, driver):  # noqa: F811
    make_client(relay, "B", path="auto")  # (make_client's clients use the relay unless told)
    echo = services(UdpEchoService())
    proxy = client_app.client.create_proxy(0, "B", echo.port, protocol="udp")
    console = Console(driver)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.bind(("127.0.0.1", 0))
        for i in range(10):
            assert udp_roundtrip(user, proxy.local_port, b"x" * 1000) == b"x" * 1000
        wait_until(lambda: [c["path"] for c in client_app.client.connections()] == ["direct"],
                   message="the flow to go direct")

        driver.get(client_app.admin.login_link())
        wait(driver, lambda d: "filtering" in d.find_element(By.ID, "stat-nat").text, "the NAT probe's result")
        assert driver.find_element(By.ID, "stat-path").text == "auto"
        conn_row = wait(driver, lambda d: find(d, "#connections tbody tr[data-key]"), "the flow listed")
        assert cell(conn_row, 5).lower().startswith("direct")
        assert parse_bytes(cell(conn_row, 5)) >= 10 * 1000  # sent on the direct path
        screenshot(driver, "client-direct-laptop", LAPTOP)

        log_in(driver, relay)
        row = wait(driver, lambda d: find(d, "#sessions tbody tr[data-key]"), "the session listed")
        wait(driver, lambda d: cell(find(d, "#sessions tbody tr[data-key]"), 9).lower().startswith("direct"),
             "the session shown as direct")
        assert "reported by A" in cell(row, 9).replace("\n", " ")
        assert parse_bytes(cell(row, 6)) == 0  # the relay carried none of it
        wait(driver, lambda d: d.find_element(By.ID, "stat-direct").text not in ("–", "0 B"),
             "the reported direct bytes")
        screenshot(driver, "relay-direct-laptop", LAPTOP)
    assert console.errors(allow=(r"/favicon.ico .*404",)) == []

