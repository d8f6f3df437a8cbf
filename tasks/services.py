"""The project's services behind the egress proxy (the git gate, the supervisor), doit's side: one task
per service that runs it for the agents that use it and routes the bottles' requests for its name to it
(rules.SERVICES), or stops it when no agent uses it. Neither costs a backend call. `stop` is also how
tasks/lifetime.py stops a service no bottle uses any more.
"""
from __future__ import annotations

from doit.tools import config_changed

from daemons.service import KeyedService
from tasks import egress
from tasks.progress import stopped
from tasks.project import Project, action


class Serving:
    """The service runs (ours, current, its port takes a connection), and the proxy routes the service's name
    to it. Cheap: its protocol is spoken at its start and by `doit status`."""

    def __init__(self, project: Project, name: str, service: KeyedService, what: str):
        self.project, self.name, self.service, self.what = project, name, service, what

    def __call__(self, task, values):
        try:
            return self.service.running() and egress.proxy(self.project).service_route(self.name) == route(self.service)
        except Exception:       # whatever the reason, the action meets it again and says it
            return False

    def __repr__(self):
        return f'{self.what} runs and the egress proxy routes the bottles to it'


class Stopped:
    def __init__(self, service: KeyedService, what: str):
        self.service, self.what = service, what

    def __call__(self, task, values):
        return self.service.daemon().pid() is None

    def __repr__(self):
        return f'{self.what} does not run'


def task(project: Project, name: str, service: KeyedService, served: dict, what: str, unused: str) -> dict:
    """`served`: the service's bottles file; empty, the service is stopped (`unused` says why)."""
    if not served:
        return {
            'actions': [(close, [project, name, service, what, unused])],
            'uptodate': [Stopped(service, what)],
        }
    return {
        'actions': [(open_, [project, name, service, served])],
        'uptodate': [config_changed(served), Serving(project, name, service, what)],
        'clean': [(close, [project, name, service, what, 'doit clean'])],
    }


def route(service: KeyedService) -> dict:
    return {'port': service.port(), 'key_file': str(service.key_file)}


@action
def open_(project: Project, name: str, service: KeyedService, served: dict):
    service.write_bottles(served)
    service.ensure_running()
    egress.proxy(project).route_service(name, service.port(), service.key_file)


def stop(project: Project, name: str, service: KeyedService, what: str, why: str):
    """Stop the service and take the proxy's route to it away; idempotent. A running one stopped is said
    in one line, with `why`."""
    running = service.daemon().pid() is not None
    service.stop()
    egress_proxy = egress.proxy(project)
    if egress_proxy.doors_file.exists():
        egress_proxy.route_service(name, None, None)
    if running:
        stopped(what, why)


close = action(stop)
