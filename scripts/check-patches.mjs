#!/usr/bin/env node
// Checks that every patch series in patches/<package>-<version>/ applies cleanly, in order, to that
// package's source release as published on PyPI. The sdist is found and fetched through pip's own
// index machinery (so pip's configured index and certificates apply), its sha256 is checked
// against the index, and it is cached in ~/.cache/mosaickv/sdist. Exit 0 only if every patch applies.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cache = join(homedir(), '.cache', 'mosaickv', 'sdist');
const python = [
  process.env.MOSAICKV_VLLM_VENV && join(process.env.MOSAICKV_VLLM_VENV, 'bin', 'python'),
  join(homedir(), '.cache', 'mosaickv', 'venv-vllm-0.33.0', 'bin', 'python'),
  join(root, '.venv', 'bin', 'python'),
].find((p) => p && existsSync(p)) ?? 'python3';

// pip has no "download this sdist without building it" command (pip download --no-binary builds
// metadata, which for vLLM installs gigabytes of build dependencies), so this asks pip's finder
// for the link and downloads it with pip's session. Prints the cached file's path.
const FETCH = `
import hashlib, os, sys
from pip._internal.commands import create_command
name, version, dest = sys.argv[1:4]
cmd = create_command("download")
options, _ = cmd.parse_args(["--no-deps", "--no-binary", ":all:", f"{name}=={version}"])
with cmd.main_context():
    session = cmd.get_default_session(options)
    finder = cmd._build_package_finder(options=options, session=session, ignore_requires_python=True)
    links = [c.link for c in finder.find_all_candidates(name)
             if str(c.version) == version and not c.link.is_wheel and c.link.filename.endswith(".tar.gz")]
    if not links:
        sys.exit(f"no source release {name}=={version} (.tar.gz) on the configured index")
    link = links[0]
    path = os.path.join(dest, link.filename)
    def digest(p):
        return hashlib.new(link.hash_name or "sha256", open(p, "rb").read()).hexdigest()
    if not (os.path.exists(path) and link.hash and digest(path) == link.hash):
        r = session.get(link.url)
        r.raise_for_status()
        open(path, "wb").write(r.content)
        if link.hash and digest(path) != link.hash:
            sys.exit(f"{link.filename}: {link.hash_name} mismatch with the index")
    print(path)
`;

function run(cmd, args, opts = {}) {
  return spawnSync(cmd, args, { encoding: 'utf8', ...opts });
}

const seriesDirs = readdirSync(join(root, 'patches'), { withFileTypes: true })
  .filter((d) => d.isDirectory() && /^[a-z0-9_.-]+-\d[\w.]*$/i.test(d.name))
  .map((d) => d.name)
  .sort();
if (seriesDirs.length === 0) {
  console.error('[check-patches] no patches/<package>-<version>/ directory found');
  process.exit(1);
}
mkdirSync(cache, { recursive: true });
let applied = 0;
let failed = 0;
for (const dir of seriesDirs) {
  const cut = dir.lastIndexOf('-');
  const [name, version] = [dir.slice(0, cut), dir.slice(cut + 1)];
  const patches = readdirSync(join(root, 'patches', dir)).filter((f) => f.endsWith('.patch')).sort();
  const fetched = run(python, ['-c', FETCH, name, version, cache]);
  if (fetched.status !== 0) {
    console.error(`[check-patches] could not fetch ${name}==${version} from PyPI:\n${fetched.stderr}`);
    process.exit(1);
  }
  const sdist = fetched.stdout.trim().split('\n').pop();
  const work = mkdtempSync(join(tmpdir(), `check-patches-${dir}-`));
  try {
    const untar = run('tar', ['xzf', sdist, '-C', work]);
    if (untar.status !== 0) throw new Error(`tar failed on ${sdist}: ${untar.stderr}`);
    const src = join(work, readdirSync(work)[0]);
    for (const patch of patches) {
      const file = join(root, 'patches', dir, patch);
      // Applied, not only checked: a later patch of the series may build on an earlier one.
      const r = run('git', ['apply', '--verbose', file], { cwd: src });
      if (r.status === 0) {
        applied += 1;
        console.log(`[check-patches] ok    ${dir}/${patch}`);
      } else {
        failed += 1;
        console.error(`[check-patches] FAIL  ${dir}/${patch} does not apply to ${name} ${version}:\n${r.stderr}`);
      }
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
console.log(`${applied} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
