"""The supervisor: one host daemon per project, an MCP server the agents in its bottles ask (for a host,
a push review, an answer) and a page on 127.0.0.1 where the human answers.

control.py starts and checks it (host side, the project's Python); serve.py is the daemon (the MCP tools
and one uvicorn for both ports); page.py is the human's page and JSON API; requests.py holds the
requests and the decisions (what the page and the command line call); store.py lays out the state
directory and the sqlite database."""
