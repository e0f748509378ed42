// State every view shares: the element lookup, the generation settings, the served models.
import { apiJson } from './api.js';

export const $ = (id) => document.getElementById(id);

/** Generation settings from the bar above the chat and compare views. */
export function settings() {
  const stop = $('stop').value.split(',').map((s) => s.trim().replace(/\\n/g, '\n').replace(/\\t/g, '\t')).filter(Boolean);
  return {
    mode: $('mode').value,
    temperature: Number($('temperature').value) || 0,
    maxTokens: Math.max(1, Math.floor(Number($('max-tokens').value) || 16)),
    stop: stop.slice(0, 4),
  };
}

// The models the server serves (GET /v1/models): the base first, then adapters. Views subscribe.
const listeners = [];
export const models = { base: null, adapters: [] };
export function onModels(fn) {
  listeners.push(fn);
}

export async function refreshModels() {
  const list = await apiJson('/v1/models');
  const base = list.data.find((m) => m.parent === null) ?? list.data[0];
  models.base = base ? base.id : null;
  models.adapters = list.data.filter((m) => m !== base).map((m) => m.id).sort();
  $('base-model').textContent = models.base ? `base: ${models.base}` : '';
  for (const fn of listeners) fn(models);
  return models;
}
