"""Provisioning: what goes into a running machine, one task per artifact.

provision_ca:<agent>            the egress CA's certificate in the guest's trust store, and the proxy
                                in the clients' system-wide files (templates/egress-trust.sh.j2)
provision_git:<agent>           the guest's git sends the repositories of the manifest's `git:` list to the
                                project's git gate (templates/git-gate.gitconfig.j2), and commits as the agent
provision_supervise:<agent>     the project's supervisor registered in the agent's Claude Code (user scope, no
                                secret: the proxy adds its key), or no registration when `supervise: false`
provision_prompt:<agent>        the rendered prompt, copied to the guest (0600, agent-owned)
provision_skill:<agent>:<skill> one skill directory, moved as one tar stream in one exec
provision_skills:<agent>        skills dropped from the manifest, removed from the guest
provision:<agent>               all of the above for one agent

The work in the agent's own directories is done as the agent user (see GUARDS below).

Each step records the identity of the machine it provisioned (`machine_id`), so an
unchanged prompt or skill is never copied twice, while a machine recreated by doit
or behind its back gets everything again. An agent's steps run one after another
(parallelism is across agents), since they all talk to the same machine.
"""
from __future__ import annotations

from pathlib import Path

from doit.tools import config_changed

from tasks import egress, gate, guest
from tasks.backends.pick import backend
from tasks.checks import SameMachine
from tasks.errors import BottleError
from tasks.manifest import Agent
from tasks.project import Project, action
from tasks.prompt import prompt_file

FAMILIES = {
    'provision_ca': 'Make each agent\'s machine trust the egress CA and know its door.',
    'provision_git': 'Point the git of each agent\'s machine at the git gate.',
    'provision_supervise': 'Register the project\'s supervisor in the Claude Code of each agent\'s machine.',
    'provision_prompt': 'Copy each agent\'s rendered prompt into its machine.',
    'provision_skill': 'Copy one skill directory into an agent\'s machine.',
    'provision_skills': 'Remove the skills a manifest dropped from its machine.',
}

TRUST_TEMPLATE = 'egress-trust.sh.j2'
GITCONFIG_TEMPLATE = 'git-gate.gitconfig.j2'
# curl has no system-wide file: the agent's own, for a scrubbed environment.
CURLRC = f'# claude-bottle\'s egress door\nproxy = "{guest.PROXY_URL}"\nnoproxy = "{guest.NO_PROXY}"\n'

# Every guest script below but PREPARE_SKILLS_DIR runs as the agent user, inside the agent's own
# tree, so a path the agent planted can lead it nowhere the agent could not write anyway. Even
# so, a script follows no symbolic link it did not make: a link (or the wrong kind of file) at a
# name the script owns is removed, and a link in a directory above those names is refused.
# fail() reads its stdin to the end first: podman drops the output of a command that ends
# before it has read its stdin (podman 4.3: the message was lost 8 times in 30).
GUARDS = r'''fail() { cat > /dev/null; echo "claude-bottle: $*" >&2; exit 1; }
no_links_above() {
  at=$(dirname "$1")
  while [ "$at" != / ]; do
    [ ! -L "$at" ] || fail "$at is a symbolic link, which provisioning does not follow; \
remove it in the bottle and run doit again"
    at=$(dirname "$at")
  done
}
clear_unless() {  # clear_unless -d|-f NAME: whatever is at NAME and is not a real dir|file goes
  if [ -L "$2" ] || { [ -e "$2" ] && [ ! "$1" "$2" ]; }; then rm -rf "$2"; fi
}
own_dir() {
  no_links_above "$1"
  clear_unless -d "$1"
  mkdir -p "$1" 2>/dev/null && [ -w "$1" ] ||
    fail "$1 cannot be made or written by $(id -un); it must be a directory the agent user owns"
}
'''

# One skill transfer: unpack next to the old copy, then swap with two renames, so a reader sees
# the old copy or the new one, never a mix (for the instant between the renames, neither).
# Arguments: skills dir, skill name, name of the list of managed skills.
RECEIVE_SKILL = GUARDS + r'''set -eu
dir=$1 name=$2 list="$1/$3"
own_dir "$dir"
incoming="$dir/.$name.incoming" old="$dir/.$name.old"
rm -rf "$incoming" "$old"
mkdir "$incoming"
tar -x -f - -C "$incoming" --no-same-owner
if [ -e "$dir/$name" ] || [ -L "$dir/$name" ]; then mv -T "$dir/$name" "$old"; fi
mv -T "$incoming" "$dir/$name"
rm -rf "$old"
clear_unless -f "$list"
if ! grep -qxF "$name" "$list" 2>/dev/null; then
  rm -rf "$list.new"
  { cat "$list" 2>/dev/null || :; echo "$name"; } > "$list.new"
  mv -fT "$list.new" "$list"
fi
'''

# Remove managed skills not in the keep list. The list is the agent's to write, so every
# name read from it is checked before anything is removed. Arguments: skills dir, name of the
# list, the skills to keep.
PRUNE_SKILLS = GUARDS + r'''set -eu
dir=$1 list="$1/$2"; shift 2
no_links_above "$dir"
clear_unless -d "$dir"
[ -d "$dir" ] || exit 0
clear_unless -f "$list"
[ -f "$list" ] || exit 0
keep=" $* "
rm -rf "$list.new"
: > "$list.new"
while IFS= read -r name; do
  case "$name" in ''|*/*|.*) continue ;; esac
  case "$keep" in
    *" $name "*) echo "$name" >> "$list.new" ;;
    *) rm -rf "${dir:?}/$name" ;;
  esac
done < "$list"
mv -fT "$list.new" "$list"
'''

# A file of the agent's from stdin (the prompt, its curlrc), written to a temporary name and
# renamed. Arguments: path, octal mode.
RECEIVE_AGENT_FILE = GUARDS + r'''set -eu
dest=$1 mode=$2
umask 077
own_dir "$(dirname "$dest")"
tmp="$dest.incoming"
rm -rf "$tmp"
cat > "$tmp"
chmod "$mode" "$tmp"
clear_unless -f "$dest"
mv -fT "$tmp" "$dest"
'''

# As root: the gate's gitconfig from stdin, included from the system gitconfig once. Argument: path.
RECEIVE_GITCONFIG = r'''set -eu
dest=$1
mkdir -p "$(dirname "$dest")"
cat > "$dest.incoming"
chmod 644 "$dest.incoming"
mv -f "$dest.incoming" "$dest"
git config --system --get-all include.path | grep -qxF "$dest" || git config --system --add include.path "$dest"
'''

# As the agent: Claude Code's user-scope registration of an MCP server replaced (`add-json` refuses a
# name that exists), or removed when the configuration is empty. Arguments: home, name, JSON or "".
REGISTER_MCP = r'''set -eu
export HOME="$1" CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1    # no telemetry for the proxy to refuse
claude mcp remove -s user "$2" > /dev/null 2>&1 || :
[ -z "$3" ] || claude mcp add-json -s user "$2" "$3" > /dev/null
'''

# No prompt: none may stay behind. Argument: path.
REMOVE_PROMPT = GUARDS + r'''set -eu
dest=$1
no_links_above "$(dirname "$dest")"
clear_unless -d "$(dirname "$dest")"
rm -rf "$dest"
'''

# As root, for a skills dir outside the agent's home: make it where only root may change the
# path (below directories root owns and alone may write) and give it to the agent. Anywhere
# else root does nothing and the agent makes it. Arguments: skills dir, owner uid:gid.
PREPARE_SKILLS_DIR = r'''set -eu
dir=$1 owner=$2
[ ! -e "$dir" ] && [ ! -L "$dir" ] || exit 0
at=$(dirname "$dir")
while :; do
  if [ -e "$at" ] || [ -L "$at" ]; then
    [ ! -L "$at" ] && [ -O "$at" ] && [ -z "$(find "$at" -maxdepth 0 -perm /022)" ] || exit 0
  fi
  [ "$at" != / ] || break
  at=$(dirname "$at")
done
mkdir -p "$(dirname "$dir")"
mkdir "$dir"
chown "$owner" "$dir"
'''


def tasks(project: Project):
    for family, doc in FAMILIES.items():
        yield {'basename': family, 'name': None, 'doc': doc}
    for agent in project.agents.values():
        steps = [_ca_step(project, agent), _git_step(project, agent), _supervise_step(agent),
                 _prompt_step(project, agent)]
        steps += [_skill_step(agent, skill) for skill in agent.skills]
        steps.append(_prune_step(agent))
        names = [f'{step["basename"]}:{step["name"]}' for step in steps]
        for step, previous in zip(steps, [f'start:{agent.name}'] + names):
            yield {**step, 'task_dep': [previous] + step.get('task_dep', [])}
        yield {
            'name': agent.name,
            'doc': f'provision {agent.machine}: egress CA, git, supervisor, prompt and {len(agent.skills)} skill(s)',
            'actions': None,
            'task_dep': names,
        }


def _owner(agent: Agent) -> dict:
    return {'uid': agent.user.uid, 'gid': agent.user.uid}


def _ca_step(project: Project, agent: Agent) -> dict:
    cert = egress.proxy(project).ca_cert
    script = project.rendered(TRUST_TEMPLATE, ca_cert=guest.CA_CERT, ca_bundle=guest.CA_BUNDLE, proxy=guest.PROXY_URL,
                              no_proxy=guest.NO_PROXY, env=guest.EGRESS_ENV)
    return {
        'basename': 'provision_ca', 'name': agent.name,
        'doc': f'make {agent.machine} trust the egress CA ({guest.CA_CERT}) and know its door',
        'actions': [(trust_ca, [agent, cert, script])],
        'file_dep': [cert, project.template_file(TRUST_TEMPLATE)],
        'uptodate': [config_changed({'script': script, **_owner(agent)}), SameMachine(agent)],
    }


def _git_step(project: Project, agent: Agent) -> dict:
    gitconfig = project.rendered(GITCONFIG_TEMPLATE, agent=agent.name, project=agent.project, repos=agent.git,
                                 gate=guest.GATE_URL)
    return {
        'basename': 'provision_git', 'name': agent.name,
        'doc': f'point git in {agent.machine} at the git gate for {len(agent.git)} repositories',
        'actions': [(configure_git, [project, agent, gitconfig])],
        'task_dep': ['gate'],       # the gate serves the repositories (or stops when none is listed)
        'file_dep': [project.template_file(GITCONFIG_TEMPLATE)],
        'uptodate': [config_changed({'gitconfig': gitconfig}), SameMachine(agent)],
    }


def _supervise_step(agent: Agent) -> dict:
    registration = guest.supervise_registration(agent)
    return {
        'basename': 'provision_supervise', 'name': agent.name,
        'doc': f'{"register" if registration else "unregister"} the project\'s supervisor in the Claude Code '
               f'of {agent.machine}',
        'actions': [(register_supervisor, [agent, registration])],
        'task_dep': ['supervisor'],     # it serves the agent (or stops when no agent is supervised)
        'uptodate': [config_changed({'registration': registration, 'home': agent.user.home}), SameMachine(agent)],
    }


def _prompt_step(project: Project, agent: Agent) -> dict:
    source = prompt_file(project, agent.name)
    return {
        'basename': 'provision_prompt', 'name': agent.name,
        'doc': f'copy the prompt of {agent.name} to {guest.prompt_path(agent)}',
        'actions': [(copy_prompt, [agent, source])],
        'file_dep': [source],
        'uptodate': [config_changed({'to': guest.prompt_path(agent), **_owner(agent)}), SameMachine(agent)],
    }


def _skill_step(agent: Agent, skill: str) -> dict:
    source = agent.skill_dir(skill)
    files = sorted(p for p in source.rglob('*') if p.is_file())
    return {
        'basename': 'provision_skill', 'name': f'{agent.name}:{skill}',
        'doc': f'copy skill {skill} to {guest.skills_dir(agent)}/{skill} in {agent.machine}',
        'actions': [(copy_skill, [agent, skill])],
        'file_dep': files,
        'uptodate': [config_changed({'to': guest.skills_dir(agent), **_owner(agent)}), SameMachine(agent)],
    }


def _prune_step(agent: Agent) -> dict:
    return {
        'basename': 'provision_skills', 'name': agent.name,
        'doc': f'remove skills of {agent.name} that its manifest no longer lists',
        'actions': [(prune_skills, [agent])],
        'uptodate': [config_changed({'keep': sorted(agent.skills), 'in': guest.skills_dir(agent)}),
                     SameMachine(agent)],
    }


def _current_identity(agent: Agent) -> str:
    machine = backend(agent.backend, agent.engine).machine(agent.machine)
    if machine is None or not machine.running:
        raise BottleError(f'machine {agent.machine} is not running; run `doit launch:{agent.name}`')
    return machine.identity


@action
def trust_ca(agent: Agent, cert: Path, script: str):
    identity = _current_identity(agent)
    runtime = backend(agent.backend, agent.engine)
    runtime.exec(agent.machine, ['sh', '-c', script], stdin=cert.read_bytes())
    runtime.exec(agent.machine, ['sh', '-c', RECEIVE_AGENT_FILE, 'sh', f'{agent.user.home}/.curlrc', '644'],
                 stdin=CURLRC.encode(), user=agent.user.name)
    return {'machine_id': identity}


@action
def configure_git(project: Project, agent: Agent, gitconfig: str):
    identity = _current_identity(agent)
    if agent.git:
        gate.sync(project, agent.name)      # its mirrors, made with the host's credentials: a wrong URL fails here
    backend(agent.backend, agent.engine).exec(agent.machine, ['sh', '-c', RECEIVE_GITCONFIG, 'sh', guest.GATE_GITCONFIG],
                                stdin=gitconfig.encode())
    return {'machine_id': identity}


@action
def register_supervisor(agent: Agent, registration: str):
    identity = _current_identity(agent)
    backend(agent.backend, agent.engine).exec(agent.machine, ['sh', '-c', REGISTER_MCP, 'sh', agent.user.home, guest.SUPERVISE_MCP,
                                                registration], user=agent.user.name)
    return {'machine_id': identity}


@action
def copy_prompt(agent: Agent, source: Path):
    identity = _current_identity(agent)
    runtime = backend(agent.backend, agent.engine)
    if source.stat().st_size:
        runtime.exec(agent.machine, ['sh', '-c', RECEIVE_AGENT_FILE, 'sh', guest.prompt_path(agent), '600'],
                     stdin=source.read_bytes(), user=agent.user.name)
    else:   # no prompt: Claude starts without the flag, and no stale prompt stays behind
        runtime.exec(agent.machine, ['sh', '-c', REMOVE_PROMPT, 'sh', guest.prompt_path(agent)],
                     user=agent.user.name)
    return {'machine_id': identity}


@action
def copy_skill(agent: Agent, skill: str):
    import io
    import tarfile  # here: a run with nothing to copy does not import it
    identity = _current_identity(agent)
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode='w') as tar:
        for path in sorted(agent.skill_dir(skill).rglob('*')):
            tar.add(path, arcname=str(path.relative_to(agent.skill_dir(skill))), recursive=False)
    runtime = backend(agent.backend, agent.engine)
    skills_dir = guest.skills_dir(agent)
    if not _in_home(agent, skills_dir):     # the agent may not be allowed to make it there
        runtime.exec(agent.machine, ['sh', '-c', PREPARE_SKILLS_DIR, 'sh', skills_dir,
                                     f'{agent.user.uid}:{agent.user.uid}'])
    runtime.exec(agent.machine, ['sh', '-c', RECEIVE_SKILL, 'sh', skills_dir, skill, guest.MANAGED_SKILLS],
                 stdin=stream.getvalue(), user=agent.user.name)
    return {'machine_id': identity}


@action
def prune_skills(agent: Agent):
    identity = _current_identity(agent)
    backend(agent.backend, agent.engine).exec(agent.machine, ['sh', '-c', PRUNE_SKILLS, 'sh', guest.skills_dir(agent),
                                                guest.MANAGED_SKILLS, *agent.skills], user=agent.user.name)
    return {'machine_id': identity}


def _in_home(agent: Agent, path: str) -> bool:
    return path.startswith(agent.user.home.rstrip('/') + '/')
