// The manifests against the server they deploy: probes, the ServiceMonitor and the endpoint
// picker point at routes and metrics a running server has; every LORAPLEX_* variable they set is
// one the server reads, with a value it accepts; and the objects agree with each other (ports,
// selectors, names, grace periods, the autoscaler's metric, the GPU overlay's scheduling).
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serveConfig, type ServeConfig } from '../../server/config.js';
import { ensureDemoModel } from '../../server/demo/demo-model.js';
import { startTestServer, type TestServer } from '../helpers/server.js';
import { unknownEnv } from './env-names.js';
import { DEPLOY, find, parseYaml, readYaml, render, type K8sObject } from './render.js';

// --- the few shapes these checks read ------------------------------------------------------------
interface Probe { httpGet?: { path: string; port: string | number }; grpc?: { port: number }; periodSeconds?: number; failureThreshold?: number }
interface EnvVar { name: string; value?: string; valueFrom?: { secretKeyRef?: { name: string; key: string }; resourceFieldRef?: { resource: string }; configMapKeyRef?: unknown; fieldRef?: unknown } }
interface Container {
  name: string; image: string; args?: string[]; command?: string[];
  ports?: Array<{ name?: string; containerPort: number }>;
  env?: EnvVar[]; envFrom?: Array<{ configMapRef?: { name: string }; secretRef?: { name: string } }>;
  startupProbe?: Probe; livenessProbe?: Probe; readinessProbe?: Probe;
  lifecycle?: { preStop?: { exec?: { command: string[] }; sleep?: { seconds: number } } };
  resources?: { requests?: Record<string, string | number>; limits?: Record<string, string | number> };
  volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
}
interface PodSpec {
  containers: Container[]; terminationGracePeriodSeconds?: number; nodeSelector?: Record<string, string>;
  tolerations?: Array<{ key?: string; operator?: string; effect?: string }>;
  volumes?: Array<{ name: string; persistentVolumeClaim?: { claimName: string }; configMap?: { name: string }; emptyDir?: unknown }>;
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number };
}
type Workload = K8sObject & { spec: { selector: { matchLabels: Record<string, string> }; template: { metadata: { labels: Record<string, string> }; spec: PodSpec } } };
type Svc = K8sObject & { spec: { selector: Record<string, string>; ports: Array<{ name?: string; port: number; targetPort?: string | number }> } };
type CM = K8sObject & { data: Record<string, string> };

const overlays = ['cpu', 'gpu'] as const;
const k8s = (p: string) => join(DEPLOY, 'k8s', p);
const objs = (overlay: string) => render(k8s(`overlays/${overlay}`));
const gateway = () => render(join(DEPLOY, 'gateway'));
const deployment = (o: K8sObject[]) => find(o, 'Deployment', 'loraplex') as Workload;
const server = (o: K8sObject[]) => deployment(o).spec.template.spec.containers.find((c) => c.name === 'loraplex')!;
const matches = (selector: Record<string, string>, labels: Record<string, string>) =>
  Object.keys(selector).length > 0 && Object.entries(selector).every(([k, v]) => labels[k] === v);

/** The server container's environment as the pod would see it (Secret and resource values stand in). */
function podEnv(o: K8sObject[]): Record<string, string> {
  const c = server(o);
  const env: Record<string, string> = {};
  for (const from of c.envFrom ?? []) {
    expect(from.configMapRef, 'envFrom only from ConfigMaps').toBeDefined();
    Object.assign(env, (find(o, 'ConfigMap', from.configMapRef!.name) as CM).data);
  }
  for (const e of c.env ?? []) {
    if (e.value !== undefined) env[e.name] = e.value;
    else if (e.valueFrom?.secretKeyRef) env[e.name] = 'secret-from-' + e.valueFrom.secretKeyRef.name;
    else if (e.valueFrom?.resourceFieldRef) env[e.name] = '2';
    else throw new Error(`${e.name}: unexpected valueFrom ${JSON.stringify(e.valueFrom)}`);
  }
  return env;
}
const config = (o: K8sObject[]): ServeConfig => serveConfig([], podEnv(o));

function portNumber(c: Container, port: string | number): number {
  if (typeof port === 'number') return port;
  const p = c.ports?.find((x) => x.name === port);
  if (!p) throw new Error(`container ${c.name} has no port named ${port}`);
  return p.containerPort;
}

function preStopSeconds(c: Container): number {
  const p = c.lifecycle?.preStop;
  if (p?.sleep) return p.sleep.seconds;
  const cmd = p?.exec?.command ?? [];
  if (cmd[0] === 'sleep' && /^\d+$/.test(cmd[1])) return Number(cmd[1]);
  throw new Error(`no preStop sleep: ${JSON.stringify(p)}`);
}

// --- a real server, configured like the manifests, for routes and metric names ---------------------
let srv: TestServer;
let metricsText = '';
const adapterDir = mkdtempSync(join(tmpdir(), 'loraplex-deploy-adapters-'));

beforeAll(async () => {
  const cfg = config(objs('cpu'));
  const demo = await ensureDemoModel();
  srv = await startTestServer({ model: demo.modelDir, maxLoras: cfg.maxLoras, adapterDir }, ['--api-key', 'deploy-test-key']);
  metricsText = await (await fetch(`${srv.url}/metrics`)).text();
});
afterAll(async () => {
  await srv?.close();
  rmSync(adapterDir, { recursive: true, force: true });
});

/** Metric families the server exposes (names of `# TYPE` lines). */
const exposedMetrics = () => new Set([...metricsText.matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1]));

describe('probes and scrapes hit routes the server has, without the API key', () => {
  for (const overlay of overlays) {
    it(`overlays/${overlay}: startup and liveness on /health, readiness on /ready, on the server's port`, async () => {
      const o = objs(overlay);
      const c = server(o);
      const cfg = config(o);
      const probes = { startup: c.startupProbe, liveness: c.livenessProbe, readiness: c.readinessProbe };
      expect(probes.liveness?.httpGet?.path).toBe('/health');
      expect(probes.readiness?.httpGet?.path).toBe('/ready');
      expect(probes.startup?.httpGet?.path).toBe('/health');
      for (const [kind, p] of Object.entries(probes)) {
        expect(portNumber(c, p!.httpGet!.port), `${kind} probe port`).toBe(cfg.port);
        // Probes carry no Authorization header: the route must answer 200 with --api-key set.
        const res = await fetch(srv.url + p!.httpGet!.path);
        expect(res.status, `${kind} probe ${p!.httpGet!.path}`).toBe(200);
      }
      expect((await fetch(`${srv.url}/v1/models`)).status, 'the key is enforced elsewhere').toBe(401);
    });
  }

  it('the startup probe allows for a model load: 5 minutes on CPU, 15 on GPU', () => {
    const budget = (overlay: string) => {
      const p = server(objs(overlay)).startupProbe!;
      return (p.periodSeconds ?? 10) * (p.failureThreshold ?? 3);
    };
    expect(budget('cpu')).toBeGreaterThanOrEqual(300);
    expect(budget('gpu')).toBeGreaterThanOrEqual(900);
  });

  it('the ServiceMonitor scrapes /metrics on the Service port the server listens on', async () => {
    for (const overlay of overlays) {
      const o = objs(overlay);
      const sm = find(o, 'ServiceMonitor', 'loraplex') as K8sObject & { spec: { selector: { matchLabels: Record<string, string> }; endpoints: Array<{ port: string; path: string }> } };
      const svc = find(o, 'Service', 'loraplex') as Svc;
      expect(matches(sm.spec.selector.matchLabels, svc.metadata.labels ?? {})).toBe(true);
      for (const ep of sm.spec.endpoints) {
        const port = svc.spec.ports.find((p) => p.name === ep.port)!;
        expect(port, `Service port ${ep.port}`).toBeDefined();
        expect(portNumber(server(o), port.targetPort ?? port.port)).toBe(config(o).port);
        expect(ep.path).toBe('/metrics');
        expect((await fetch(srv.url + ep.path)).status).toBe(200);
      }
    }
  });

  it('the server exposes the vLLM metrics the autoscaler and the endpoint picker read', () => {
    const names = exposedMetrics();
    for (const m of ['vllm:num_requests_waiting', 'vllm:kv_cache_usage_perc', 'vllm:lora_requests_info']) expect(names).toContain(m);
    const info = /^vllm:lora_requests_info\{([^}]*)\}/m.exec(metricsText);
    expect(info, 'a vllm:lora_requests_info sample').not.toBeNull();
    const labels = Object.fromEntries([...info![1].matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    expect(Object.keys(labels).sort()).toEqual(['max_lora', 'running_lora_adapters', 'waiting_lora_adapters']);
    expect(labels.max_lora).toBe(String(config(objs('cpu')).maxLoras)); // max_lora is --max-loras
  });
});

describe('environment: only variables the server reads, with values it accepts', () => {
  for (const overlay of overlays) {
    it(`overlays/${overlay}`, () => {
      const o = objs(overlay);
      const env = podEnv(o);
      for (const name of Object.keys(env)) {
        expect(name, 'the server container gets LORAPLEX_* variables only').toMatch(/^LORAPLEX_/);
        expect(unknownEnv(name)).toBeNull();
      }
      const cfg = config(o); // throws on a value the server would refuse
      expect(cfg.host).toBe('0.0.0.0');
      expect(cfg.model).toMatch(/^\/models\//);
      expect(cfg.redisUrl).not.toBeNull();
      expect(cfg.device).toBe(overlay === 'gpu' ? 'cuda' : 'cpu');
    });
  }

  it('base, the external-Redis patch and the Jobs set only known variables too', () => {
    for (const name of Object.keys(podEnv(render(k8s('base'))))) expect(unknownEnv(name)).toBeNull();
    const patch = readYaml(k8s('components/external-redis/kustomization.yaml'))[0] as { patches: Array<{ patch: string }> };
    const added = (parseYaml(patch.patches[0].patch, 'external-redis patch')[0] as Array<{ value: EnvVar }>).map((op) => op.value);
    expect(added.map((e) => e.name)).toEqual(['LORAPLEX_REDIS_URL']);
    expect(added[0].valueFrom?.secretKeyRef?.name).toBe('loraplex-redis');
    for (const f of ['demo-model.yaml', 'hf-model.yaml']) {
      const job = readYaml(k8s(`jobs/${f}`))[0] as K8sObject & { spec: { template: { spec: PodSpec } } };
      for (const e of job.spec.template.spec.containers.flatMap((c) => c.env ?? []))
        if (e.name.startsWith('LORAPLEX_')) expect(unknownEnv(e.name), f).toBeNull();
    }
  });

  it('the API key comes from a Secret, never from the ConfigMap', () => {
    for (const overlay of overlays) {
      const o = objs(overlay);
      const key = server(o).env!.find((e) => e.name === 'LORAPLEX_API_KEY')!;
      expect(key.valueFrom?.secretKeyRef).toEqual({ name: 'loraplex-api-key', key: 'api-key' });
      for (const cm of o.filter((x) => x.kind === 'ConfigMap') as CM[]) expect(Object.keys(cm.data)).not.toContain('LORAPLEX_API_KEY');
    }
  });
});

describe('the objects agree with each other', () => {
  for (const overlay of overlays) {
    it(`overlays/${overlay}: graceful shutdown fits in the grace period`, () => {
      const o = objs(overlay);
      const pod = deployment(o).spec.template.spec;
      const grace = pod.terminationGracePeriodSeconds ?? 30;
      expect(grace).toBeGreaterThanOrEqual(preStopSeconds(server(o)) + config(o).shutdownTimeout);
    });

    it(`overlays/${overlay}: Service, PDB and volumes point at the right pods and objects`, () => {
      const o = objs(overlay);
      const d = deployment(o);
      const labels = d.spec.template.metadata.labels;
      expect(matches(d.spec.selector.matchLabels, labels)).toBe(true);
      const svc = find(o, 'Service', 'loraplex') as Svc;
      expect(matches(svc.spec.selector, labels)).toBe(true);
      const pdb = find(o, 'PodDisruptionBudget', 'loraplex') as K8sObject & { spec: { selector: { matchLabels: Record<string, string> } } };
      expect(matches(pdb.spec.selector.matchLabels, labels)).toBe(true);
      for (const v of d.spec.template.spec.volumes ?? []) if (v.persistentVolumeClaim) find(o, 'PersistentVolumeClaim', v.persistentVolumeClaim.claimName);
      for (const m of server(o).volumeMounts ?? []) expect(d.spec.template.spec.volumes!.map((v) => v.name)).toContain(m.name);
      expect(d.spec.template.spec.securityContext?.runAsNonRoot).toBe(true);
      expect(d.spec).not.toHaveProperty('replicas'); // the HPA owns it
    });

    it(`overlays/${overlay}: Redis is where LORAPLEX_REDIS_URL points, reachable through its NetworkPolicy`, () => {
      const o = objs(overlay);
      const url = new URL(config(o).redisUrl!);
      const svc = find(o, 'Service', url.hostname) as Svc;
      expect(svc.spec.ports.map((p) => p.port)).toContain(Number(url.port || 6379));
      const sts = find(o, 'StatefulSet', 'loraplex-redis') as Workload & { spec: { serviceName: string } };
      expect(matches(svc.spec.selector, sts.spec.template.metadata.labels)).toBe(true);
      find(o, 'Service', sts.spec.serviceName);
      const np = find(o, 'NetworkPolicy', 'loraplex-redis') as K8sObject & {
        spec: { podSelector: { matchLabels: Record<string, string> }; ingress: Array<{ from: Array<{ podSelector: { matchLabels: Record<string, string> } }>; ports: Array<{ port: number }> }> };
      };
      expect(matches(np.spec.podSelector.matchLabels, sts.spec.template.metadata.labels)).toBe(true);
      expect(np.spec.ingress.some((r) => r.from.some((f) => matches(f.podSelector.matchLabels, deployment(o).spec.template.metadata.labels)))).toBe(true);
      expect(np.spec.ingress.flatMap((r) => r.ports.map((p) => p.port))).toContain(Number(url.port || 6379));
    });

    it(`overlays/${overlay}: the HPA scales the Deployment on the metric prometheus-adapter serves`, () => {
      const o = objs(overlay);
      const hpa = find(o, 'HorizontalPodAutoscaler', 'loraplex') as K8sObject & {
        spec: { scaleTargetRef: { kind: string; name: string }; metrics: Array<{ type: string; pods?: { metric: { name: string } } }> };
      };
      expect(hpa.spec.scaleTargetRef).toMatchObject({ kind: 'Deployment', name: 'loraplex' });
      const values = readYaml(k8s('monitoring/prometheus-adapter.values.yaml'))[0] as {
        rules: { custom: Array<{ seriesQuery: string; name: { matches: string; as: string } }> };
      };
      const rule = values.rules.custom.find((r) => r.name.as === hpa.spec.metrics[0].pods?.metric.name);
      expect(rule, 'a prometheus-adapter rule serving the HPA metric').toBeDefined();
      const series = /^([\w:]+)/.exec(rule!.seriesQuery)![1];
      expect(series).toBe('vllm:num_requests_waiting');
      expect(new RegExp(rule!.name.matches).test(series)).toBe(true);
      expect(exposedMetrics()).toContain(series);
    });
  }

  it('overlays/gpu asks for one GPU on GPU nodes; overlays/cpu for none', () => {
    const gpu = objs('gpu');
    const c = server(gpu);
    expect(String(c.resources?.limits?.['nvidia.com/gpu'])).toBe('1');
    const pod = deployment(gpu).spec.template.spec;
    expect(Object.keys(pod.nodeSelector ?? {}).length).toBeGreaterThan(0);
    expect(pod.tolerations?.some((t) => t.key === 'nvidia.com/gpu' && t.effect === 'NoSchedule')).toBe(true);
    expect(c.image).toMatch(/-cuda$/);
    expect(config(gpu).threads, 'host threads = the CPU request').toBe(Number(c.resources?.requests?.cpu));
    const cpu = server(objs('cpu'));
    expect(cpu.resources?.limits ?? {}).not.toHaveProperty('nvidia.com/gpu');
    expect(cpu.image).not.toMatch(/cuda/);
    expect(cpu.env!.find((e) => e.name === 'LORAPLEX_THREADS')?.valueFrom?.resourceFieldRef?.resource).toBe('limits.cpu');
    const pvc = find(gpu, 'PersistentVolumeClaim', 'loraplex-model') as K8sObject & { spec: { accessModes: string[] } };
    expect(pvc.spec.accessModes).toEqual(['ReadWriteMany']);
  });
});

describe('deploy/gateway: the InferencePool, its endpoint picker and the route', () => {
  const pool = () => find(gateway(), 'InferencePool', 'loraplex') as K8sObject & {
    spec: { selector: { matchLabels: Record<string, string> }; targetPorts: Array<{ number: number }>; endpointPickerRef: { name: string; port: { number: number } } };
  };
  const epp = () => find(gateway(), 'Deployment', 'loraplex-epp') as Workload;
  const flag = (name: string) => {
    const arg = epp().spec.template.spec.containers[0].args!.find((a) => a.startsWith(`--${name}=`));
    if (!arg) throw new Error(`EPP has no --${name}`);
    return arg.slice(name.length + 3);
  };

  it('selects the loraplex server pods, on the port they listen on', () => {
    for (const overlay of overlays) {
      const o = objs(overlay);
      expect(matches(pool().spec.selector.matchLabels, deployment(o).spec.template.metadata.labels)).toBe(true);
      expect(pool().spec.targetPorts.map((p) => p.number)).toEqual([config(o).port]);
    }
  });

  it('references the endpoint picker Service, which serves the EPP gRPC port', () => {
    const ref = pool().spec.endpointPickerRef;
    const svc = find(gateway(), 'Service', ref.name) as Svc;
    const port = svc.spec.ports.find((p) => p.port === ref.port.number)!;
    expect(port).toBeDefined();
    expect(matches(svc.spec.selector, epp().spec.template.metadata.labels)).toBe(true);
    expect(portNumber(epp().spec.template.spec.containers[0], port.targetPort!)).toBe(9002);
    expect(flag('pool-name')).toBe(pool().metadata.name);
    expect(flag('pool-group')).toBe(pool().apiVersion.split('/')[0]);
    const sa = (epp().spec.template.spec as { serviceAccountName?: string }).serviceAccountName!;
    find(gateway(), 'ServiceAccount', sa);
    const rb = find(gateway(), 'RoleBinding', 'loraplex-epp') as K8sObject & { subjects: Array<{ name: string }>; roleRef: { kind: string; name: string } };
    expect(rb.subjects.map((s) => s.name)).toContain(sa);
    find(gateway(), rb.roleRef.kind, rb.roleRef.name);
  });

  it('the endpoint picker reads metrics the server exposes, and scores LoRA affinity', () => {
    const names = exposedMetrics();
    for (const f of ['total-queued-requests-metric', 'kv-cache-usage-percentage-metric', 'lora-info-metric']) expect(names, f).toContain(flag(f));
    const configFile = flag('config-file');
    const c = epp().spec.template.spec.containers[0];
    const mount = c.volumeMounts!.find((m) => configFile.startsWith(m.mountPath + '/'))!;
    const vol = epp().spec.template.spec.volumes!.find((v) => v.name === mount.name)!;
    const cm = find(gateway(), 'ConfigMap', vol.configMap!.name) as CM;
    const cfgText = cm.data[configFile.slice(mount.mountPath.length + 1)];
    const pluginsCfg = parseYaml(cfgText, 'EPP plugins')[0] as {
      kind: string; plugins: Array<{ type: string; name?: string }>; schedulingProfiles: Array<{ plugins: Array<{ pluginRef: string }> }>;
    };
    expect(pluginsCfg.kind).toBe('EndpointPickerConfig');
    const defined = new Set(pluginsCfg.plugins.map((p) => p.name ?? p.type));
    expect(defined).toContain('lora-affinity-scorer');
    for (const ref of pluginsCfg.schedulingProfiles.flatMap((p) => p.plugins)) expect(defined, ref.pluginRef).toContain(ref.pluginRef);
    // The EPP outlives the pods it routes to while they drain.
    const grace = (w: Workload) => w.spec.template.spec.terminationGracePeriodSeconds ?? 30;
    expect(grace(epp())).toBeGreaterThanOrEqual(grace(deployment(objs('gpu'))));
  });

  it('routes generation to the InferencePool and the rest to the loraplex Service, through the Gateway', async () => {
    const route = find(gateway(), 'HTTPRoute', 'loraplex') as K8sObject & {
      spec: { parentRefs: Array<{ name: string }>; rules: Array<{ matches: Array<{ path: { type: string; value: string } }>; backendRefs: Array<{ kind?: string; name: string; port?: number }> }> };
    };
    for (const p of route.spec.parentRefs) find(gateway(), 'Gateway', p.name);
    const toPool = route.spec.rules.filter((r) => r.backendRefs.some((b) => b.kind === 'InferencePool'));
    expect(toPool.flatMap((r) => r.backendRefs).map((b) => b.name)).toEqual([pool().metadata.name]);
    const pooled = toPool.flatMap((r) => r.matches.map((m) => m.path.value));
    expect(pooled.sort()).toEqual(['/v1/chat/completions', '/v1/completions']);
    for (const path of pooled) {
      // Routes the server has: a bodyless POST is a 400 from the route, not a 404.
      const res = await fetch(srv.url + path, { method: 'POST', headers: { authorization: 'Bearer deploy-test-key', 'content-type': 'application/json' }, body: '{}' });
      expect(res.status, path).toBe(400);
    }
    const svcRefs = route.spec.rules.flatMap((r) => r.backendRefs).filter((b) => (b.kind ?? 'Service') === 'Service');
    expect(svcRefs.length).toBeGreaterThan(0);
    for (const b of svcRefs) {
      const svc = find(objs('cpu'), 'Service', b.name) as Svc;
      expect(svc.spec.ports.map((p) => p.port)).toContain(b.port);
    }
  });
});

describe('the Jobs fill the volume the Deployment mounts', () => {
  it('demo-model.yaml generates the model LORAPLEX_MODEL names', () => {
    const job = readYaml(k8s('jobs/demo-model.yaml'))[0] as K8sObject & { spec: { template: { spec: PodSpec } } };
    const c = job.spec.template.spec.containers[0];
    expect(c.command?.slice(0, 2)).toEqual(['loraplex', 'generate']);
    const cache = c.env!.find((e) => e.name === 'LORAPLEX_CACHE_DIR')!.value!;
    for (const overlay of overlays) expect(config(objs(overlay)).model).toBe(`${cache}/demo-v1`);
    expect(readFileSync(join(DEPLOY, '..', 'server', 'demo', 'demo-model.ts'), 'utf8')).toContain("DEMO_VERSION = 'demo-v1'");
    expect(c.image).toBe(server(objs('cpu')).image);
  });
});
