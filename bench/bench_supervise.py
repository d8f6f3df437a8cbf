#!/usr/bin/env python3
"""Supervisor benchmark: what 400 calls waiting for the human cost the daemon, how soon a decision wakes its
call, and how large the page's state is with every bottle at its cap.

    python bench/bench_supervise.py [--quick]

The supervisor is the project's (daemons/supervise), on 127.0.0.1, spoken to by the official MCP client
with the headers the egress proxy adds. 20 bottles each ask 20 questions (the cap per bottle), each call
waiting up to 600 s for an answer; then:

    idle CPU       the daemon's CPU time (user + system, /proc/<pid>/stat) over 10 s while the 400 calls
                   wait, as a share of one core
    wake, other    a question answered by another process (the command line's function, another sqlite
                   connection): the time until its waiting call returns
    wake, page     the same, answered through the page's API, in the daemon
    state bytes    the size of the page's /api/state, fetched every 2 s by each open page

Before (issue 21): each waiting call read sqlite every 0.5 s: 42% of a core with 400 waiting, and the
state carried every request (397 KB at 1,000). Figures are medians of the wake repetitions.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx2  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from daemons.proxy.control import write_rules  # noqa: E402
from daemons.proxy.rules import BOTTLE_HEADER, SUPERVISE_KEY_HEADER  # noqa: E402
from daemons.supervise import asked, requests  # noqa: E402
from daemons.supervise.control import Supervisor  # noqa: E402

BOTTLES = 20
IDLE_SECONDS = 10.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


async def waiting_calls(sup: Supervisor, names: list[str], per_bottle: int, stack: AsyncExitStack) -> dict:
    """Start `per_bottle` waiting questions per bottle; returns {question: task} once all wait."""
    key = sup.key_file.read_text()
    tasks = {}
    for name in names:
        http = await stack.enter_async_context(httpx2.AsyncClient(
            headers={BOTTLE_HEADER: name, SUPERVISE_KEY_HEADER: key}, timeout=700))
        client = await stack.enter_async_context(Client(
            streamable_http_client(f'http://127.0.0.1:{sup.port()}/mcp', http_client=http), mode='legacy'))
        for n in range(per_bottle):
            question = f'{name} question {n}'
            tasks[question] = asyncio.create_task(client.call_tool('ask_human', {'question': question}))
    while len(requests.pending(sup.state_dir)) < len(tasks):
        await asyncio.sleep(0.2)
    return tasks


async def wake(sup: Supervisor, tasks: dict, question: str, through_page: bool) -> float:
    request = next(r for r in requests.pending(sup.state_dir) if r.payload['question'] == question)
    started = time.monotonic()
    if through_page:
        async with httpx2.AsyncClient(base_url=f'http://127.0.0.1:{sup.page_port()}', timeout=30, headers={
                'Authorization': f'Bearer {sup.token_file.read_text().strip()}'}) as page:
            answered = await page.post(f'/api/requests/{request.id}/answer', json={'text': 'yes'})
            assert answered.status_code == 200, answered.text
    else:
        await asyncio.to_thread(requests.answer, sup.state_dir, request.id, 'bench (command line)', 'yes')
    result = await tasks.pop(question)
    assert not result.is_error and 'answered' in result.content[0].text, result.content
    return time.monotonic() - started


async def scenario(sup: Supervisor, names: list[str], per_bottle: int, repeats: int) -> dict:
    async with AsyncExitStack() as stack:
        return await measured(sup, names, await waiting_calls(sup, names, per_bottle, stack), repeats)


async def measured(sup: Supervisor, names: list[str], tasks: dict, repeats: int) -> dict:
    pid = sup.daemon().pid()
    before = cpu_seconds(pid)
    await asyncio.sleep(IDLE_SECONDS)
    idle = (cpu_seconds(pid) - before) / IDLE_SECONDS
    async with httpx2.AsyncClient(base_url=f'http://127.0.0.1:{sup.page_port()}', timeout=30, headers={
            'Authorization': f'Bearer {sup.token_file.read_text().strip()}'}) as page:
        state = await page.get('/api/state')
    questions = list(tasks)
    other = [await wake(sup, tasks, questions[2 * n], False) for n in range(repeats)]
    through_page = [await wake(sup, tasks, questions[2 * n + 1], True) for n in range(repeats)]
    waiting = len(tasks) + 2 * repeats
    for name in names:
        requests.deny_all(sup.state_dir, name, 'bench')
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return {'waiting': waiting, 'idle': idle, 'other': statistics.median(other),
            'page': statistics.median(through_page), 'state': len(state.content)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='2 bottles, 3 wakes: a smoke run')
    args = parser.parse_args()
    names = [f'bottle{n}' for n in range(2 if args.quick else BOTTLES)]
    with tempfile.TemporaryDirectory(prefix='bench-supervise-') as tmp:
        root = Path(tmp)
        sup = Supervisor(root / 'supervise')
        bottles = {}
        for name in names:
            write_rules(root / name / 'egress-rules.json', {'hosts': []})
            bottles[name] = {'rules': str(root / name / 'egress-rules.json'), 'approved': str(root / name / 'a.json'),
                             'log': str(root / name / 'egress.log'), 'wait_seconds': 600}
        sup.write_bottles(bottles)
        sup.ensure_running()
        try:
            figures = asyncio.run(scenario(sup, names, asked.PENDING_PER_BOTTLE, 3 if args.quick else 10))
        finally:
            sup.stop()
    print(f'calls waiting:            {figures["waiting"]}')
    print(f'daemon CPU while waiting: {figures["idle"] * 100:.1f}% of a core (before: 42% with 400)')
    print(f'wake, other process:      {figures["other"] * 1000:.0f} ms (median)')
    print(f'wake, page:               {figures["page"] * 1000:.0f} ms (median)')
    print(f'page state:               {figures["state"] / 1000:.1f} KB (before: 397 KB at 1,000 waiting)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
