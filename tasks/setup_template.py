"""The image setup's template contract: the variables a setup template may use and their values for a
recipe, and the check that a recipe's template keeps to them (run on every manifest before anything else).
"""
from __future__ import annotations

from tasks.manifest import Recipe

GUEST_CLAUDE_ARCHIVE = '/tmp/claude-code.tgz'      # where the build machine finds the Claude Code package
# The variables a setup template may use: the keys of values() (manifests are checked against them).
VARIABLES = frozenset({'user', 'uid', 'home', 'claude_code', 'claude_code_archive', 'packages', 'run',
                       'recipe_key'})


def values(recipe: Recipe, key: str) -> dict:
    return {'user': recipe.user.name, 'uid': recipe.user.uid, 'home': recipe.user.home,
            'claude_code': recipe.claude_code, 'claude_code_archive': GUEST_CLAUDE_ARCHIVE,
            'packages': recipe.packages, 'run': recipe.run, 'recipe_key': key}


def problem(templates, recipe: Recipe) -> str | None:
    """Why the recipe's setup template cannot be rendered with `templates` (a jinja2 Environment), or None: it
    is missing, does not parse, uses a variable the setup does not provide (in any branch, or in a template
    it includes), or fails to render with this recipe's values."""
    import jinja2  # only when a check is not remembered (tasks.project)
    import jinja2.meta
    known = VARIABLES | set(templates.globals)
    pending, seen = [recipe.setup], set()
    while pending:
        name = pending.pop()
        seen.add(name)
        try:
            source, filename, _ = templates.loader.get_source(templates, name)
            tree = templates.parse(source, name, filename)
        except jinja2.TemplateNotFound:
            return (f'template {name!r} not found in templates/; add it there, or leave the key out for '
                    'the built-in image-setup.sh.j2')
        except jinja2.TemplateSyntaxError as err:
            return f'template {name!r} line {err.lineno}: {err.message}; fix the template'
        except (OSError, UnicodeDecodeError) as err:
            return f'template {name!r} cannot be read: {err}'
        unknown = jinja2.meta.find_undeclared_variables(tree) - known
        if unknown:
            line = min(n.lineno for n in tree.find_all(jinja2.nodes.Name) if n.name in unknown)
            return (f'template {name!r} line {line} uses {", ".join(sorted(unknown))}, which the setup does '
                    f'not provide; it provides {", ".join(sorted(VARIABLES))}')
        pending += [t for t in jinja2.meta.find_referenced_templates(tree) if t and t not in seen]
    try:
        templates.get_template(recipe.setup).render(**values(recipe, key=''))
    except Exception as err:     # the template is the project's own code: anything can go wrong in it
        return f'template {recipe.setup!r} fails to render with this recipe: {type(err).__name__}: {err}'
    return None
