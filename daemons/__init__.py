"""Host-side daemons of a project (the egress proxy now; the git gate and the supervisor later),
all started, checked and stopped through `daemons.lifecycle`."""
