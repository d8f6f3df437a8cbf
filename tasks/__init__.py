"""The task graph (doit's side of claude-bottle); dodo.py lists its families in order.

    input       manifest/ (agents/*.yaml validated), project.py (paths, templates, @action), setup_template.py
    graph       bases.py, image.py, egress.py, services.py + gate.py + supervise.py, machine.py, prompt.py,
                provision.py, launch.py: one module per task family, each module's docstring names its tasks;
                lifetime.py: the daemons stopped when no bottle uses them (teardown, prune)
    backends/   the machine runtimes behind one protocol: smolvm, docker, podman
    commands/   what a person runs by name, never part of a launch: status, prune, the supervisor's commands
    helpers     errors.py, cache.py, checks.py (up-to-date checks that ask a machine), guest.py, progress.py

It stands on daemons/ (the host-side daemons, atomic writes, the host programs), which never imports it.
"""
