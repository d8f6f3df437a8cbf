"""The host side of a project's bottles below the task graph: the daemons, and what they and the graph
stand on. Nothing here imports `tasks`.

    lifecycle.py     start a daemon detached, know it by its pid file, check it (cheap `running`, real
                     `healthy`), stop it; one exclusive file lock (`locked`)
    service.py       a service only the egress proxy speaks to: its key, port record, restart on changed
                     secrets, credentials or code (the git gate and the supervisor are two)
    atomic.py        writing a file so readers see the old one or the whole new one
    hostprograms.py  the programs claude-bottle runs on the host, each with its Debian package
    proxy/           the egress proxy: control.py (host side), serve.py + addon.py + doors.py + bounds.py
                     (mitmproxy), rules, what a request says (message.py), the CA; and what every daemon
                     uses: logbound.py (bounded logs), statedir.py (exit once the state directory is gone)
    gate/            the git gate: control.py, serve.py (ASGI), the receive hooks, reviews, mirrors
    supervise/       the supervisor: control.py, serve.py (MCP server and page), the requests, approvals
"""
