"""Machine runtimes behind one small protocol (protocol.py).

A backend turns a handful of verbs into CLI calls: list the machines, build an image artifact,
create/start/stop/delete a machine, copy a file in, run a command, and give the argv that attaches a
terminal. Task modules speak only these verbs; they never learn which runtime is underneath.

    protocol.py   the abstract Backend, its records, errors and labels
    pick.py       backend(name): the process-wide instance of a runtime, so all tasks share one probe
    detect.py     which backend works here, for agents that name none
    smolvm.py     smolvm (the primary); registry.py serves a local base to it as an OCI image
    docker.py     the docker CLI family: docker and podman

This package's own module is empty of code, so that a runtime's module, which imports the protocol, never
imports the factory that imports it.
"""
