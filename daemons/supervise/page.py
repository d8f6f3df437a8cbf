"""The human's side of the supervisor: a page on 127.0.0.1 and a JSON API behind the user's token.

    GET  /?token=T                       sets the token as a cookie and redirects to /
    GET  /                               the page (it polls /api/state, so new requests show up unasked)
    GET  /api/state                      bottles (status, approved hosts, recent blocked requests) and requests
    POST /api/requests/<id>/approve      {}
    POST /api/requests/<id>/deny         {"reason": "..."}
    POST /api/requests/<id>/answer       {"text": "..."}
    POST /api/bottles/<bottle>/revoke    {"host": "..."}: an approved host is no longer allowed

Every request needs the token, as the cookie or `Authorization: Bearer T`; decisions are recorded as made
by "page". A POST must be JSON (a cross-site form cannot send that), and the cookie is SameSite=Strict.
The Host must be this listener's own address, so a DNS-rebound name does not reach it.
"""
from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from daemons.proxy.refusals import refusals
from daemons.supervise import approved, requests
from daemons.supervise.store import SuperviseError, load_bottles

COOKIE = 'bottle_supervise_token'
DECIDED_BY = 'page'


def page_app(state_dir: Path, token: str, port: int) -> Starlette:
    hosts = {f'127.0.0.1:{port}', f'localhost:{port}'}

    def refusal(request: Request) -> Response | None:
        if request.headers.get('host') not in hosts:
            return PlainTextResponse('supervise: this page answers only on 127.0.0.1\n', 421)
        given = request.cookies.get(COOKIE) or request.headers.get('authorization', '').removeprefix('Bearer ')
        if not hmac.compare_digest(given.encode(), token.encode()):
            return PlainTextResponse('supervise: the token is missing or wrong; open the page by the address with '
                                     '?token= that `doit supervise` prints\n', 401)
        return None

    async def page(request: Request) -> Response:
        given = request.query_params.get('token')
        if given is not None and request.headers.get('host') in hosts and hmac.compare_digest(given.encode(),
                                                                                               token.encode()):
            response = RedirectResponse('/', 303)
            response.set_cookie(COOKIE, token, httponly=True, samesite='strict', path='/')
            return response
        return refusal(request) or HTMLResponse(PAGE)

    async def state(request: Request) -> Response:
        return refusal(request) or JSONResponse(await asyncio.to_thread(overview, state_dir))

    async def decision(request: Request) -> Response | dict:
        """The JSON object a decision sends, or the response refusing it."""
        if refused := refusal(request):
            return refused
        if request.headers.get('content-type', '').split(';')[0].strip() != 'application/json':
            return JSONResponse({'error': 'send the decision as JSON (Content-Type: application/json)'}, 415)
        try:
            body = await request.json()
        except ValueError:
            body = None
        return body if isinstance(body, dict) else JSONResponse({'error': 'the body must be a JSON object'}, 400)

    async def decide(request: Request) -> Response:
        body = await decision(request)
        if isinstance(body, Response):
            return body
        request_id, action = request.path_params['request_id'], request.path_params['action']
        try:
            if action == 'approve':
                decided = await asyncio.to_thread(requests.approve, state_dir, request_id, DECIDED_BY)
            elif action == 'deny':
                decided = await asyncio.to_thread(requests.deny, state_dir, request_id, DECIDED_BY,
                                                  str(body.get('reason', '')))
            else:
                decided = await asyncio.to_thread(requests.answer, state_dir, request_id, DECIDED_BY,
                                                  str(body.get('text', '')))
        except SuperviseError as err:
            return JSONResponse({'error': str(err)}, 409)
        return JSONResponse(decided.to_json())

    async def revoke(request: Request) -> Response:
        body = await decision(request)
        if isinstance(body, Response):
            return body
        try:
            await asyncio.to_thread(requests.revoke, state_dir, request.path_params['bottle'], str(body.get('host')))
        except SuperviseError as err:
            return JSONResponse({'error': str(err)}, 409)
        return JSONResponse({'revoked': body.get('host')})

    return Starlette(routes=[
        Route('/', page),
        Route('/api/state', state),
        Route('/api/requests/{request_id}/{action:str}', decide, methods=['POST']),
        Route('/api/bottles/{bottle}/revoke', revoke, methods=['POST']),
    ])


def overview(state_dir: Path) -> dict:
    """Everything the page shows."""
    try:
        bottles = load_bottles(state_dir)[1]
    except SuperviseError as err:
        return {'error': str(err), 'bottles': [], 'requests': []}
    statuses = requests.statuses(state_dir)
    shown = []
    for name, entry in sorted(bottles.items()):
        try:
            hosts = approved.read(Path(entry['approved']))
        except SuperviseError as err:
            hosts = [f'({err})']
        shown.append({'name': name, 'status': statuses.get(name), 'approved_hosts': hosts,
                      'blocked': refusals(Path(entry['log']))})
    return {'bottles': shown, 'requests': [r.to_json() for r in requests.recent(state_dir)]}


PAGE = '''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>claude-bottle supervisor</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222 }
h1 { font-size: 1.4em } h2 { font-size: 1.15em; margin-top: 1.5em }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .6em .9em; margin: .5em 0 }
.pending { border-color: #d08000; background: #fff8ec }
.kind { font-weight: 600 } .muted { color: #666; font-size: .9em } code { background: #f2f2f2; padding: 0 .2em }
button { margin: .3em .3em 0 0 } input { width: 24em }
#error { color: #b00000 }
</style></head>
<body>
<h1>claude-bottle supervisor</h1>
<p id="error"></p>
<h2>Requests</h2>
<div id="requests"><p class="muted">loading…</p></div>
<h2>Bottles</h2>
<div id="bottles"></div>
<p class="muted">An approved host stays approved across relaunches of its bottle until you revoke it here. To make
it part of the bottle for good, add it to <code>network.allow_hosts</code> in the agent's manifest.</p>
<script>
"use strict";
let shownRequests = "";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

async function post(id, action, body) {
  await send(`/api/requests/${encodeURIComponent(id)}/${action}`, body);
}

async function send(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const answer = await response.json();
  document.getElementById("error").textContent = response.ok ? "" : answer.error;
  refresh();
}

function what(r) {
  if (r.kind === "egress") return [`wants to reach ${r.host}`, `because: ${r.reason}`];
  if (r.kind === "push") return [`wants ${r.ref} at ${r.new.slice(0, 12)} pushed to ${r.repo}`,
                                 r.commits.join("\\n")];
  return [`asks: ${r.question}`, r.choices.length ? `choices: ${r.choices.join(", ")}` : ""];
}

function requestCard(r) {
  const card = el("div", null, "card" + (r.state === "pending" ? " pending" : ""));
  card.id = `request-${r.id}`;
  const [head, detail] = what(r);
  card.append(el("div", `${r.bottle} ${head}`, "kind"));
  if (detail) card.append(el("pre", detail));
  card.append(el("div", `request ${r.id}, ${r.created}: ${r.state}` +
                 (r.answered_by ? ` by ${r.answered_by} at ${r.decided}` : "") +
                 (r.answer && r.kind !== "push" ? ` — ${r.answer}` : ""), "muted"));
  if (r.state !== "pending") return card;
  const reason = el("input");
  reason.placeholder = r.kind === "question" ? "your answer" : "reason (when denying)";
  if (r.kind === "question") {
    for (const choice of r.choices) {
      const button = el("button", choice);
      button.onclick = () => post(r.id, "answer", {text: choice});
      card.append(button);
    }
    if (!r.choices.length) {
      card.append(reason);
      const button = el("button", "Answer");
      button.className = "answer";
      button.onclick = () => post(r.id, "answer", {text: reason.value});
      card.append(button);
    }
  } else {
    const approve = el("button", "Approve", "approve");
    approve.onclick = () => post(r.id, "approve", {});
    card.append(approve, reason);
  }
  const deny = el("button", "Deny", "deny");
  deny.onclick = () => post(r.id, "deny", {reason: reason.value});
  card.append(deny);
  return card;
}

function bottleCard(b) {
  const card = el("div", null, "card");
  card.append(el("div", b.name, "kind"));
  card.append(el("div", b.status ? `status (${b.status.time}): ${b.status.text}` : "no status reported", "muted"));
  card.append(el("div", "approved hosts: " + (b.approved_hosts.length ? "" : "none"), "muted"));
  for (const host of b.approved_hosts) {
    const revoke = el("button", `Revoke ${host}`, "revoke");
    revoke.onclick = () => send(`/api/bottles/${encodeURIComponent(b.name)}/revoke`, {host});
    card.append(revoke);
  }
  if (b.blocked.length) {
    card.append(el("div", "recently blocked:", "muted"));
    const list = el("ul");
    for (const x of b.blocked) {
      list.append(el("li", `${x.time} ${x.method} ${x.host}:${x.port}${x.path || ""}: ${x.reason}`));
    }
    card.append(list);
  }
  return card;
}

async function refresh() {
  let state;
  try {
    const response = await fetch("/api/state");
    if (!response.ok) throw new Error(await response.text());
    state = await response.json();
  } catch (err) {
    document.getElementById("error").textContent = `cannot reach the supervisor: ${err.message}`;
    return;
  }
  if (state.error) document.getElementById("error").textContent = state.error;
  // Typing in an answer box is not interrupted unless the requests themselves changed.
  const typing = document.activeElement && document.activeElement.tagName === "INPUT";
  const shown = state.requests.map(r => r.id + r.state).join();
  if (!typing || shown !== shownRequests) {
    const list = document.getElementById("requests");
    list.replaceChildren(...state.requests.map(requestCard));
    if (!state.requests.length) list.append(el("p", "no requests yet", "muted"));
    shownRequests = shown;
  }
  document.getElementById("bottles").replaceChildren(...state.bottles.map(bottleCard));
}

refresh();
setInterval(refresh, 2000);
</script>
</body></html>
'''
