"""The door forward: bottles on an engine elsewhere (a podman system connection or docker context over SSH)
reach the fence on this host through one SSH connection per worker and project, which carries a Unix socket
forward (`ssh -R <worker socket>:<door>`) for each of the project's bottles on that worker.

connections.py reads the engines' connections (the CLI's own configuration: host, user, key); control.py starts and
checks the forward (a daemon of lifecycle.py) and says where the bottles' files are on the worker; serve.py is the
daemon: it prepares the worker's private directory, then runs the SSH connection (an OpenSSH control master) for
as long as it lives."""
