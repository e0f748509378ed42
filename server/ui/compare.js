// Compare: one prompt on two to four models (base or adapters) at once, each streamed into its own
// pane. The requests go out together, so the server batches them in the same engine steps.
import { StreamTimer, chunkText, endpointOf, generationBody, stream } from './api.js';
import { $, onModels, settings } from './shared.js';

const MAX = 4;
let controllers = [];

function selected() {
  return [...document.querySelectorAll('#compare-models input:checked')].map((i) => i.value);
}

function limitChoices() {
  const full = selected().length >= MAX;
  for (const i of document.querySelectorAll('#compare-models input')) i.disabled = full && !i.checked;
}

function fillChips(m) {
  const keep = new Set(selected());
  const all = [...(m.base ? [m.base] : []), ...m.adapters];
  // First time (or when the choice vanished): the first two adapters, else the first two models.
  if (![...keep].some((id) => all.includes(id))) for (const id of (m.adapters.length >= 2 ? m.adapters : all).slice(0, 2)) keep.add(id);
  const box = $('compare-models');
  box.replaceChildren();
  for (const id of all) {
    const label = document.createElement('label');
    label.className = 'chip';
    const input = document.createElement('input');
    input.type = 'checkbox';
    input.value = id;
    input.checked = keep.has(id);
    input.addEventListener('change', limitChoices);
    label.append(input, ` ${id}${id === m.base ? ' (base)' : ''}`);
    box.append(label);
  }
  limitChoices();
}

function pane(model) {
  const el = document.createElement('article');
  el.className = 'pane';
  el.dataset.model = model;
  const h = document.createElement('h3');
  h.textContent = model;
  const text = document.createElement('div');
  text.className = 'text streaming';
  const stats = document.createElement('div');
  stats.className = 'stats';
  el.append(h, text, stats);
  $('panes').append(el);
  return { text, stats };
}

async function runOne(s, model, prompt, signal) {
  const { text, stats } = pane(model);
  const timer = new StreamTimer();
  try {
    await stream(endpointOf(s.mode), generationBody(s, model, prompt), (chunk) => {
      timer.chunk(chunk);
      text.textContent += chunkText(chunk);
      stats.textContent = timer.summary();
    }, signal);
  } catch (e) {
    if (e.name !== 'AbortError') {
      const err = document.createElement('p');
      err.className = 'error';
      err.textContent = e.message;
      text.after(err);
    }
  } finally {
    text.classList.remove('streaming');
    stats.textContent = timer.summary();
  }
}

async function run() {
  const chosen = selected();
  const prompt = $('compare-input').value;
  $('compare-error').textContent = '';
  if (chosen.length < 2) {
    $('compare-error').textContent = 'choose two to four models';
    return;
  }
  if (!prompt.trim() || controllers.length) return;
  const s = settings();
  $('panes').replaceChildren();
  $('panes').dataset.count = String(chosen.length);
  controllers = chosen.map(() => new AbortController());
  $('compare-run').disabled = true;
  $('compare-stop').disabled = false;
  try {
    await Promise.all(chosen.map((m, i) => runOne(s, m, prompt, controllers[i].signal)));
  } finally {
    controllers = [];
    $('compare-run').disabled = false;
    $('compare-stop').disabled = true;
  }
}

export function initCompare() {
  onModels(fillChips);
  $('compare-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    void run();
  });
  $('compare-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      void run();
    }
  });
  $('compare-stop').addEventListener('click', () => controllers.forEach((c) => c.abort()));
}
