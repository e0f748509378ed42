// The playground's entry module: tabs, the API key prompt, the model list shared by every view.
import { ApiError, hasApiKey, setApiKey } from './api.js';
import { initAdapters } from './adapters.js';
import { initChat } from './chat.js';
import { initCompare } from './compare.js';
import { startMetrics } from './metrics.js';
import { $, refreshModels } from './shared.js';

function showView(name) {
  for (const b of document.querySelectorAll('#tabs button')) b.classList.toggle('active', b.dataset.view === name);
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `${name}-view`;
  $('settings').hidden = name === 'adapters';
}

function askForKey(message) {
  $('auth').hidden = false;
  $('layout').hidden = true;
  $('tabs').hidden = true;
  $('auth-error').textContent = message ?? '';
  $('auth-key').focus();
}

/** Loads the model list; a 401 asks for the key instead. */
async function connect() {
  try {
    await refreshModels();
    $('auth').hidden = true;
    $('layout').hidden = false;
    $('tabs').hidden = false;
    $('key-button').hidden = !hasApiKey();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) askForKey(hasApiKey() ? e.message : '');
    else $('chat-error').textContent = `cannot list models: ${e.message}`;
  }
}

function init() {
  for (const b of document.querySelectorAll('#tabs button')) b.addEventListener('click', () => showView(b.dataset.view));
  $('auth').addEventListener('submit', (ev) => {
    ev.preventDefault();
    setApiKey($('auth-key').value.trim());
    $('auth-key').value = '';
    void connect();
  });
  $('key-button').addEventListener('click', () => {
    setApiKey(null);
    askForKey('');
  });
  initChat();
  initCompare();
  initAdapters();
  startMetrics();
  showView('chat');
  void connect();
}

init();
