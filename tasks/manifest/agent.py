"""What load_agents returns: the Agent, its image's Recipe and its GuestUser, frozen and holding checked
values only.

Apart because every task reads these, and nothing else of the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.manifest.git import GitRepo
from tasks.manifest.hosts import HostEntry
from tasks.manifest.names import machine_name
from tasks.manifest.secrets import Secret


@dataclass(frozen=True)
class GuestUser:
    name: str
    uid: int
    home: str


@dataclass(frozen=True)
class Recipe:
    """Everything that goes into an agent image."""
    base: str
    setup: str
    claude_code: str
    packages: tuple[str, ...]
    run: tuple[str, ...]
    user: GuestUser
    backend: str
    source_dir: Path = field(compare=False)  # where a relative `base` path is resolved


@dataclass(frozen=True)
class Agent:
    name: str
    manifest: Path
    prompt: str
    prompt_file: Path | None
    skills: tuple[str, ...]
    skills_dir: Path
    recipe: Recipe
    cpus: int
    memory_mib: int
    disk_gib: int
    hosts: tuple[HostEntry, ...]
    allow_private: tuple[str, ...]
    addresses: dict[str, str]
    claude_code_hosts: tuple[HostEntry, ...]
    env: dict[str, str]
    secrets: tuple[Secret, ...]
    user: GuestUser
    backend: str
    project: str
    git: tuple[GitRepo, ...] = ()
    supervise: bool = True
    supervise_wait: int = 600
    skill_hosts: tuple[HostEntry, ...] = ()     # declared by the agent's skills (SKILL_HOSTS_KEY)
    engine: str | None = None                   # a podman system connection; None: this host's engine

    @property
    def machine(self) -> str:
        return machine_name(self.project, self.name)

    @property
    def egress_rules(self) -> dict:
        """The bottle's rules in the format of daemons/proxy/rules.py: the manifest's hosts, its
        skills' and Claude Code's, each entry once; its git repositories gated, so that the gate is
        the only way to them."""
        entries = dict.fromkeys(self.hosts + self.skill_hosts + self.claude_code_hosts)
        rules = {'hosts': [entry.rule() for entry in entries], 'allow_private': list(self.allow_private)}
        if self.addresses:
            rules['addresses'] = dict(sorted(self.addresses.items()))
        if self.git:
            rules['gated'] = [{'host': repo.parts['host'].lower(), 'path': f'/{repo.path}'} for repo in self.git]
        if self.secrets:
            rules['secrets'] = [secret.binding() for secret in self.secrets]     # tasks/secrets.py adds placeholders
        return rules

    def skill_dir(self, skill: str) -> Path:
        return self.skills_dir / skill
