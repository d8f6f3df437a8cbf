"""The commands a person runs by name, never part of a launch: `doit status` (status.py), `doit prune`
(prune.py), and the human's side of the supervisor and the git gate: `doit supervise`, `held`, `approve`,
`reject`, `answer`, `revoke` (review.py)."""
