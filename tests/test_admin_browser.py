"""The admin pages in headless Chromium, driven with Selenium: the relay's page shows clients and
a live session and closes it; the client's page adds a proxy through its form, shows the
connection and bytes rise as we fetch through it, deletes it, and shows a bad port's error
inline. Screenshots at laptop and phone widths go to test-artifacts/."""

from __future__ import annotations

import re
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from admin_support import ADMIN_TOKEN, Pump
from admin_support import client_app, clients, relay, user_sockets  # noqa: F401 (fixtures)
from helpers import free_port, text_service

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT = 20.0
LAPTOP, PHONE = (1366, 900), (390, 844)
PAGE_BYTES = 512 * 1024
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}

pytestmark = pytest.mark.skipif(not Path(CHROMEDRIVER).exists(),
                                reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)")


# --- helpers ----------------------------------------------------------------------------------

def parse_bytes(text: str) -> float:
    """'1.50 MiB' -> 1572864.0; what the pages show back to a number."""
    match = re.search(r"([\d.]+) (B|KiB|MiB|GiB)", text)
    assert match, f"no byte count in {text!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def wait(driver, predicate, message: str, timeout: float = WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d), message)


def find(driver, css: str):
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def cell(row, index: int) -> str:
    return row.find_elements(By.TAG_NAME, "td")[index].text


class Console:
    """The browser's console log, collected as it is drained."""

    def __init__(self, driver):
        self.driver = driver
        self.entries: list[dict] = []

    def errors(self, allow: tuple[str, ...] = ()) -> list[str]:
        self.entries += self.driver.get_log("browser")
        return [e["message"] for e in self.entries
                if e["level"] == "SEVERE" and not any(re.search(pattern, e["message"]) for pattern in allow)]


def screenshot(driver, name: str, size: tuple[int, int]) -> Path:
    """A full-page screenshot at a laptop or phone viewport, saved under test-artifacts/."""
    width, height = size
    mobile = width < 600
    metrics = {"width": width, "height": height, "deviceScaleFactor": 2 if mobile else 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    wait(driver, lambda d: d.execute_script("return window.innerWidth") == width, "the viewport to resize")
    full = max(height, driver.execute_script("return document.documentElement.scrollHeight"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": full})
    wait(driver, lambda d: d.execute_script("return window.innerHeight") == full, "the viewport to grow")
    # The chart redraws on resize; one animation frame later it has.
    driver.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]))")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def driver(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--window-size={LAPTOP[0]},{LAPTOP[1]}", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_script_timeout(WAIT)
    yield browser
    browser.quit()


@pytest.fixture
def web_service(services) -> int:
    """The port of a web service on B's side whose every page is PAGE_BYTES long."""
    return services(text_service(b"a" * PAGE_BYTES, "browser-web")).port


# --- the relay's page -------------------------------------------------------------------------

def log_in(driver, relay, token: str = ADMIN_TOKEN) -> None:
    """Open the relay's page and log in through its form."""
    driver.get(f"http://127.0.0.1:{relay.port}/")
    wait(driver, lambda d: find(d, "#token"), "the login form").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(driver, lambda d: find(d, "#clients"), "the admin page after logging in")


@pytest.mark.timeout(90)
def test_server_page_shows_clients_and_a_live_session(relay, clients, tcp_echo, user_sockets, driver):
    a, _ = clients("A"), clients("B")
    proxy = a.create_proxy(0, "B", tcp_echo.port, "tcp")
    user = user_sockets(proxy.local_port)
    pump = Pump(user, "svc-browser-pump", size=64_000, pause=0.05)
    console = Console(driver)
    try:
        log_in(driver, relay)
        assert driver.title == "chuantou relay"
        wait(driver, lambda d: find(d, '#clients tr[data-key="A"]') and find(d, '#clients tr[data-key="B"]'),
             "both clients listed")
        session_id = wait(driver, lambda d: [s.id for s in relay.sessions.all() if s.joined], "the relay's session")[0]
        row_css = f'#sessions tr[data-key="{session_id}"]'
        row = wait(driver, lambda d: find(d, row_css), "the session listed")
        assert "A" in cell(row, 1) and "B" in cell(row, 1)
        assert cell(row, 2) == str(tcp_echo.port) and cell(row, 3) == "TCP"
        assert cell(row, 4).lower() == "sealed (end to end)"
        first = parse_bytes(cell(row, 6))
        wait(driver, lambda d: parse_bytes(cell(find(d, row_css), 6)) > first, "bytes sent by A to rise")
        wait(driver, lambda d: d.find_element(By.ID, "stat-rate").text not in ("0 B/s", "–"), "a live throughput")
        assert driver.find_element(By.ID, "stat-clients").text == "2"
        # A's "Sent" cell: the bytes, then the current rate.
        wait(driver, lambda d: cell(find(d, '#clients tr[data-key="A"]'), 5).split("\n")[-1] != "0 B/s", "A's rate")
        wait(driver, lambda d: float(d.find_element(By.ID, "chart").get_attribute("data-peak") or 0) > 0,
             "the chart to show the traffic")
        system = driver.find_element(By.ID, "system").text
        assert "Heartbeat timeout" in system and "Memory (RSS)" in system and "Open sockets" in system
        warning = driver.find_element(By.ID, "open-relay")  # this relay has no token
        assert warning.is_displayed() and "--no-auth" in warning.text

        screenshot(driver, "server-laptop", LAPTOP)
        screenshot(driver, "server-phone", PHONE)
    finally:
        pump.stop()

    # Close the session from the page: two clicks (the first arms the button).
    button = find(driver, f"{row_css} td.actions button")
    button.click()
    wait(driver, lambda d: find(d, f"{row_css} td.actions button").text == "Close?", "the button to arm")
    find(driver, f"{row_css} td.actions button").click()
    wait(driver, lambda d: find(d, "#sessions tr.empty"), "the empty sessions list")
    assert "No active session" in driver.find_element(By.CSS_SELECTOR, "#sessions tr.empty").text
    user.settimeout(WAIT)
    try:
        while user.recv(65536):  # what was in flight, then the end
            pass
    except ConnectionResetError:
        pass
    assert not relay.sessions.all()
    assert console.errors() == []


@pytest.mark.timeout(60)
def test_server_page_empty_states(relay, driver):
    console = Console(driver)
    log_in(driver, relay)
    wait(driver, lambda d: find(d, "#clients tr.empty") and find(d, "#sessions tr.empty"), "empty lists")
    assert "No client is connected" in find(driver, "#clients tr.empty").text
    wait(driver, lambda d: d.find_element(By.ID, "live").text == "live", "the live badge")
    assert console.errors() == []


@pytest.mark.timeout(60)
def test_server_login_form_when_the_relay_has_a_token(relay, driver):
    relay.reconfigure(token="browser-test-token-0123456789")  # a client token: not the admin one
    console = Console(driver)
    driver.get(f"http://127.0.0.1:{relay.port}/")
    token_input = wait(driver, lambda d: find(d, "#token"), "the login form")
    token_input.send_keys("wrong token")
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(driver, lambda d: d.find_element(By.ID, "message").text == "wrong admin token", "the login error")
    token_input.clear()
    token_input.send_keys(relay.config.token)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(driver, lambda d: d.find_element(By.ID, "message").text == "wrong admin token",
         "the client token refused")  # the message is the same; it was cleared and set again
    token_input.clear()
    token_input.send_keys(relay.config.admin_token)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(driver, lambda d: find(d, "#clients tr.empty"), "the admin page after logging in")
    wait(driver, lambda d: d.find_element(By.ID, "system").text, "the first status poll")
    assert not driver.find_element(By.ID, "open-relay").is_displayed()  # a token: not an open relay
    assert relay.config.token not in driver.page_source and relay.config.admin_token not in driver.page_source
    assert driver.get_cookies()[0]["httpOnly"] is True
    assert driver.execute_script("return document.cookie") == ""  # HttpOnly: scripts cannot read it
    find(driver, "#logout").click()
    wait(driver, lambda d: find(d, "#token"), "the login form after logging out")
    assert console.errors(allow=(r"/login - Failed to load resource.*401",)) == []


# --- the client's page ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_client_page_needs_the_login_link_once(client_app, driver):
    console = Console(driver)
    port = client_app.admin.port
    driver.get(f"http://127.0.0.1:{port}/")
    wait(driver, lambda d: find(d, "#key"), "the login page")
    assert "login-link" in driver.find_element(By.TAG_NAME, "body").text

    link = client_app.admin.login_link()
    driver.get(link)
    wait(driver, lambda d: d.find_element(By.ID, "client-id").text == "A", "the page after the link")
    assert driver.current_url == f"http://127.0.0.1:{port}/"  # the code does not stay in the address bar
    [cookie] = driver.get_cookies()
    assert cookie["name"] == f"chuantou_client_{port}"
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert driver.execute_script("return document.cookie") == ""

    driver.find_element(By.ID, "logout").click()
    wait(driver, lambda d: find(d, "#key"), "the login page after logging out")
    driver.get(link)  # used once already: no second login
    wait(driver, lambda d: "used up" in d.find_element(By.TAG_NAME, "body").text, "the used link refused")
    driver.get(f"http://127.0.0.1:{port}/")
    wait(driver, lambda d: find(d, "#key"), "still the login page")
    # allowed: the used link's 401, and the favicon the browser looks for beside a plain-text answer
    assert console.errors(allow=(r"/login\?key=.*401", r"/api/.*401", r"/favicon.ico .*404")) == []


@pytest.mark.timeout(120)
def test_client_page_adds_uses_and_deletes_a_proxy(client_app, clients, web_service, user_sockets, driver):
    clients("B")
    console = Console(driver)
    driver.get(client_app.admin.login_link())  # logs in, then on to /
    assert driver.title == "chuantou client"
    wait(driver, lambda d: d.find_element(By.ID, "state").text.lower() == "connected", "the connected state")
    assert driver.find_element(By.ID, "client-id").text == "A"
    assert driver.find_element(By.ID, "server-url").text == client_app.server_url
    wait(driver, lambda d: find(d, "#proxies tr.empty") and find(d, "#connections tr.empty"), "empty lists")

    # "Connect" on another client pre-fills the form.
    peer = wait(driver, lambda d: find(d, '#peers li[data-client="B"] button'), "B among the online clients")
    peer.click()
    assert driver.find_element(By.ID, "target-client").get_attribute("value") == "B"
    assert driver.switch_to.active_element.get_attribute("id") == "target-port"

    local_port = free_port()
    driver.find_element(By.ID, "local-port").send_keys(str(local_port))
    driver.find_element(By.ID, "target-port").send_keys(str(web_service))
    Select(driver.find_element(By.ID, "protocol")).select_by_value("tcp")
    driver.find_element(By.ID, "bandwidth").send_keys("10MiB/s")
    driver.find_element(By.ID, "add-button").click()
    row_css = f'#proxies tr[data-key="{local_port}"]'
    row = wait(driver, lambda d: find(d, row_css), "the new proxy listed")
    assert "proxy created" in driver.find_element(By.ID, "form-message").text
    assert cell(row, 0) == f"localhost:{local_port}" and cell(row, 1) == f"B:{web_service}"
    assert cell(row, 8).startswith("10.0 MiB/s")  # its bandwidth limit
    assert client_app.settings["proxies"][-1]["bandwidth"] == 10 * 1024 * 1024

    # A connection held open shows as active, here and in the connections list.
    held = user_sockets(local_port)
    assert cell(row, 3).lower() == "sealed"
    wait(driver, lambda d: cell(find(d, row_css), 4).startswith("1"), "one active connection")
    conn_row = wait(driver, lambda d: find(d, "#connections tbody tr[data-key]"), "the connection listed")
    assert "A · OUT" in cell(conn_row, 0).upper()
    assert cell(conn_row, 1) == "B" and cell(conn_row, 2) == str(web_service)
    assert cell(conn_row, 4).lower() == "sealed"

    # Fetch through the proxy: the totals and the bytes rise.
    with urllib.request.urlopen(f"http://127.0.0.1:{local_port}/", timeout=WAIT) as response:
        assert len(response.read()) == PAGE_BYTES
    wait(driver, lambda d: "2 in total" in cell(find(d, row_css), 4), "two connections in total")
    wait(driver, lambda d: parse_bytes(cell(find(d, row_css), 6)) >= PAGE_BYTES, "received bytes to rise")
    wait(driver, lambda d: parse_bytes(d.find_element(By.ID, "stat-total").text) >= PAGE_BYTES, "the totals")
    wait(driver, lambda d: float(d.find_element(By.ID, "chart").get_attribute("data-peak") or 0) > PAGE_BYTES / 10,
         "the chart to show the fetch")

    screenshot(driver, "client-laptop", LAPTOP)
    screenshot(driver, "client-phone", PHONE)

    held.close()
    wait(driver, lambda d: cell(find(d, row_css), 4).startswith("0"), "no active connection")
    wait(driver, lambda d: find(d, "#connections tr.empty"), "the connections list empty again")

    # Delete it with the row's button (two clicks).
    find(driver, f"{row_css} td.actions button").click()
    wait(driver, lambda d: find(d, f"{row_css} td.actions button").text == "Delete?", "the button to arm")
    find(driver, f"{row_css} td.actions button").click()
    wait(driver, lambda d: find(d, "#proxies tr.empty"), "the proxy gone")
    assert "proxy deleted" in driver.find_element(By.ID, "form-message").text
    assert not client_app.client.proxies
    assert console.errors() == []


@pytest.mark.timeout(60)
def test_client_page_shows_a_bad_port_inline(client_app, clients, driver):
    clients("B")
    console = Console(driver)
    driver.get(client_app.admin.login_link())  # logs in, then on to /
    wait(driver, lambda d: d.find_element(By.ID, "state").text.lower() == "connected", "the connected state")
    message = driver.find_element(By.ID, "form-message")
    local = driver.find_element(By.ID, "local-port")

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        local.send_keys(str(port))
        driver.find_element(By.ID, "target-client").send_keys("B")
        driver.find_element(By.ID, "target-port").send_keys("8080")
        driver.find_element(By.ID, "add-button").click()
        expected = f"port {port} is already in use; choose another with --local-port"
        wait(driver, lambda d: message.text == expected, "the port conflict message")
    assert "error" in message.get_attribute("class")
    assert local.get_attribute("aria-invalid") == "true"

    local.clear()
    local.send_keys("70000")
    driver.find_element(By.ID, "add-button").click()
    wait(driver, lambda d: "localPort must be a port number 1-65535" in message.text, "the invalid port message")
    assert find(driver, "#proxies tr.empty")
    # The refusals reach the console only as the failed requests themselves.
    assert console.errors(allow=(r"/api/proxies - Failed to load resource.*(409|400)",)) == []
