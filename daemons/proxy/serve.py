"""The egress proxy process: mitmproxy with only the addons the fence needs, and the fence (addon.py).

    <mitmproxy environment>/bin/python serve.py NAME=VALUE ...

Each argument sets a mitmproxy option (mitmproxy's own `name=value` syntax, as `--set` takes).
Runs with the environment's Python: standard library and mitmproxy only, like addon.py.

mitmdump loads some 35 addons and mitmproxy hands every event to each of them; in the bench that
dispatch was about 40% of the proxy's CPU. Here the Master has the addons that serve a regular-mode
proxy with TLS interception and nothing else: no scripts, flow dumping, replay, rewriting, DNS mode
or onboarding app. Warnings and errors go to stderr (the daemon log); SIGTERM shuts down cleanly.

It listens on no TCP port: mitmproxy's `mode` list is empty, and the bottles' doors (Unix sockets, doors.py)
are opened by the addon. Files it makes are its user's only (umask 077: a door is 0600), and its open-file
limit is raised to the hard limit (two descriptors a connection, doors.CONNECTIONS a bottle); what one
connection may cost it is bounded (bounds.py), and so is its log: a line at most LOG_LINE_BYTES, at most
LOG_LINES lines a minute (mitmproxy logs a failed TLS handshake with the guest's bytes in hex), and the file
(its stdout and stderr, proxy.log) at most logbound.DAEMON_LOG_BYTES before it is rotated to proxy.log.1.
It exits by itself once the directory of its doors file is gone (statedir.py: the checkout was deleted).
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

from mitmproxy import exceptions, log, master, options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig

import addon
import bounds
import logbound
import statedir

LOG_LINE_BYTES = 1024
LOG_LINES = 60           # a minute; past it, lines are counted and the count logged when the minute is over


class BoundedLog(logging.Filter):
    """Each record cut to LOG_LINE_BYTES, at most LOG_LINES a minute: what a guest sends can reach a log line
    (mitmproxy writes a ClientHello it cannot parse in hex), and the log is on the host's disk."""

    def __init__(self):
        super().__init__()
        self.window, self.lines, self.dropped = 0, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        minute = int(record.created // 60)
        if minute != self.window:
            if self.dropped:
                record.msg = f'({self.dropped} log lines left out in the minute before) {record.getMessage()}'
                record.args = ()
            self.window, self.lines, self.dropped = minute, 0, 0
        self.lines += 1
        if self.lines > LOG_LINES:
            self.dropped += 1
            return False
        message = record.getMessage()
        if len(message) > LOG_LINE_BYTES:
            record.msg, record.args = message[:LOG_LINE_BYTES] + f'... ({len(message)} characters, cut)', ()
        return True


def needed_addons() -> list:
    return [core.Core(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(), next_layer.NextLayer(),
            tlsconfig.TlsConfig(), errorcheck.ErrorCheck()]


async def serve(settings: list[str], fence: list) -> int:
    """Run the proxy with `settings` (each `name=value`) and the `fence` addons until SIGTERM or SIGINT."""
    # Records below WARNING are dropped where they are made, not built and then filtered.
    logging.getLogger().setLevel(logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(log.MitmFormatter(colorize=False))
    to_stderr.addFilter(BoundedLog())
    logging.getLogger().addHandler(to_stderr)

    os.umask(0o077)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proxy = master.Master(options.Options())
    proxy.addons.add(*needed_addons(), *fence)
    try:
        proxy.options.update(mode=[])       # no listener of mitmproxy's own: the doors are the addon's
        proxy.options.set(*settings)
    except exceptions.OptionsError as err:
        print(f'the egress proxy cannot start: {err}', file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, proxy.shutdown)
    await proxy.run()      # exits the process with 1 when an error was logged while starting
    return 0


def main() -> int:
    logbound.bound_output()     # first: the log handler made in serve() takes the bounded sys.stderr
    bounds.apply()
    doors = [setting.partition('=')[2] for setting in sys.argv[1:] if setting.startswith('bottle_doors=')]
    if doors:
        statedir.exit_when_gone(os.path.dirname(doors[-1]))    # the project's proxy directory: gone, the proxy goes
    return asyncio.run(serve(sys.argv[1:], addon.addons))


if __name__ == '__main__':
    sys.exit(main())
