"""The demo web client in a real browser (headless Chromium driven by Selenium) against the dev host,
Azurite and the sandbox: connect through the sandbox's sign-in and consent pages, see the account,
send a message with an attachment, list the inbox — and an error journey (admin consent required).

Every step saves a screenshot to test-artifacts/browser/; a failure names them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ARTIFACTS, Host, wait_for

SHOTS = ARTIFACTS / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("Browser tests need Debian's chromium and chromium-driver (.ci/run installs them).")
    pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def _spki_sha256(cert_path: Path) -> str:
    """Base64 SHA-256 of the sandbox leaf's public key: Chromium trusts exactly that key, nothing else."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class Browser:
    def __init__(self, driver: Any) -> None:
        self.d = driver
        self.shots: list[Path] = []

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{len(self.shots) + 1:02d}-{name}.png"
        self.d.save_screenshot(str(path))
        self.shots.append(path)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.d.find_elements(By.CSS_SELECTOR, selector))

    def wait(self, condition: Any, what: str, timeout: float = 30) -> Any:
        try:
            return wait_for(lambda: _quiet(condition), timeout=timeout, what=what)
        except AssertionError as e:
            self.fail(str(e), what.replace(" ", "-"))

    def fail(self, message: str, name: str) -> None:
        """Fail naming every screenshot of the journey (and one of the page as it is now)."""
        try:
            self.shot(name + "-failed")
        except Exception as e:  # the browser itself may be gone
            message += f" (no screenshot: {e})"
        raise AssertionError(f"{message}\nscreenshots: {', '.join(str(p) for p in self.shots)}\n"
                             f"page URL: {self.d.current_url}")

    def text(self, selector: str) -> str:
        return str(self.css(selector).text)


def _quiet(condition: Any) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return condition()
    except (NoSuchElementException, StaleElementReferenceException):
        return None


@pytest.fixture(scope="module")
def browser(sandbox: Any) -> Iterator[Browser]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from devstack.certs import ensure_certs

    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,1000", f"--user-data-dir={profile}",
                f"--ignore-certificate-errors-spki-list={_spki_sha256(ensure_certs().server_cert)}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    b = Browser(driver)
    yield b
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open_demo(b: Browser, host: Host) -> None:
    b.d.get(host.url + "/demo/")
    b.wait(lambda: b.css("body").get_attribute("data-ready") == "true", "the demo page to load")


def _step(b: Browser, name: str, check: Any) -> None:
    """Run an assertion about what the user sees; on failure, say which screenshots show it."""
    b.shot(name)
    try:
        check()
    except AssertionError as e:
        b.fail(str(e), name)


def _accounts(b: Browser) -> list[dict[str, str]]:
    return [{"email": r.find_element("css selector", ".email").text,
             "type": r.find_element("css selector", ".type").text,
             "status": r.find_element("css selector", ".status").text}
            for r in b.all("#accounts tbody tr")]


def test_connect_send_and_read_in_a_browser(browser: Browser, host: Host, control: Any) -> None:
    b = browser
    _open_demo(b, host)
    _step(b, "demo-loaded", lambda: (
        _assert("demo-user" in b.text("#who"), b.text("#who")),
        _assert(b.css("#no-accounts").is_displayed(), "the empty-state line should show"),
        _assert(not b.css("#send").is_enabled(), "Send must wait for an account"),
        # The seeding instructions name this stack's sandbox, not a fixed port.
        _assert(b.text("#sandbox-url") == host.env["MS_AUTHORITY_HOST"], b.text("#sandbox-url")),
    ))

    # Connect without a hint: the sandbox shows its account picker, then the permissions page.
    b.css("#connect").click()
    b.wait(lambda: "Pick an account" in b.d.page_source, "the sandbox sign-in page")
    _step(b, "sandbox-sign-in", lambda: _assert(b.d.current_url.startswith("https://localhost:"), b.d.current_url))
    b.css("button[value='adele@contoso.onmicrosoft.com']").click()
    b.wait(lambda: "Permissions requested" in b.d.page_source, "the sandbox consent page")
    _step(b, "sandbox-consent", lambda: (
        _assert("Mail.Send" in b.d.page_source, "the consent page lists the scopes"),
        _assert("offline_access" in b.d.page_source, "offline_access is requested"),
    ))
    b.css("button[value='accept']").click()

    # Back on the demo page: the callback redirected with status=connected, the list shows the account.
    b.wait(lambda: b.d.current_url.startswith(host.url + "/demo/") and b.css("#banner").is_displayed(),
           "the return to the demo page")
    b.wait(lambda: _accounts(b), "the accounts list")
    _step(b, "connected", lambda: (
        _assert(b.text("#banner") == "Mailbox connected.", b.text("#banner")),
        _assert("status=" not in b.d.current_url, "the result is removed from the address bar"),
        _assert(_accounts(b) == [{"email": "adele@contoso.onmicrosoft.com", "type": "work", "status": "active"}],
                _accounts(b)),
        _assert(b.css("#send").is_enabled(), "Send is enabled once an account is selected"),
    ))

    # Send a message with an attachment (multipart/form-data through the public API).
    attachment = ARTIFACTS / "browser-attachment.txt"
    content = b"Quarterly numbers\n" * 2000
    attachment.write_bytes(content)
    before = len(control.sent("adele@contoso.onmicrosoft.com"))
    to = b.css("#send-to")
    to.clear()
    to.send_keys("someone@example.com")
    subject = b.css("#send-subject")
    subject.clear()
    subject.send_keys("Browser journey")
    b.css("#send-file").send_keys(str(attachment))
    b.css("#send").click()
    b.wait(lambda: b.text("#send-result") not in ("", "Sending…"), "the send result")
    sent = control.sent("adele@contoso.onmicrosoft.com")[before:]
    _step(b, "sent", lambda: (
        _assert(b.text("#send-result").startswith("Sent at"), b.text("#send-result")),
        _assert("browser-attachment.txt" in b.text("#send-result"), b.text("#send-result")),
        _assert(len(sent) == 1, f"exactly one message reached Graph, got {len(sent)}"),
        _assert(sent[0]["message"]["subject"] == "Browser journey", sent[0]["message"]),
        _assert(sent[0]["message"]["toRecipients"][0]["emailAddress"]["address"] == "someone@example.com",
                sent[0]["message"]),
        _assert([(a["name"], a["size"]) for a in sent[0]["message"]["attachments"]] ==
                [("browser-attachment.txt", len(content))], sent[0]["message"]["attachments"]),
    ))

    # The inbox (seeded by the sandbox), then Sent Items with the message just sent.
    b.css("#load-messages").click()
    b.wait(lambda: b.all("#messages li[data-message-id]"), "the inbox list")
    _step(b, "inbox", lambda: _assert(len(b.all("#messages li[data-message-id]")) >= 1, "inbox messages are listed"))

    # Reply to the first inbox message from the list: one answer, in that message's conversation.
    before = len(control.sent("adele@contoso.onmicrosoft.com"))
    b.css("#messages li[data-message-id] [data-testid=reply]").click()
    b.css("#messages [data-testid=reply-text]").send_keys("Replying from the demo")
    b.css("#messages [data-testid=reply-send]").click()
    b.wait(lambda: b.text("#messages [data-testid=reply-result]") not in ("", "Sending…"), "the reply result")
    replies = control.sent("adele@contoso.onmicrosoft.com")[before:]
    _step(b, "replied", lambda: (
        _assert(b.text("#messages [data-testid=reply-result]").startswith("Replied at"),
                b.text("#messages [data-testid=reply-result]")),
        _assert(len(replies) == 1 and replies[0]["via"] == "reply", replies),
        _assert(replies[0]["message"]["subject"].startswith("RE: "), replies[0]["message"]["subject"]),
    ))
    from selenium.webdriver.support.ui import Select

    Select(b.css("#folder")).select_by_value("sentitems")
    b.css("#load-messages").click()
    b.wait(lambda: any("Browser journey" in li.text for li in b.all("#messages li")), "Sent Items to list the message")
    _step(b, "sent-items", lambda: _assert(
        any("Browser journey" in li.text and "📎" in li.text for li in b.all("#messages li")),
        "the sent message with its attachment marker"))


def test_popup_connect_posts_the_result_to_the_opener(browser: Browser, host: Host) -> None:
    b = browser
    _open_demo(b, host)
    main = b.d.current_window_handle
    b.css("#login-hint").send_keys("pat@outlook.com")  # auto sign-in: the sandbox's login_hint path
    b.css("#connect-popup").click()
    # The popup signs in, lands on the connector's result page, which posts to window.opener, and the
    # demo closes it: all of it can be over before a poll would see the popup, so wait for the outcome.
    b.wait(lambda: b.d.window_handles == [main] and "(popup)" in b.text("#banner"),
           "the opener to receive the popup's result and close the popup")
    assert b.d.current_url == host.url + "/demo/"  # the page itself never navigated
    b.wait(lambda: b.css("#banner").is_displayed() and "pat@outlook.com" in b.text("#accounts"),
           "the popup's result in the opener")
    _step(b, "popup-connected", lambda: (
        _assert(b.text("[data-testid=banner-text]") == "Mailbox connected (popup).", b.text("#banner")),
        _assert({"email": "pat@outlook.com", "type": "personal", "status": "active"} in _accounts(b), _accounts(b)),
    ))


def test_consent_required_user_sees_a_clear_error(browser: Browser, host: Host) -> None:
    b = browser
    _open_demo(b, host)
    accounts_before = _accounts(b)
    b.css("#connect").click()
    b.wait(lambda: "Pick an account" in b.d.page_source, "the sandbox sign-in page")
    b.css("button[value='user@fabrikam.onmicrosoft.com']").click()
    b.wait(lambda: "Need admin approval" in b.d.page_source, "the sandbox admin-approval page")
    _step(b, "need-admin-approval", lambda: _assert("AADSTS90094" in b.d.page_source, "the AADSTS90094 notice"))
    b.css("button[value='admin_cancel']").click()
    b.wait(lambda: b.d.current_url.startswith(host.url + "/demo/") and b.css("#banner").is_displayed(),
           "the return to the demo page")
    _step(b, "consent-error", lambda: (
        _assert("error" in (b.css("#banner").get_attribute("class") or ""), "the banner is an error"),
        _assert(b.text("[data-testid=banner-text]").startswith("Could not connect the mailbox:"),
                b.text("#banner")),
        _assert("consent" in b.text("[data-testid=banner-text]").lower(), b.text("#banner")),
        _assert(b.text("[data-testid=banner-hint]").endswith("(error code: consent_required)"), b.text("#banner")),
        _assert("/organizations/v2.0/adminconsent?client_id=" in b.text("[data-testid=banner-hint]"),
                "the hint carries the admin-consent URL to send to an administrator"),
        _assert("/organizations/v2.0/adminconsent?client_id=" in
                (b.css("[data-testid=banner-hint] a").get_attribute("href") or ""), "the admin-consent URL is a link"),
        _assert(_accounts(b) == accounts_before, "nothing was added to the accounts list"),
    ))


def test_a_narrow_window_reads_a_message_body_safely(browser: Browser, host: Host, control: Any) -> None:
    """At 420 px (a phone, an Office task pane): nothing overflows sideways, times are local and to the minute,
    a message opens to its body, and an HTML body is shown as text (its script never runs)."""
    b = browser
    b.d.set_window_size(420, 900)
    try:
        _open_demo(b, host)
        b.css("#login-hint").send_keys("megan@contoso.onmicrosoft.com")
        b.css("#connect-popup").click()
        b.wait(lambda: "megan@contoso.onmicrosoft.com" in b.text("#send-as"), "megan's account to be selected")
        control.seed_messages("megan@contoso.onmicrosoft.com", [{
            "subject": "Narrow body", "body": {"contentType": "html", "content":
                "<html><head><style>p{color:red}</style></head><body><p>Hello <b>there</b></p>"
                "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'></body></html>"}}])
        b.css("#load-messages").click()
        b.wait(lambda: any("Narrow body" in li.text for li in b.all("#messages li[data-message-id]")), "the message")
        li = next(li for li in b.all("#messages li[data-message-id]") if "Narrow body" in li.text)
        li.find_element("css selector", "[data-testid=open]").click()
        b.wait(lambda: li.find_element("css selector", "[data-testid=message-body]").text not in ("", "Loading…"),
               "the message body")
        body = li.find_element("css selector", "[data-testid=message-body]").text
        meta = li.find_element("css selector", ".muted").text
        buttons = [e.rect for e in li.find_elements("css selector", "button")]
        row = [e.rect for e in b.all("#accounts tbody tr")[0].find_elements("css selector", "button")]
        _step(b, "narrow-message-body", lambda: (
            _assert(b.d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"),
                    "the page scrolls sideways at 420 px"),
            _assert("Hello there" in body, body),
            _assert("pwned" not in body and "color:red" not in body, body),
            _assert(b.d.execute_script("return window.pwned === undefined"), "the message's script ran"),
            # Local time to the minute, not Graph's "2026-12-07T08:05:01.1234567Z".
            _assert(not re.search(r"\d{4}-\d\d-\d\dT|:\d\d\.\d", meta), meta),
            _assert(buttons[0]["x"] + buttons[0]["width"] < buttons[1]["x"] or buttons[0]["y"] != buttons[1]["y"],
                    f"the Open and Reply buttons touch: {buttons}"),
            _assert(all(a["x"] + a["width"] < c["x"] or a["y"] != c["y"] for a, c in pairwise(row)),
                    f"the account's buttons touch: {row}"),
        ))
        icon = host.http.get(host.url + "/demo/" + b.css("link[rel=icon]").get_attribute("href").rsplit("/", 1)[-1],
                             timeout=30)
        assert icon.status_code == 200 and icon.headers["Content-Type"] == "image/svg+xml"
    finally:
        b.d.set_window_size(1200, 1000)


def _assert(ok: bool, message: Any) -> None:
    if not ok:
        raise AssertionError(str(message))


def test_team_mailbox_connect_add_send_and_list_in_a_browser(browser: Browser, host: Host, control: Any) -> None:
    """An administrator connects the tenant (admin consent), then the demo adds support@, sends and lists as it."""
    b = browser
    support = "support@contoso.onmicrosoft.com"
    _open_demo(b, host)
    b.css("#connect-tenant").click()
    # First the administrator signs in (who consents, and for which tenant), then Entra's admin-consent page.
    b.wait(lambda: "Pick an account" in b.d.page_source, "the sandbox sign-in page")
    b.css("button[value='admin@contoso.onmicrosoft.com']").click()
    b.wait(lambda: "Permissions requested" in b.d.page_source, "the sandbox consent page of the sign-in")
    b.css("button[value='accept']").click()
    b.wait(lambda: "accept for your organization" in b.d.page_source, "the sandbox admin-consent page")
    _step(b, "admin-sign-in", lambda: _assert("(administrator)" in b.d.page_source, "the administrator is marked"))
    b.css("a[href*='login_hint=admin%40contoso.onmicrosoft.com'] button").click()
    b.wait(lambda: b.d.current_url.startswith(host.url + "/demo/") and b.css("#banner").is_displayed(),
           "the return to the demo page")
    b.wait(lambda: b.all("#tenants tbody tr"), "the tenants list")
    _step(b, "tenant-connected", lambda: (
        _assert(b.text("#banner").startswith("Tenant connected"), b.text("#banner")),
        _assert("active" in b.text("#tenants tbody tr"), b.text("#tenants tbody tr")),
    ))
    b.css("[data-testid=mailbox-address]").send_keys(support)
    b.css("[data-testid=add-mailbox]").click()
    b.wait(lambda: any(a["email"] == support for a in _accounts(b)), "the team mailbox in the accounts list")
    _step(b, "team-mailbox-added", lambda: (
        _assert(b.text("#banner") == "Team mailbox added: " + support, b.text("#banner")),
        _assert({"email": support, "type": "team mailbox", "status": "active"} in _accounts(b), _accounts(b)),
        _assert(b.text("#send-as") == "as " + support, b.text("#send-as")),
    ))
    before = len(control.sent(support))
    to = b.css("#send-to")
    to.clear()
    to.send_keys("someone@example.com")
    subject = b.css("#send-subject")
    subject.clear()
    subject.send_keys("From the support desk")
    b.css("#send").click()
    b.wait(lambda: b.text("#send-result") not in ("", "Sending…"), "the send result")
    sent = control.sent(support)[before:]
    _step(b, "team-sent", lambda: (
        _assert(b.text("#send-result").startswith("Sent at"), b.text("#send-result")),
        _assert([s["message"]["subject"] for s in sent] == ["From the support desk"], sent),
    ))
    b.css("#load-messages").click()
    b.wait(lambda: b.all("#messages li[data-message-id]"), "the shared mailbox's inbox")
    _step(b, "team-inbox", lambda: _assert(len(b.all("#messages li[data-message-id]")) >= 1, "messages listed"))
