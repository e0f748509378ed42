// Schema validation of rendered Kubernetes objects:
// - kubernetes-models' validators (the Kubernetes OpenAPI schemas, and the prometheus-operator
//   and Gateway API CRDs) check types, required fields and enums;
// - the same packages' TypeScript declarations catch unknown fields (a misspelt `readinesProbe`
//   passes the OpenAPI schemas, which allow extra properties, but the API server's strict field
//   validation rejects it): each object becomes a typed object literal and tsc's excess-property
//   check runs over them;
// - InferencePool (Gateway API inference extension) has no package: its schema is below.
import { Ajv, type ErrorObject } from 'ajv';
import { join, relative } from 'node:path';
import ts from 'typescript';
import { ROOT, type K8sObject } from './render.js';

/** Which package holds the models of an API group (the core groups live in kubernetes-models). */
const GROUP_PACKAGES: Record<string, string> = {
  '': 'kubernetes-models',
  apps: 'kubernetes-models',
  batch: 'kubernetes-models',
  policy: 'kubernetes-models',
  autoscaling: 'kubernetes-models',
  'networking.k8s.io': 'kubernetes-models',
  'rbac.authorization.k8s.io': 'kubernetes-models',
  'monitoring.coreos.com': '@kubernetes-models/prometheus-operator',
  'gateway.networking.k8s.io': '@kubernetes-models/gateway-api',
};

function groupOf(apiVersion: string): string {
  return apiVersion.includes('/') ? apiVersion.split('/')[0] : '';
}

function modelModule(o: K8sObject): string | null {
  const pkg = GROUP_PACKAGES[groupOf(o.apiVersion)];
  return pkg ? `${pkg}/${o.apiVersion}/${o.kind}` : null;
}

// --- InferencePool, inference.networking.k8s.io/v1 ----------------------------------------------
// Written from the published CRD of the Gateway API inference extension (v1.0 onwards): the
// fields every v1 release accepts, with v1.0's stricter rules (endpointPickerRef required, one
// target port). additionalProperties: false stands in for the API server's strict field check.
const labelValue = { type: 'string', maxLength: 63, pattern: '^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$' };
const port = { type: 'integer', minimum: 1, maximum: 65535 };
const INFERENCE_POOL_V1 = {
  type: 'object',
  required: ['apiVersion', 'kind', 'metadata', 'spec'],
  additionalProperties: false,
  properties: {
    apiVersion: { const: 'inference.networking.k8s.io/v1' },
    kind: { const: 'InferencePool' },
    metadata: { type: 'object', required: ['name'] },
    spec: {
      type: 'object',
      additionalProperties: false,
      required: ['selector', 'targetPorts', 'endpointPickerRef'],
      properties: {
        selector: {
          type: 'object',
          additionalProperties: false,
          required: ['matchLabels'],
          properties: {
            matchLabels: { type: 'object', minProperties: 1, maxProperties: 64, additionalProperties: labelValue },
          },
        },
        targetPorts: {
          type: 'array',
          minItems: 1,
          maxItems: 1,
          items: { type: 'object', additionalProperties: false, required: ['number'], properties: { number: port } },
        },
        endpointPickerRef: {
          type: 'object',
          additionalProperties: false,
          required: ['name'],
          properties: {
            group: { type: 'string', maxLength: 253, pattern: '^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$' },
            kind: { type: 'string', minLength: 1, maxLength: 63, pattern: '^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$' },
            name: { type: 'string', minLength: 1, maxLength: 253 },
            port: { type: 'object', additionalProperties: false, required: ['number'], properties: { number: port } },
            failureMode: { enum: ['FailOpen', 'FailClose'] },
          },
          // The CRD's CEL rule: a Service (the default kind) needs a port.
          if: { not: { required: ['kind'] } },
          then: { required: ['port'] },
          else: { if: { properties: { kind: { const: 'Service' } } }, then: { required: ['port'] } },
        },
      },
    },
  },
};

const ajv = new Ajv({ allErrors: true, strict: true, strictRequired: false });
const CUSTOM: Record<string, ReturnType<typeof ajv.compile>> = {
  'inference.networking.k8s.io/v1 InferencePool': ajv.compile(INFERENCE_POOL_V1),
};

function ajvMessages(errors: ErrorObject[] | null | undefined): string {
  return (errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message}${e.params ? ' ' + JSON.stringify(e.params) : ''}`).join('; ');
}

const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const LABEL_KEY = /^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;
const LABEL_VALUE = new RegExp(labelValue.pattern);

/** Schema errors of one object (empty when it is valid); an unknown kind is an error. */
export async function validateObject(o: K8sObject): Promise<string[]> {
  const errors: string[] = [];
  const { name, labels } = o.metadata;
  if (name.length > 253 || !DNS_SUBDOMAIN.test(name)) errors.push(`metadata.name ${JSON.stringify(name)} is not a DNS subdomain`);
  for (const [k, v] of Object.entries(labels ?? {})) {
    if (!LABEL_KEY.test(k)) errors.push(`label key ${JSON.stringify(k)} is invalid`);
    if (typeof v !== 'string' || v.length > 63 || !LABEL_VALUE.test(v)) errors.push(`label ${k}=${JSON.stringify(v)}: invalid value`);
  }
  const custom = CUSTOM[`${o.apiVersion} ${o.kind}`];
  if (custom) {
    if (!custom(o)) errors.push(ajvMessages(custom.errors));
    return errors;
  }
  const mod = modelModule(o);
  if (!mod) return [...errors, `no schema for ${o.apiVersion} ${o.kind}`];
  let Model: new (data: unknown) => { validate(): void };
  try {
    Model = ((await import(mod)) as Record<string, typeof Model>)[o.kind];
    if (!Model) throw new Error(`${mod} exports no ${o.kind}`);
  } catch (e) {
    return [...errors, `no schema for ${o.apiVersion} ${o.kind}: ${(e as Error).message}`];
  }
  try {
    new Model(o).validate();
  } catch (e) {
    errors.push((e as Error).message);
  }
  return errors;
}

/**
 * Unknown fields, via the packages' TypeScript declarations: returns one message per offending
 * object ("where: ...does not exist in type..."). Objects without declarations are skipped here
 * (InferencePool's JSON schema above is strict itself).
 */
export function unknownFieldErrors(items: Array<{ obj: K8sObject; where: string }>): string[] {
  const file = join(ROOT, 'test', 'deploy', '__deploy_strict_fields__.ts');
  const typed = items
    .map((item, i) => ({ ...item, i, mod: CUSTOM[`${item.obj.apiVersion} ${item.obj.kind}`] ? null : modelModule(item.obj) }))
    .filter((t): t is typeof t & { mod: string } => t.mod !== null);
  let source = '';
  let lineNo = 0;
  const add = (text: string) => {
    source += text + '\n';
    lineNo += text.split('\n').length;
  };
  for (const t of typed) add(`import type { I${t.obj.kind} as T${t.i} } from ${JSON.stringify(t.mod)};`);
  const owners: Array<{ from: number; where: string }> = [];
  for (const t of typed) {
    owners.push({ from: lineNo, where: t.where });
    add(`export const o${t.i}: T${t.i} = ${JSON.stringify(t.obj, null, 1)};`);
  }
  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    skipLibCheck: true,
    types: [],
    lib: ['lib.es2022.d.ts'],
  };
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile.bind(host);
  const fileExists = host.fileExists.bind(host);
  host.getSourceFile = (f, lang, ...rest) => (f === file ? ts.createSourceFile(f, source, lang) : getSourceFile(f, lang, ...rest));
  host.fileExists = (f) => f === file || fileExists(f);
  const program = ts.createProgram([file], options, host);
  const sf = program.getSourceFile(file)!;
  return ts.getPreEmitDiagnostics(program, sf).map((d) => {
    const line = d.start === undefined ? 0 : sf.getLineAndCharacterOfPosition(d.start).line;
    const owner = [...owners].reverse().find((w) => w.from <= line);
    return `${owner?.where ?? relative(ROOT, file)}: ${ts.flattenDiagnosticMessageText(d.messageText, ' ')}`;
  });
}
