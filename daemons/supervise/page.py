"""The human's side of the supervisor: a page on 127.0.0.1 and a JSON API behind the user's token.

    GET  /?token=T                       sets the token as a cookie and redirects to /
    GET  /                               the page (it polls /api/state, so new requests show up unasked)
    GET  /api/state?page=N               bottles (status, approved hosts, requests waiting, recent blocked
                                         requests, bound secrets by name with their use), the waiting requests PAGE_SIZE at a time (page N, from 0),
                                         the RECENT last decided ones: bounded however many wait
    GET  /api/held/<review_id>/diff      the whole change of a held push, cut at DIFF_CHARS
    POST /api/requests/<id>/approve      {}
    POST /api/requests/<id>/deny         {"reason": "..."}
    POST /api/requests/<id>/answer       {"text": "..."}
    POST /api/bottles/<bottle>/deny-all  {"reason": "..."}: deny every request of the bottle that waits
    POST /api/bottles/<bottle>/revoke    {"host": "..."}: an approved host is no longer allowed

Every request needs the token, as the cookie or `Authorization: Bearer T`; decisions are recorded as made
by "page". A POST must be JSON (a cross-site form cannot send that), and the cookie is SameSite=Strict.
The Host must be this listener's own address, so a DNS-rebound name does not reach it.

Text the guest wrote reaches the page as data (the API's JSON) and is shown by the page's `visible`,
the page's counterpart of daemons/shown.py: escapes for control, format, bidi, zero-width and other
invisible characters, long texts cut with a count. The page never uses it as HTML.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from daemons.gate import review
from daemons.proxy.refusals import SecretUses, refusals
from daemons.shown import unicode_form
from daemons.supervise import approved, requests
from daemons.supervise.store import SuperviseError, load_bottles
from daemons.supervise.waiting import Waiters

COOKIE = 'bottle_supervise_token'
DECIDED_BY = 'page'
PAGE_SIZE = 20          # waiting requests per page of the state
BLOCKED_SHOWN = 10      # refused requests shown per bottle
SECRETS_SHOWN = 20      # bound secrets listed per bottle
COMMITS_SHOWN = 20      # of a held push, in the state (the diff has them all)
FILES_SHOWN = 50
DIFF_CHARS = 1_000_000


def page_app(state_dir: Path, token: str, port: int, waiters: Waiters | None = None) -> Starlette:
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
        if refused := refusal(request):
            return refused
        try:
            number = max(0, int(request.query_params.get('page', '0')))
        except ValueError:
            number = 0
        return JSONResponse(await asyncio.to_thread(overview, state_dir, number))

    async def held_diff(request: Request) -> Response:
        if refused := refusal(request):
            return refused
        return JSONResponse(await asyncio.to_thread(diff_of, state_dir, request.path_params['review_id']))

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

    def wake(decided) -> None:
        if waiters is not None:
            for one in decided:
                waiters.woken(one.id)

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
        wake([decided])
        return JSONResponse({**decided.to_json(), **({'granted': requests.granted(decided)}
                                                     if decided.state == 'approved' else {})})

    async def deny_all(request: Request) -> Response:
        body = await decision(request)
        if isinstance(body, Response):
            return body
        try:
            denied = await asyncio.to_thread(requests.deny_all, state_dir, request.path_params['bottle'], DECIDED_BY,
                                             str(body.get('reason', '')))
        except SuperviseError as err:
            return JSONResponse({'error': str(err)}, 409)
        wake(denied)
        return JSONResponse({'denied': [one.id for one in denied]})

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
        Route('/api/held/{review_id}/diff', held_diff),
        Route('/api/requests/{request_id}/{action:str}', decide, methods=['POST']),
        Route('/api/bottles/{bottle}/deny-all', deny_all, methods=['POST']),
        Route('/api/bottles/{bottle}/revoke', revoke, methods=['POST']),
    ])


SECRET_USES = SecretUses()


def secrets_of(entry: dict) -> list[dict]:
    """The bottle's bound secrets as the page lists them: name, hosts, header, how many requests used each;
    from its rules file (never a value: the proxy alone has those; nor the placeholder, of no use here)."""
    try:
        bound = json.loads(Path(entry['rules']).read_text()).get('secrets') or []
    except (OSError, ValueError, AttributeError):
        return []
    uses = SECRET_USES(Path(entry['log']))
    return [{'name': str(s.get('name')), 'hosts': [str(h) for h in s.get('hosts') or []], 'header': str(s.get('header')),
             'uses': uses.get(str(s.get('name')), 0)} for s in bound if isinstance(s, dict)][:SECRETS_SHOWN]


def overview(state_dir: Path, number: int = 0) -> dict:
    """Everything the page shows, bounded: page `number` of the waiting requests."""
    try:
        gate, bottles = load_bottles(state_dir)
    except SuperviseError as err:
        return {'error': str(err), 'bottles': [], 'requests': [], 'pending_total': 0, 'page': 0, 'pages': 1}
    statuses = requests.statuses(state_dir)
    waiting = requests.pending_count(state_dir)
    shown = []
    for name, entry in sorted(bottles.items()):
        try:
            hosts = approved.read(Path(entry['approved']))
        except SuperviseError as err:
            hosts = [f'({err})']
        shown.append({'name': name, 'status': statuses.get(name), 'approved_hosts': hosts,
                      'pending': waiting.get(name, 0), 'blocked': refusals(Path(entry['log']), BLOCKED_SHOWN),
                      'secrets': secrets_of(entry)})
    total = sum(waiting.values())
    pages = max(1, -(-total // PAGE_SIZE))
    number = min(number, pages - 1)
    listed = requests.pending(state_dir, offset=number * PAGE_SIZE, limit=PAGE_SIZE) + requests.recent(state_dir)
    return {'bottles': shown, 'requests': [_shown(request, gate) for request in listed], 'pending_total': total,
            'page': number, 'pages': pages, 'page_size': PAGE_SIZE}


def _shown(request, gate: Path | None) -> dict:
    """A request as the page gets it: with what the gate computed of a push still held."""
    data = request.to_json()
    if request.kind == 'egress':
        data['host_unicode'] = unicode_form(request.payload['host'])
    if request.kind == 'push' and request.state == 'pending' and gate is not None:
        try:
            item = review.find(gate, request.payload['review_id'])
        except review.ReviewError:
            item = None
        if item is not None:
            data['push'] = {'count': item.count, 'commits': item.commits[:COMMITS_SHOWN],
                            'base': item.base, 'files': item.files[:FILES_SHOWN],
                            'files_total': len(item.files) + item.files_more, 'added': item.added,
                            'deleted': item.deleted, 'note': item.note}
    return data


def diff_of(state_dir: Path, review_id: str) -> dict:
    """{"diff", "cut"} of a held push (cut: characters not sent), or {"error"}."""
    gate = load_bottles(state_dir)[0]
    try:
        item = review.find(gate, review_id) if gate is not None else None
        if item is None:
            return {'error': f'no push is held as {review_id[:40]!r}'}
        text = review.diff(gate, item)
    except review.ReviewError as err:
        return {'error': str(err)}
    return {'diff': text[:DIFF_CHARS], 'cut': max(0, len(text) - DIFF_CHARS)}


PAGE = r'''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>claude-bottle supervisor</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222 }
h1 { font-size: 1.4em } h2 { font-size: 1.15em; margin-top: 1.5em }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .6em .9em; margin: .5em 0 }
.pending { border-color: #d08000; background: #fff8ec }
.kind { font-weight: 600 } .muted { color: #666; font-size: .9em } code { background: #f2f2f2; padding: 0 .2em }
.label { color: #555; font-weight: 600 } .field { white-space: pre-wrap; overflow-wrap: anywhere; unicode-bidi: isolate }
.esc { background: #ffd7d7; color: #900; font-family: monospace; border-radius: 2px; padding: 0 .1em }
.cut, .intl { color: #900; font-style: italic }
pre.diff { max-height: 40em; overflow: auto; background: #f7f7f7; padding: .5em; white-space: pre }
button { margin: .3em .3em 0 0 } input { width: 24em }
#error { color: #b00000 } #notice { color: #005a00 }
</style></head>
<body>
<h1>claude-bottle supervisor</h1>
<p id="error"></p>
<p id="notice"></p>
<h2>Requests</h2>
<div id="paging" class="muted"></div>
<div id="requests"><p class="muted">loading…</p></div>
<h2>Bottles</h2>
<div id="bottles"></div>
<p class="muted">An approved host stays approved across relaunches of its bottle until you revoke it here. To make
it part of the bottle for good, add it to <code>network.allow_hosts</code> in the agent's manifest.</p>
<script>
"use strict";
let shownRequests = "";
let page = 0;
const openDiffs = new Map();

// What the guest wrote, made visible: the page's counterpart of daemons/shown.py. Control, format (bidi,
// zero-width), separator, private-use, unassigned and invisible characters, and every space but " ", are
// shown as escapes; a text longer than `limit` characters is cut with a count. Always as text, never HTML.
const HIDDEN = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\uffa0\ufe00-\ufe0f\u{e0100}-\u{e01ef}]/u;

function escaped(ch) {
  const code = ch.codePointAt(0);
  const hex = code.toString(16);
  return code < 0x100 ? "\\x" + hex.padStart(2, "0") : code < 0x10000 ? "\\u" + hex.padStart(4, "0")
                                                                       : "\\U" + hex.padStart(8, "0");
}

const MARK = /[\p{Mn}\p{Me}]/u;
const MARKS = 2;        // combining marks in a row shown as they are (more stack over the text around)
const SPACES = 3;       // spaces in a row shown as they are in a field (more: their count)

function visible(text, limit = 500, foldSpaces = true) {
  const fragment = document.createDocumentFragment();
  const chars = Array.from(text === null || text === undefined ? "" : String(text));
  let run = "";
  let marks = 0;
  const flush = () => {
    const shown = foldSpaces ? run.replace(new RegExp(` {${SPACES + 1},}`, "g"), m => ` [${m.length} spaces] `) : run;
    if (shown) fragment.append(document.createTextNode(shown));
    run = "";
  };
  for (const ch of chars.slice(0, limit)) {
    marks = MARK.test(ch) ? marks + 1 : 0;
    if ((ch !== " " && HIDDEN.test(ch)) || marks > MARKS) {
      flush();
      fragment.append(el("span", escaped(ch), "esc"));
    } else {
      run += ch;
    }
  }
  flush();
  if (chars.length > limit) {
    fragment.append(el("span", `... [${chars.length - limit} more characters not shown]`, "cut"));
  }
  return fragment;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

// One labelled line: "label: value", the value made visible.
function field(label, value, limit, cls) {
  const line = el("div", null, "field" + (cls ? " " + cls : ""));
  const shown = el("bdi", null, "value");
  shown.append(visible(value, limit));
  line.append(el("span", label + ": ", "label"), shown);
  return line;
}

async function post(id, action, body) {
  await send(`/api/requests/${encodeURIComponent(id)}/${action}`, body);
}

async function send(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const answer = await response.json();
  document.getElementById("error").replaceChildren(visible(response.ok ? "" : answer.error, 2000));
  document.getElementById("notice").replaceChildren(visible(response.ok && answer.granted ? "approved: " + answer.granted
    : response.ok && answer.denied ? `denied ${answer.denied.length} request(s)` : "", 2000));
  refresh();
}

function hostField(r) {
  const line = field("host", r.host, 300, "host");
  if (r.host_unicode) {
    line.append(el("span", " (an international name; in Unicode \u201c", "intl"), visible(r.host_unicode, 300),
                el("span", "\u201d, which may imitate another name)", "intl"));
  }
  return line;
}

function pushFields(r, card) {
  card.append(field("ref", r.ref), field("repository", r.repo), field("commit", r.new));
  const push = r.push;
  if (!push) return;
  const commits = el("div", null, "commits");
  commits.append(field("commits", `${push.count}` + (push.count > push.commits.length
    ? `, the newest ${push.commits.length} shown, ${push.count - push.commits.length} more not shown` : "")));
  const list = el("ul");
  for (const commit of push.commits) {
    const item = el("li");
    item.append(visible(commit, 250));
    list.append(item);
  }
  commits.append(list);
  card.append(commits);
  const files = el("div", null, "files");
  files.append(field("files changed", `${push.files_total}, +${push.added} -${push.deleted} lines against ` +
                     push.base.slice(0, 12) + (push.files_total > push.files.length
                       ? `; ${push.files_total - push.files.length} more files not shown` : "")));
  const fileList = el("ul");
  for (const [path, added, deleted, kind] of push.files) {
    const item = el("li", added === null ? "binary " : `+${added} -${deleted} `);
    item.append(visible(path, 300));
    if (kind) item.append(el("span", ` (${kind})`, "kind-of-change"));
    fileList.append(item);
  }
  files.append(fileList);
  card.append(files);
  if (push.note) card.append(field("note", push.note, 1000, "note"));
  const show = el("button", openDiffs.has(r.review_id) ? "Hide diff" : "Show diff", "diff");
  show.onclick = () => toggleDiff(r.review_id);
  card.append(show);
  if (openDiffs.has(r.review_id)) card.append(openDiffs.get(r.review_id));
}

async function toggleDiff(reviewId) {
  if (openDiffs.has(reviewId)) {
    openDiffs.delete(reviewId);
  } else {
    const answer = await (await fetch(`/api/held/${encodeURIComponent(reviewId)}/diff`)).json();
    const pre = el("pre", null, "diff");
    if (answer.error) pre.append(visible(answer.error));
    for (const line of (answer.diff || "").split("\n")) pre.append(visible(line, 4000, false), "\n");
    if (answer.cut) pre.append(el("span", `... [${answer.cut} more characters: doit held --id ${reviewId} --diff]`, "cut"));
    openDiffs.set(reviewId, pre);
  }
  shownRequests = "";
  refresh();
}

function requestCard(r) {
  const card = el("div", null, "card" + (r.state === "pending" ? " pending" : ""));
  card.id = `request-${r.id}`;
  const head = {egress: "asks to reach a host", push: "asks to have a held push reviewed",
                question: "asks a question"}[r.kind];
  const title = el("div", null, "kind");
  title.append(visible(r.bottle, 100), ` ${head}`);
  card.append(title);
  if (r.kind === "egress") {
    card.append(hostField(r), field("reason", r.reason, 1000, "reason"));
  } else if (r.kind === "push") {
    pushFields(r, card);
  } else {
    card.append(field("question", r.question, 2000, "question"));
    if (r.choices.length) {
      const line = el("div", null, "field");
      line.append(el("span", "choices: ", "label"));
      r.choices.forEach((choice, i) => line.append(i ? " | " : "", visible(choice, 100)));
      card.append(line);
    }
  }
  card.append(el("div", `request ${r.id}, ${r.created}: ${r.state}` +
                 (r.answered_by ? ` by ${r.answered_by} at ${r.decided}` : ""), "muted"));
  if (r.answer && r.kind !== "push") card.append(field("answer", r.answer, 1000));
  if (r.state !== "pending") return card;
  const reason = el("input");
  reason.placeholder = r.kind === "question" ? "your answer" : "reason (when denying)";
  if (r.kind === "question") {
    for (const choice of r.choices) {
      const button = el("button", null, "choice");
      button.append(visible(choice, 100));
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
  card.id = `bottle-${b.name}`;
  const title = el("div", null, "kind");
  title.append(visible(b.name, 100));
  card.append(title);
  card.append(b.status ? field(`status (${b.status.time})`, b.status.text, 1000, "status")
                       : el("div", "no status reported", "muted"));
  if (b.pending) {
    card.append(el("div", `${b.pending} request(s) waiting`, "muted"));
    const denyAll = el("button", `Deny all ${b.pending} waiting`, "deny-all");
    denyAll.onclick = () => send(`/api/bottles/${encodeURIComponent(b.name)}/deny-all`, {reason: ""});
    card.append(denyAll);
  }
  card.append(el("div", "approved hosts: " + (b.approved_hosts.length ? "" : "none"), "muted"));
  for (const host of b.approved_hosts) {
    const revoke = el("button", null, "revoke");
    revoke.append("Revoke ", visible(host, 300));
    revoke.onclick = () => send(`/api/bottles/${encodeURIComponent(b.name)}/revoke`, {host});
    card.append(revoke);
  }
  for (const x of b.secrets || []) {
    const item = el("div", null, "secret");
    item.append(visible(`secret ${x.name}: goes in ${x.header} to ${x.hosts.join(", ")}; used by ${x.uses} request(s)`, 600));
    card.append(item);
  }
  if (b.blocked.length) {
    card.append(el("div", "recently blocked:", "muted"));
    const list = el("ul");
    for (const x of b.blocked) {
      const item = el("li", null, "blocked");
      item.append(visible(`${x.time} ${x.method} ${x.host}:${x.port}${x.path || ""}: ${x.reason}`, 600));
      list.append(item);
    }
    card.append(list);
  }
  return card;
}

function paging(state) {
  const bar = document.getElementById("paging");
  bar.replaceChildren(`${state.pending_total} waiting` + (state.pages > 1
    ? `; page ${state.page + 1} of ${state.pages} (${state.page_size} per page) ` : ""));
  if (state.page > 0) {
    const back = el("button", "Newer", "page-back");
    back.onclick = () => { page = state.page - 1; shownRequests = ""; refresh(); };
    bar.append(back);
  }
  if (state.page + 1 < state.pages) {
    const next = el("button", "Older", "page-next");
    next.onclick = () => { page = state.page + 1; shownRequests = ""; refresh(); };
    bar.append(next);
  }
}

async function refresh() {
  let state;
  try {
    const response = await fetch(`/api/state?page=${page}`);
    if (!response.ok) throw new Error(await response.text());
    state = await response.json();
  } catch (err) {
    document.getElementById("error").replaceChildren(visible(`cannot reach the supervisor: ${err.message}`, 2000));
    return;
  }
  if (state.error) document.getElementById("error").replaceChildren(visible(state.error, 2000));
  page = state.page;
  paging(state);
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
