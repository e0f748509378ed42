// Lints the Dockerfile without a Docker engine: every instruction parses, stages and the files it
// copies exist (and are not dropped by .dockerignore), the CMake and TypeScript sources the build
// needs are all copied, the runtime images run `loraplex serve` as a non-root user with a
// HEALTHCHECK, and the LORAPLEX_* variables it sets are ones the server reads. Also checks that the
// documented mount points (/models, /adapters) agree between the image, the manifests and the docs.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { serveConfig } from '../../server/config.js';
import { copyPaths, isIgnored, keyValues, parseDockerfile, parseDockerignore, type Instruction, type Stage } from './dockerfile.js';
import { unknownEnv } from './env-names.js';
import { find, render, ROOT, type K8sObject } from './render.js';

const df = parseDockerfile(readFileSync(join(ROOT, 'Dockerfile'), 'utf8'));
const ignore = parseDockerignore(existsSync(join(ROOT, '.dockerignore')) ? readFileSync(join(ROOT, '.dockerignore'), 'utf8') : '');
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string> };

const stage = (name: string): Stage => {
  const s = df.stages.find((st) => st.name === name);
  if (!s) throw new Error(`Dockerfile has no stage ${name}`);
  return s;
};
const all = (s: Stage, kw: string): Instruction[] => s.instructions.filter((i) => i.keyword === kw);
const last = (s: Stage, kw: string): Instruction | undefined => all(s, kw).at(-1);
const envOf = (s: Stage): Record<string, string> => Object.assign({}, ...all(s, 'ENV').map((i) => keyValues(i.rest)));
const labelsOf = (s: Stage): Record<string, string> => Object.assign({}, ...all(s, 'LABEL').map((i) => keyValues(i.rest)));
const runText = (s: Stage): string => all(s, 'RUN').map((i) => i.rest).join('\n');
const runtimeStages = (): Stage[] => df.stages.filter((s) => all(s, 'ENTRYPOINT').length > 0);

/** Context paths that COPY/ADD (without --from) bring in. */
const contextSources = df.stages.flatMap((s) =>
  s.instructions.filter((i) => (i.keyword === 'COPY' || i.keyword === 'ADD') && !i.flags.from).flatMap((i) => copyPaths(i).sources),
);

function copiedFromContext(path: string): boolean {
  const covered = contextSources.some((src) => {
    const s = src.replace(/^\.\//, '').replace(/\/+$/, '');
    return s === '.' || path === s || path.startsWith(s + '/');
  });
  return covered && !isIgnored(ignore, path);
}

/** CMake text without comments and quoted arguments (messages, cache help texts), so only code remains. */
function cmakeCode(text: string): string {
  let out = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      for (i++; i < text.length && text[i] !== '"'; i++) if (text[i] === '\\') i++;
      out += '""';
    } else if (c === '#') {
      while (i < text.length && text[i] !== '\n') i++;
      out += '\n';
    } else out += c;
  }
  return out;
}

describe('Dockerfile', () => {
  it('parses: known instructions, continuations, JSON exec forms', () => {
    expect(df.errors).toEqual([]);
    expect(df.stages.length).toBeGreaterThanOrEqual(4);
  });

  it('names unique stages; every --from, FROM and documented --target is a stage or a pinned image', () => {
    const names = df.stages.map((s) => s.name).filter((n): n is string => n !== null);
    expect(new Set(names).size).toBe(names.length);
    for (const s of df.stages) {
      const earlier = df.stages.slice(0, s.index).map((x) => x.name);
      if (!earlier.includes(s.base) && s.base !== 'scratch') {
        // An external image: an explicit tag, never :latest.
        expect(s.base, `stage ${s.name}: base image needs a tag`).toMatch(/^[^\s$]+:[^/\s$]+$/);
        expect(s.base).not.toMatch(/:latest$/);
      }
      for (const ins of s.instructions.filter((i) => i.flags.from)) {
        expect(earlier, `line ${ins.line}: --from=${ins.flags.from} is not an earlier stage`).toContain(ins.flags.from);
      }
    }
    const docs = ['Dockerfile', 'deploy/README.md'].map((f) => readFileSync(join(ROOT, f), 'utf8')).join('\n');
    const targets = [...docs.matchAll(/docker build[^\n]*--target[ =]([\w-]+)/g)].map((m) => m[1]);
    expect(targets).toContain('cuda');
    for (const t of targets) expect(names, `--target ${t}`).toContain(t);
  });

  it('builds a CPU image by default (last stage) and a CUDA image from NVIDIA devel/runtime bases', () => {
    expect(df.stages.at(-1)!.name).toBe('cpu');
    const cuda = stage('cuda');
    expect(cuda.base).toMatch(/^nvidia\/cuda:[\w.]+-runtime-/);
    const addonFrom = (s: Stage) => all(s, 'COPY').find((i) => copyPaths(i).sources.some((p) => p.endsWith('.node')))?.flags.from;
    const cudaBuild = stage(addonFrom(cuda)!);
    expect(cudaBuild.base).toMatch(/^nvidia\/cuda:[\w.]+-devel-/);
    expect(runText(cudaBuild)).toMatch(/cmake-js compile[^\n]*--CDLORAPLEX_CUDA=ON/);
    const cpuBuild = stage(addonFrom(stage('cpu'))!);
    expect(runText(cpuBuild)).toMatch(/cmake-js compile/);
    expect(runText(cpuBuild)).not.toMatch(/LORAPLEX_CUDA=ON/);
    for (const b of [cpuBuild, cudaBuild]) {
      expect(runText(b), `${b.name}: installs from the lockfile`).toMatch(/npm ci\b/);
      expect(runText(b), `${b.name}: compiles TypeScript`).toMatch(/tsc -p tsconfig\.json/);
      expect(runText(b), `${b.name}: ships production dependencies only`).toMatch(/npm prune --omit=dev/);
    }
  });

  it('copies only files that exist in the repository and that .dockerignore keeps', () => {
    expect(contextSources.length).toBeGreaterThan(0);
    for (const src of contextSources) {
      expect(src, 'no paths outside the build context').not.toMatch(/(^|\/)\.\.(\/|$)|^\//);
      expect(existsSync(join(ROOT, src)), `COPY source ${src} is missing`).toBe(true);
      expect(isIgnored(ignore, src), `COPY source ${src} is excluded by .dockerignore`).toBe(false);
    }
    expect(contextSources).toContain('package-lock.json');
  });

  it('copies every source CMakeLists.txt declares, the TypeScript sources and the CLI entry point', () => {
    const cmake = cmakeCode(readFileSync(join(ROOT, 'CMakeLists.txt'), 'utf8'));
    const sources = [...cmake.matchAll(/\b(?:add_library|add_executable|target_sources|set)\s*\(([^)]*)\)/g)]
      .flatMap((m) => m[1].split(/\s+/))
      .filter((t) => /^[\w./-]+\.(c|cc|cpp|cxx|cu|h|hpp|cuh)$/.test(t));
    expect(sources.length).toBeGreaterThan(5);
    for (const s of sources) expect(copiedFromContext(s), `${s} (CMakeLists.txt) is not copied into the build`).toBe(true);
    for (const f of ['CMakeLists.txt', 'tsconfig.json', 'package.json', ...Object.values(pkg.bin)])
      expect(copiedFromContext(f), `${f} is not copied into the build`).toBe(true);
    const tsconfig = JSON.parse(readFileSync(join(ROOT, 'tsconfig.json'), 'utf8')) as { include: string[] };
    for (const pattern of tsconfig.include) {
      const dir = pattern.split('/')[0];
      expect(copiedFromContext(`${dir}/x.ts`), `${dir}/ (tsconfig include) is not copied`).toBe(true);
    }
  });

  it('runtime images run `loraplex serve` as a non-root user, with a HEALTHCHECK on /health', () => {
    const runtimes = runtimeStages();
    expect(runtimes.map((s) => s.name).sort()).toEqual(['cpu', 'cuda']);
    const addonTs = readFileSync(join(ROOT, 'server', 'native', 'addon.ts'), 'utf8');
    for (const s of runtimes) {
      const user = last(s, 'USER')?.rest ?? '';
      expect(user, `${s.name}: USER`).toMatch(/^\d+(:\d+)?$/); // numeric, so runAsNonRoot can verify it
      const uid = user.split(':')[0];
      expect(Number(uid)).toBeGreaterThan(0);
      expect(runText(s), `${s.name}: creates user ${uid}`).toMatch(new RegExp(`useradd[^\\n]*--uid ${uid}\\b`));

      expect(last(s, 'ENTRYPOINT')?.json).toEqual(['loraplex', 'serve']);
      // `loraplex` on PATH is package.json's bin, linked from the app directory.
      const workdir = last(s, 'WORKDIR')!.rest;
      expect(runText(s)).toContain(`ln -s ${workdir}/${pkg.bin.loraplex} /usr/local/bin/loraplex`);
      const copied = all(s, 'COPY').map((i) => copyPaths(i).dest);
      for (const d of ['./', 'node_modules/', 'dist/', 'bin/', 'build/Release/']) expect(copied, `${s.name} copies ${d}`).toContain(d);
      // The addon lands where server/native/addon.ts looks for it.
      const addon = all(s, 'COPY').flatMap((i) => copyPaths(i).sources).find((p) => p.endsWith('.node'))!;
      expect(addonTs).toContain(addon.split('/').pop()!);
      expect(addon).toContain('build/Release/');

      const hc = last(s, 'HEALTHCHECK')!;
      expect(hc, `${s.name}: HEALTHCHECK`).toBeDefined();
      expect(hc.json?.join(' ')).toContain('/health');
      expect(hc.json?.join(' ')).toContain('LORAPLEX_PORT');
      expect(hc.flags['start-period']).toMatch(/^\d+s$/);
      expect(parseInt(hc.flags['start-period'])).toBeGreaterThanOrEqual(60);
    }
  });

  it('sets only LORAPLEX_* variables that the server reads, with values it accepts', () => {
    for (const s of runtimeStages()) {
      const env = envOf(s);
      const names = Object.keys(env).filter((k) => k.startsWith('LORAPLEX_'));
      expect(names.length).toBeGreaterThan(2);
      for (const n of names) expect(unknownEnv(n)).toBeNull();
      const cfg = serveConfig([], env);
      expect(cfg.host).toBe('0.0.0.0'); // reachable from outside the container
      expect(all(s, 'EXPOSE').map((i) => i.rest)).toEqual([String(cfg.port)]);
      // Writable for the runtime user: the adapter directory and the demo model's cache.
      for (const dir of [env.LORAPLEX_ADAPTER_DIR, env.LORAPLEX_CACHE_DIR]) {
        expect(dir).toMatch(/^\//);
        expect(runText(s)).toMatch(new RegExp(`chown [^\\n]*${dir.replace(/[/.]/g, '\\$&')}`));
      }
    }
  });

  it('CPU and CUDA images are configured identically', () => {
    const summary = (s: Stage) => ({
      env: envOf(s),
      user: last(s, 'USER')?.rest,
      workdir: last(s, 'WORKDIR')?.rest,
      expose: all(s, 'EXPOSE').map((i) => i.rest),
      entrypoint: last(s, 'ENTRYPOINT')?.json,
      healthcheck: last(s, 'HEALTHCHECK')?.json,
      mounts: Object.fromEntries(Object.entries(labelsOf(s)).filter(([k]) => k.startsWith('io.loraplex.'))),
    });
    expect(summary(stage('cuda'))).toEqual(summary(stage('cpu')));
  });
});

describe('.dockerignore', () => {
  it('keeps local build outputs and dependencies out of the context', () => {
    for (const p of ['node_modules', 'node_modules/x/index.js', 'build/Release/loraplex_native.node', 'dist/server/main.js', '.git/HEAD'])
      expect(isIgnored(ignore, p), p).toBe(true);
    for (const p of ['server/main.ts', 'addon/engine.cc', 'test/native/kernel_tests.cc', 'test/cuda/backend_ops_test.cu', 'package-lock.json'])
      expect(isIgnored(ignore, p), p).toBe(false);
  });
});

describe('mount points agree: image, manifests, docs', () => {
  const cpu = stage('cpu');
  const labels = labelsOf(cpu);
  const modelsDir = labels['io.loraplex.models-dir'];
  const adaptersDir = labels['io.loraplex.adapters-dir'];

  const containerOf = (objs: K8sObject[]) => {
    const d = find(objs, 'Deployment', 'loraplex') as K8sObject & { spec: { template: { spec: PodSpec } } };
    return { pod: d.spec.template.spec, c: d.spec.template.spec.containers.find((c) => c.name === 'loraplex')! };
  };

  it('the image declares /models and /adapters and creates them', () => {
    expect(modelsDir).toBe('/models');
    expect(adaptersDir).toBe('/adapters');
    expect(envOf(cpu).LORAPLEX_ADAPTER_DIR).toBe(adaptersDir);
    expect(runText(cpu)).toMatch(/mkdir -p [^\n]*\/models\b[^\n]*\/adapters\b/);
  });

  for (const overlay of ['cpu', 'gpu']) {
    it(`overlays/${overlay} mounts the model read-only at /models and adapters at /adapters`, () => {
      const objs = render(join(ROOT, 'deploy', 'k8s', 'overlays', overlay));
      const { pod, c } = containerOf(objs);
      const cm = find(objs, 'ConfigMap', c.envFrom![0].configMapRef!.name) as K8sObject & { data: Record<string, string> };
      const modelMount = c.volumeMounts!.find((m) => m.mountPath === modelsDir)!;
      expect(modelMount, 'a volume mounted at the models dir').toBeDefined();
      expect(modelMount.readOnly).toBe(true);
      const vol = pod.volumes!.find((v) => v.name === modelMount.name)!;
      expect(vol.persistentVolumeClaim?.readOnly).toBe(true);
      expect(cm.data.LORAPLEX_MODEL.startsWith(modelsDir + '/')).toBe(true);
      expect(cm.data.LORAPLEX_ADAPTER_DIR).toBe(adaptersDir);
      const adapterMount = c.volumeMounts!.find((m) => m.mountPath === adaptersDir)!;
      expect(adapterMount, 'a writable volume at the adapters dir').toBeDefined();
      expect(adapterMount.readOnly ?? false).toBe(false);
    });
  }

  it('the model Jobs write to the same volume at /models', () => {
    for (const f of ['demo-model.yaml', 'hf-model.yaml']) {
      const text = readFileSync(join(ROOT, 'deploy', 'k8s', 'jobs', f), 'utf8');
      expect(text, f).toMatch(new RegExp(`mountPath: ${modelsDir}\\n`));
      expect(text, f).toContain('claimName: loraplex-model');
    }
  });

  it('deploy/README.md documents the same paths', () => {
    const readme = readFileSync(join(ROOT, 'deploy', 'README.md'), 'utf8');
    expect(readme).toContain(`:${modelsDir}/`);
    expect(readme).toContain(`:${adaptersDir}`);
    expect(readme).toContain(`LORAPLEX_MODEL=${modelsDir}/`);
    expect(statSync(join(ROOT, 'Dockerfile')).isFile()).toBe(true);
  });
});

interface PodSpec {
  containers: Array<{
    name: string;
    envFrom?: Array<{ configMapRef?: { name: string } }>;
    volumeMounts?: Array<{ name: string; mountPath: string; readOnly?: boolean }>;
  }>;
  volumes?: Array<{ name: string; persistentVolumeClaim?: { claimName: string; readOnly?: boolean } }>;
}
