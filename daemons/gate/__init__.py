"""The git gate: one host daemon per project through which bottles clone, fetch and push.

control.py starts and checks it (host side, the project's Python); serve.py is the daemon (an ASGI app
in front of `git http-backend`); hook.py is its pre- and post-receive policy; review.py lists, approves
and rejects held pushes. config.py reads bottles.json, store.py lays out the state directory and
upstream.py runs the host-side git commands that use the host's credentials."""
