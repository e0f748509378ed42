// The deploy READMEs against the repository: every file and directory they name exists, every
// `kubectl apply -k` target is a kustomization, and the names in the walkthrough commands (images,
// Secrets, Jobs, labels, ports, paths inside the pod) are the ones the manifests use.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DEPLOY, find, parseYaml, readYaml, render, ROOT, standaloneManifests, type K8sObject } from './render.js';

const READMES = [join(DEPLOY, 'README.md'), join(DEPLOY, 'gateway', 'README.md')];
const text = (f: string) => readFileSync(f, 'utf8');
const walkthrough = text(READMES[0]);

/** Code (fenced blocks and inline spans) of a Markdown text. */
function code(md: string): string {
  return [...md.matchAll(/```[a-z]*\n([\s\S]*?)```/g), ...md.matchAll(/`([^`\n]+)`/g)].map((m) => m[1]).join('\n');
}

/** Shell commands of the fenced blocks, continuation lines joined. */
function commands(md: string): string[] {
  return [...md.matchAll(/```(?:sh|bash)\n([\s\S]*?)```/g)]
    .flatMap((m) => m[1].replace(/\\\n\s*/g, ' ').split('\n'))
    .map((l) => l.replace(/(^|\s)#.*$/, '').replace(/\s+/g, ' ').trim())
    .filter(Boolean);
}

/** Where a path named in a README may live: the repository root, the README's folder, deploy/k8s. */
function resolves(path: string, readme: string): boolean {
  const clean = path.replace(/\/$/, '');
  return [ROOT, dirname(readme), join(DEPLOY, 'k8s')].some((base) => existsSync(join(base, clean)));
}

const overlayObjs = (o: string) => render(join(DEPLOY, 'k8s', 'overlays', o));
const podLabels = (objs: K8sObject[]) =>
  (find(objs, 'Deployment', 'loraplex') as K8sObject & { spec: { template: { metadata: { labels: Record<string, string> } } } }).spec.template.metadata.labels;

describe('deploy READMEs name only what exists', () => {
  for (const readme of READMES) {
    const rel = relative(ROOT, readme);
    const md = text(readme);

    it(`${rel}: relative links resolve`, () => {
      const links = [...md.matchAll(/\]\(([^)#\s]+)(#[^)]*)?\)/g)].map((m) => m[1]).filter((l) => !/^[a-z]+:/.test(l));
      expect(links.length).toBeGreaterThan(0);
      for (const l of links) expect(existsSync(join(dirname(readme), l)), `${rel} links ${l}`).toBe(true);
    });

    it(`${rel}: every file and directory named in its code exists`, () => {
      const named = new Set(
        [...code(md).matchAll(/(?<![\w$/.:-])((?:\.{1,2}\/)?(?:[\w.-]+\/)*[\w.-]+\.(?:ya?ml|env|md|ts|json)|(?:[\w.-]+\/)+)(?![\w/=-])/g)]
          .map((m) => m[1])
          .filter((p) => !/^(https?|[a-z]+\.[a-z]+\/)/.test(p) && !p.startsWith('/')) // URLs, in-container paths
          .filter((p) => !/^(\.\/)?(pirate|adapters)\/?/.test(p)), // files the walkthrough itself creates
      );
      // Inline spans that are a bare relative path, like `components/redis`.
      for (const m of md.matchAll(/`([a-z][\w-]*(?:\/[\w.-]+)+\/?)`/g)) named.add(m[1]);
      expect(named.size).toBeGreaterThan(3);
      for (const p of named) expect(resolves(p, readme), `${rel} names ${p}`).toBe(true);
    });

    it(`${rel}: kubectl and helm commands use kustomizations and files that exist`, () => {
      for (const cmd of commands(md)) {
        for (const m of cmd.matchAll(/(?:kubectl(?: -n \S+)? (?:apply|kustomize|delete)(?: -k)?|-k) (deploy\/\S+)/g))
          expect(existsSync(join(ROOT, m[1], 'kustomization.yaml')), `${cmd}: ${m[1]} is a kustomization`).toBe(true);
        for (const m of cmd.matchAll(/ -f (\S+)/g)) {
          if (/^(https?:|-$)/.test(m[1])) continue;
          expect(existsSync(join(ROOT, m[1])), `${cmd}: ${m[1]}`).toBe(true);
        }
        for (const m of cmd.matchAll(/(?:^|\s)(deploy\/(?:k8s|gateway)\S*)/g)) expect(existsSync(join(ROOT, m[1].replace(/[;&|)]+$/, ''))), `${cmd}: ${m[1]}`).toBe(true);
      }
    });
  }
});

describe('the walkthrough commands match the manifests', () => {
  const cmds = commands(walkthrough);

  it('applies both overlays and uploads an adapter before asking for a completion with it', () => {
    expect(cmds).toContain('kubectl apply -k deploy/k8s/overlays/cpu');
    expect(cmds.some((c) => c.startsWith('kubectl kustomize deploy/k8s/overlays/gpu'))).toBe(true);
    const upload = cmds.findIndex((c) => /curl .*\/v1\/adapters .* -F id=(\S+)/.test(c));
    expect(upload).toBeGreaterThan(0);
    const id = /-F id=(\S+)/.exec(cmds[upload])![1];
    for (const f of ['adapter_config.json', 'adapter_model.safetensors']) expect(cmds[upload]).toContain(`-F ${f}=@`);
    const completion = cmds.findIndex((c, i) => i > upload && c.includes('/v1/completions') && c.includes(`"model": "${id}"`));
    expect(completion, 'a completion with the uploaded adapter').toBeGreaterThan(upload);
  });

  it('builds the images the overlays and the demo Job use', () => {
    const tags = cmds.flatMap((c) => [...c.matchAll(/docker build (?:--target (\S+) )?-t "?(?:\$REGISTRY\/)?(loraplex:[\w.-]+)"? \./g)]).map((m) => ({ target: m[1] ?? null, tag: m[2] }));
    const images = new Set([server('cpu').image, server('gpu').image, ...standaloneImages()]);
    for (const image of images) expect(tags.map((t) => t.tag), image).toContain(image);
    expect(tags.find((t) => t.tag === server('gpu').image)?.target).toBe('cuda');
    expect(tags.find((t) => t.tag === server('cpu').image)?.target).toBeNull();
  });

  it('creates every Secret the manifests read', () => {
    const secrets = new Set<string>();
    const collect = (o: unknown): void => {
      if (Array.isArray(o)) o.forEach(collect);
      else if (o && typeof o === 'object') {
        const ref = (o as { secretKeyRef?: { name: string } }).secretKeyRef;
        if (ref) secrets.add(ref.name);
        Object.values(o).forEach(collect);
      }
    };
    collect([...overlayObjs('cpu'), ...overlayObjs('gpu'), ...standaloneManifests().flatMap((f) => readYaml(f))]);
    const ext = readYaml(join(DEPLOY, 'k8s', 'components', 'external-redis', 'kustomization.yaml'))[0] as { patches: Array<{ patch: string }> };
    for (const p of ext.patches) collect(parseYaml(p.patch, 'external-redis patch'));
    expect(secrets).toEqual(new Set(['loraplex-api-key', 'hf-token', 'loraplex-redis']));
    const docs = walkthrough + text(join(DEPLOY, 'k8s', 'components', 'external-redis', 'kustomization.yaml'));
    for (const s of secrets) expect(docs, `a "create secret generic ${s}" command`).toMatch(new RegExp(`create secret generic ${s} --from-literal=`));
  });

  it('names the Jobs, Deployment, Service, pod labels and paths the manifests define', () => {
    const objs = overlayObjs('cpu');
    for (const m of walkthrough.matchAll(/job\/([\w-]+)/g)) {
      expect(standaloneManifests().some((f) => readYaml(f).some((o) => (o as K8sObject).metadata.name === m[1])), `job/${m[1]}`).toBe(true);
    }
    for (const m of walkthrough.matchAll(/\b(?:deployment|deploy)\/([\w-]+)/g)) if (!existsSync(join(DEPLOY, m[1]))) find(objs, 'Deployment', m[1]);
    for (const m of walkthrough.matchAll(/port-forward svc\/([\w-]+) (\d+):(\d+)/g)) {
      const svc = find(objs, 'Service', m[1]) as K8sObject & { spec: { ports: Array<{ port: number }> } };
      expect(svc.spec.ports.map((p) => p.port)).toContain(Number(m[3]));
    }
    for (const m of walkthrough.matchAll(/get pod -l (\S+)/g)) {
      const selector = Object.fromEntries(m[1].split(',').map((kv) => kv.split('=')));
      for (const [k, v] of Object.entries(selector)) expect(podLabels(objs)[k], k).toBe(v);
    }
    // The adapter copied out of a pod lives under the demo model the Deployment serves.
    const model = cmModel(objs);
    for (const m of walkthrough.matchAll(/cp "\$POD:(\/\S+)"/g)) expect(m[1].startsWith(`${model}/adapters/`), m[1]).toBe(true);
  });
});

describe('the Helm values agree with the helm commands of the walkthrough', () => {
  it('prometheus-adapter queries the Prometheus that kube-prometheus-stack installs, which selects every ServiceMonitor', () => {
    const cmds = commands(walkthrough);
    const stack = cmds.map((c) => /helm install (\S+) prometheus-community\/kube-prometheus-stack --namespace (\S+) .*-f (\S+)/.exec(c)).find(Boolean)!;
    const adapter = cmds.map((c) => /helm install \S+ prometheus-community\/prometheus-adapter --namespace \S+ -f (\S+)/.exec(c)).find(Boolean)!;
    expect(stack && adapter, 'helm install commands for both charts').toBeTruthy();
    const stackValues = readYaml(join(ROOT, stack[3]))[0] as { prometheus: { prometheusSpec: Record<string, unknown> } };
    expect(stackValues.prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues).toBe(false);
    const adapterValues = readYaml(join(ROOT, adapter[1]))[0] as { prometheus: { url: string; port: number } };
    // The operator names the Prometheus Service <release>-prometheus, port 9090.
    expect(adapterValues.prometheus.url).toBe(`http://${stack[1]}-prometheus.${stack[2]}.svc`);
    expect(adapterValues.prometheus.port).toBe(9090);
  });
});

function server(overlay: string): { image: string } {
  const d = find(overlayObjs(overlay), 'Deployment', 'loraplex') as K8sObject & { spec: { template: { spec: { containers: Array<{ name: string; image: string }> } } } };
  return d.spec.template.spec.containers.find((c) => c.name === 'loraplex')!;
}

function standaloneImages(): string[] {
  return standaloneManifests()
    .flatMap((f) => readYaml(f) as Array<{ spec: { template: { spec: { containers: Array<{ image: string }> } } } }>)
    .flatMap((j) => j.spec.template.spec.containers.map((c) => c.image))
    .filter((i) => i.startsWith('loraplex:'));
}

function cmModel(objs: K8sObject[]): string {
  const cm = objs.find((o) => o.kind === 'ConfigMap' && o.metadata.name.startsWith('loraplex-config')) as K8sObject & { data: Record<string, string> };
  return cm.data.LORAPLEX_MODEL;
}
