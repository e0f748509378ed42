// Chat with one model (the base or an adapter), streamed: chat mode keeps the conversation and
// sends it whole each turn; completion mode continues the text typed in.
import { StreamTimer, chunkText, endpointOf, generationBody, stream } from './api.js';
import { $, onModels, settings } from './shared.js';

const history = []; // chat turns: { role, content }
let controller = null;

/** Refills a <select> with the base model and the adapters, keeping the choice when it still exists. */
export function fillModelSelect(select, m) {
  const keep = select.value;
  select.replaceChildren();
  const add = (id, label) => select.append(new Option(label, id));
  if (m.base) add(m.base, `${m.base} (base)`);
  for (const id of m.adapters) add(id, id);
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

function bubble(cls, who) {
  const el = document.createElement('div');
  el.className = `msg ${cls}`;
  const head = document.createElement('div');
  head.className = 'who';
  head.textContent = who;
  const body = document.createElement('div');
  body.className = 'text';
  el.append(head, body);
  $('transcript').append(el);
  return body;
}

function busy(on) {
  $('chat-send').disabled = on;
  $('chat-stop').disabled = !on;
}

async function send() {
  const text = $('chat-input').value;
  if (!text.trim() || controller) return;
  const s = settings();
  const model = $('chat-model').value;
  $('chat-error').textContent = '';
  let out;
  let input;
  if (s.mode === 'chat') {
    history.push({ role: 'user', content: text });
    bubble('user', 'you').textContent = text;
    out = bubble('assistant', model);
    input = history.slice();
  } else {
    const body = bubble('completion', `${model} · completion`);
    const prompt = document.createElement('span');
    prompt.className = 'prompt';
    prompt.textContent = text;
    out = document.createElement('span');
    out.className = 'gen';
    body.append(prompt, out);
    input = text;
  }
  $('chat-input').value = '';
  out.classList.add('streaming');
  const timer = new StreamTimer();
  const show = () => ($('chat-stats').textContent = timer.summary());
  controller = new AbortController();
  busy(true);
  try {
    await stream(endpointOf(s.mode), generationBody(s, model, input), (chunk) => {
      timer.chunk(chunk);
      const t = chunkText(chunk);
      if (t) {
        out.textContent += t;
        $('transcript').scrollTop = $('transcript').scrollHeight;
      }
      show();
    }, controller.signal);
  } catch (e) {
    if (e.name !== 'AbortError') $('chat-error').textContent = e.message;
  } finally {
    if (s.mode === 'chat') {
      if (out.textContent) history.push({ role: 'assistant', content: out.textContent });
      else history.pop(); // nothing came back: the turn is not part of the conversation
    }
    out.classList.remove('streaming');
    show();
    controller = null;
    busy(false);
  }
}

export function initChat() {
  onModels((m) => fillModelSelect($('chat-model'), m));
  $('chat-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    void send();
  });
  $('chat-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      void send();
    }
  });
  $('chat-stop').addEventListener('click', () => controller?.abort());
  $('chat-clear').addEventListener('click', () => {
    controller?.abort();
    history.length = 0;
    $('transcript').replaceChildren();
    $('chat-stats').textContent = '';
    $('chat-error').textContent = '';
  });
}
