"""Headless Chromium from Debian's packages (chromium, chromium-driver), driven by chromedriver's
WebDriver HTTP API: a human's clicks on a page, and screenshots of it."""
from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx2

POLL_SECONDS = 0.1
POLL_LIMIT = 600        # polls before giving up on chromedriver starting or the page showing something


class Browser:
    """Headless Chromium from Debian's packages, driven by chromedriver's WebDriver HTTP API."""

    ELEMENT = 'element-6066-11e4-a52e-4f735466cecf'     # the WebDriver spec's key of an element reference

    def __init__(self, directory: Path):
        self.log = directory / 'chromedriver.log'
        self.driver = subprocess.Popen(['chromedriver', '--port=0'], stdout=self.log.open('w'),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        port = None
        for _ in range(POLL_LIMIT):
            found = re.search(r'started successfully on port (\d+)', self.log.read_text())
            if found:
                port = int(found.group(1))
                break
            assert self.driver.poll() is None, self.log.read_text()
            time.sleep(POLL_SECONDS)
        assert port, f'chromedriver did not start: {self.log.read_text()}'
        self.http = httpx2.Client(base_url=f'http://127.0.0.1:{port}', timeout=60)
        session = self.call('POST', '/session', {'capabilities': {'alwaysMatch': {
            'browserName': 'chrome', 'goog:chromeOptions': {'binary': shutil.which('chromium'), 'args': [
                '--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1100,800',
                f'--user-data-dir={directory / "profile"}']}}}})
        self.session = f'/session/{session["sessionId"]}'

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, path: str, body: dict | None = None):
        response = self.http.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()['value']

    def open(self, url: str) -> None:
        self.call('POST', f'{self.session}/url', {'url': url})

    def find(self, css: str) -> str | None:
        response = self.http.post(f'{self.session}/element', json={'using': 'css selector', 'value': css})
        return response.json()['value'][self.ELEMENT] if response.status_code == 200 else None

    def wait_for(self, css: str) -> str:
        for _ in range(POLL_LIMIT):
            if element := self.find(css):
                return element
            time.sleep(POLL_SECONDS)
        raise AssertionError(f'the page never showed {css}')

    def text(self, element: str) -> str:
        """What the element shows (its rendered text)."""
        return self.call('GET', f'{self.session}/element/{element}/text')

    def script(self, body: str, *args):
        """The value of a script run in the page (the body of a function of `args`)."""
        return self.call('POST', f'{self.session}/execute/sync', {'script': body, 'args': list(args)})

    def click(self, element: str) -> None:
        self.call('POST', f'{self.session}/element/{element}/click', {})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call('GET', f'{self.session}/screenshot')))

    def close(self) -> None:
        try:
            self.http.delete(self.session)
        finally:
            self.http.close()
            os.killpg(self.driver.pid, signal.SIGTERM)
            self.driver.wait(timeout=30)
