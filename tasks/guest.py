"""Where things go inside a bottle, and how its one way out looks from inside."""
from __future__ import annotations

import json
import os

from daemons.proxy.rules import GATE_HOST, SUPERVISE_HOST    # standard library only, shared with the proxy
from tasks.manifest import Agent

SKILLS_DIR_ENV = 'CLAUDE_BOTTLE_GUEST_SKILLS_DIR'
MANAGED_SKILLS = '.claude-bottle-skills'   # in the skills dir: the skills claude-bottle put there

# The door: the host's per-bottle socket appears at DOOR in the guest (docker and podman mount
# its directory, smolvm the socket itself). The machine's workload relays the guest's
# 127.0.0.1:3128 to it, so it comes back with every start; `nodelay` spares about 40 ms a request.
DOOR = '/run/bottle/egress.sock'
PROXY_PORT = 3128
PROXY_URL = f'http://127.0.0.1:{PROXY_PORT}'
DOOR_RELAY = ('socat', f'TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,reuseaddr,fork,nodelay', f'UNIX-CONNECT:{DOOR}')

# The egress CA's certificate (never its key) in the guest's trust store, and the bundle
# update-ca-certificates makes of the whole store.
CA_CERT = '/usr/local/share/ca-certificates/claude-bottle-egress.crt'
CA_BUNDLE = '/etc/ssl/certs/ca-certificates.crt'
NO_PROXY = 'localhost,127.0.0.1,::1'

# The git gate, as the guest's git sees it: plain HTTP to a name only the proxy knows, through
# the door (the proxy adds who is speaking). The gate's part of the system gitconfig is its own file.
GATE_URL = f'http://{GATE_HOST}'
GATE_GITCONFIG = '/etc/claude-bottle/gitconfig'

# In the environment of every guest process, Claude Code's included: it reads the proxy and
# NODE_EXTRA_CA_CERTS only from its own environment, and with no proxy variable it retries
# silently instead of failing. NODE_USE_ENV_PROXY makes node's own fetch (node 22.21, 24+) use them.
EGRESS_ENV = {
    'HTTPS_PROXY': PROXY_URL, 'https_proxy': PROXY_URL, 'HTTP_PROXY': PROXY_URL, 'http_proxy': PROXY_URL,
    'NO_PROXY': NO_PROXY, 'no_proxy': NO_PROXY, 'NODE_USE_ENV_PROXY': '1',
    'NODE_EXTRA_CA_CERTS': CA_CERT, 'SSL_CERT_FILE': CA_BUNDLE, 'REQUESTS_CA_BUNDLE': CA_BUNDLE,
    'GIT_SSL_CAINFO': CA_BUNDLE,
}


# The supervisor, as the guest's Claude Code sees it: an MCP server over plain HTTP to a name only the
# proxy knows, through the door, which adds who is speaking and the supervisor's key: nothing secret
# is registered. The per-call limit is past the bounded wait, so the supervisor's "still pending"
# answer comes first; progress keeps the call alive meanwhile.
SUPERVISE_MCP = 'supervise'
SUPERVISE_URL = f'http://{SUPERVISE_HOST}/mcp'
SUPERVISE_TIMEOUT_MARGIN = 120


def supervise_registration(agent: Agent) -> str:
    """The JSON of `claude mcp add-json`, or "" for an agent that is not supervised."""
    if not agent.supervise:
        return ''
    return json.dumps({'type': 'http', 'url': SUPERVISE_URL,
                       'timeout': (agent.supervise_wait + SUPERVISE_TIMEOUT_MARGIN) * 1000})


def writable_paths(agent: Agent) -> dict[str, str]:
    """What the guest may write, on its bounded disk (tasks/backends/disk.py), each with the owner it gets
    when the image lacks it: the user's home, the scratch directories, where provisioning writes as root
    (/etc: the trust store, /etc/environment, the system gitconfig; /root; the CA's directory), and the
    skills directory wherever it is (the agent's, as provisioning would make it)."""
    agent_owned = f'{agent.user.uid}:{agent.user.uid}'
    root = '0:0'
    return {agent.user.home: agent_owned, '/tmp': root, '/var/tmp': root, '/etc': root, '/root': root,
            os.path.dirname(CA_CERT): root, skills_dir(agent): agent_owned}


def prompt_path(agent: Agent) -> str:
    return f'{agent.user.home}/.claude-bottle/system-prompt.md'


def skills_dir(agent: Agent) -> str:
    return os.environ.get(SKILLS_DIR_ENV) or f'{agent.user.home}/.claude/skills'
