// Adapters: the list (GET /v1/adapters), upload of the two PEFT files (POST /v1/adapters,
// multipart: id, adapter_config.json, adapter_model.safetensors) by drag and drop or file inputs,
// and delete (DELETE /v1/adapters/:id). Errors show the server's own message.
import { api, apiJson } from './api.js';
import { $, onModels, refreshModels } from './shared.js';

const CONFIG = 'adapter_config.json';
const WEIGHTS = 'adapter_model.safetensors';
const picked = { [CONFIG]: null, [WEIGHTS]: null };

function size(n) {
  if (n == null) return '';
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}

function showPicked() {
  const parts = Object.entries(picked).filter(([, f]) => f).map(([role, f]) => `${role} ← ${f.name} (${size(f.size)})`);
  $('upload-files').textContent = parts.join(' · ');
}

/** A dropped or chosen file goes to the slot its extension names. */
function take(file) {
  if (/\.json$/i.test(file.name)) picked[CONFIG] = file;
  else if (/\.safetensors$/i.test(file.name)) picked[WEIGHTS] = file;
  else {
    $('upload-error').textContent = `${file.name}: expected ${CONFIG} or ${WEIGHTS}`;
    return;
  }
  showPicked();
}

function cell(row, text) {
  const td = document.createElement('td');
  td.textContent = text ?? '';
  row.append(td);
  return td;
}

async function remove(id, button) {
  if (button.dataset.armed !== '1') {
    // Two clicks: the first arms the button for a few seconds.
    button.dataset.armed = '1';
    button.textContent = 'Confirm delete';
    setTimeout(() => {
      button.dataset.armed = '';
      button.textContent = 'Delete';
    }, 4000);
    return;
  }
  button.disabled = true;
  $('upload-error').textContent = '';
  try {
    await api(`/v1/adapters/${encodeURIComponent(id)}`, { method: 'DELETE' });
    $('upload-status').textContent = `deleted ${id}`;
  } catch (e) {
    $('upload-error').textContent = e.message;
  }
  await refreshModels().catch(() => undefined);
}

async function renderTable() {
  const body = $('adapters').tBodies[0];
  let list;
  try {
    list = await apiJson('/v1/adapters');
  } catch (e) {
    $('upload-error').textContent = e.message;
    return;
  }
  body.replaceChildren();
  for (const a of list.data) {
    const tr = document.createElement('tr');
    tr.dataset.id = a.id;
    cell(tr, a.id).className = 'id';
    cell(tr, a.rank);
    cell(tr, a.alpha);
    cell(tr, Array.isArray(a.target_modules) ? a.target_modules.join(', ') : a.target_modules);
    cell(tr, a.tier);
    cell(tr, a.requests_served);
    cell(tr, size(a.size));
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'ghost danger';
    b.textContent = 'Delete';
    b.addEventListener('click', () => void remove(a.id, b));
    cell(tr, '').append(b);
    body.append(tr);
  }
  if (!list.data.length) {
    const tr = document.createElement('tr');
    cell(tr, 'no adapters yet').colSpan = 8;
    body.append(tr);
  }
}

async function upload() {
  const id = $('upload-id').value.trim();
  $('upload-error').textContent = '';
  $('upload-status').textContent = 'uploading…';
  const form = new FormData();
  form.append('id', id);
  for (const [role, file] of Object.entries(picked)) if (file) form.append(role, file, role);
  $('upload-button').disabled = true;
  try {
    const a = await apiJson('/v1/adapters', { method: 'POST', body: form });
    $('upload-status').textContent = `uploaded ${a.id}: rank ${a.rank}, ${size(a.size)}`;
    picked[CONFIG] = picked[WEIGHTS] = null;
    $('upload-form').reset();
    showPicked();
    await refreshModels();
  } catch (e) {
    $('upload-status').textContent = '';
    $('upload-error').textContent = e.message;
  } finally {
    $('upload-button').disabled = false;
  }
}

export function initAdapters() {
  onModels(() => void renderTable());
  const drop = $('drop');
  drop.addEventListener('dragover', (ev) => {
    ev.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    $('upload-error').textContent = '';
    for (const f of ev.dataTransfer.files) take(f);
  });
  $('upload-config').addEventListener('change', (ev) => {
    picked[CONFIG] = ev.target.files[0] ?? null;
    showPicked();
  });
  $('upload-model').addEventListener('change', (ev) => {
    picked[WEIGHTS] = ev.target.files[0] ?? null;
    showPicked();
  });
  $('upload-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    void upload();
  });
}
