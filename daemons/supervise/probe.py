"""The supervisor's health probe: the official MCP client, from the host, as Claude Code would connect."""
from __future__ import annotations

import asyncio

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from daemons.proxy.rules import LISTEN_HOST, SUPERVISE_KEY_HEADER

PROBE_SECONDS = 5.0


async def tool_names(port: int, key: str) -> set[str]:
    """The legacy initialize handshake, as Claude Code does it, then tools/list."""
    async with asyncio.timeout(PROBE_SECONDS):
        async with httpx2.AsyncClient(headers={SUPERVISE_KEY_HEADER: key}, timeout=PROBE_SECONDS) as http:
            transport = streamable_http_client(f'http://{LISTEN_HOST}:{port}/mcp', http_client=http)
            async with Client(transport, mode='legacy') as client:
                return {tool.name for tool in (await client.list_tools()).tools}
