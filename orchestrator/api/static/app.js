// Switchboard web chat: streams /v1/chat/completions and shows each stage as it happens.
// No build step and nothing from a CDN: plain ES modules, DOM APIs and fetch.
// The conversation (its id and what the page showed) is kept in localStorage, so a reload keeps it;
// the Stop button aborts the request, and the server stops the turn when the connection closes.

const KEY_STORAGE = "switchboard.apiKey";
const CONVERSATION_STORAGE = "switchboard.conversation";
const MAX_ATTACHMENTS = 4;
const MAX_KEPT_MESSAGES = 60; // what a reload shows (the server keeps the whole conversation)
const MAX_KEPT_IMAGE_CHARS = 150_000; // larger attached images are not kept for a reload
const CALL_LOG_LINES = 6; // progress messages kept under each call, so none flashes past unread

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  conversation: null, // the page shows one conversation, kept across reloads
  messages: [], // what the page showed, for a reload: {role: "user", text, images} | {role: "assistant", ...}
  attachments: [], // {url: what the API gets (data: URI or artifact URL), preview: what <img> shows}
  busy: false,
  controller: null, // the AbortController of the turn in flight
};
const blobCache = new Map(); // artifact URL -> Promise<blob: URL>

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// The key in the box is the one used, saved or not ("Save" only keeps it for the next visit).
function currentKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = currentKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

// -- API key & conversation -------------------------------------------------------------------
function showKeyStatus(text) {
  $("key-status").textContent = text;
}

$("api-key").value = state.key;
showKeyStatus(state.key ? "key saved" : "");
$("api-key").addEventListener("input", () => {
  const key = currentKey();
  showKeyStatus(key === state.key ? (key ? "key saved" : "") : key ? "used, not saved" : "");
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = currentKey();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  showKeyStatus(state.key ? "key saved" : "no key");
});

function setConversation(id) {
  if (id !== state.conversation) {
    state.conversation = id;
    saveConversation();
  }
  $("conversation").textContent = id || "new conversation";
}

function saveConversation() {
  const kept = { id: state.conversation, messages: state.messages.slice(-MAX_KEPT_MESSAGES) };
  try {
    localStorage.setItem(CONVERSATION_STORAGE, JSON.stringify(kept));
  } catch {
    // over the quota: keep the id and the text, drop the pictures
    kept.messages = kept.messages.map((m) => ({ ...m, images: [] }));
    try {
      localStorage.setItem(CONVERSATION_STORAGE, JSON.stringify(kept));
    } catch {
      localStorage.removeItem(CONVERSATION_STORAGE);
    }
  }
}

$("new-chat").addEventListener("click", () => {
  state.controller?.abort();
  state.messages = [];
  setConversation(null);
  localStorage.removeItem(CONVERSATION_STORAGE);
  $("log").replaceChildren();
});

// -- attachments: file picker, paste, drop, or "use" on an artifact --------------------------------
function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((a, i) => {
    const remove = el("button", { type: "button", class: "remove", title: "Remove", text: "×" });
    remove.addEventListener("click", () => {
      state.attachments.splice(i, 1);
      renderAttachments();
    });
    box.append(el("div", { class: "attachment" }, el("img", { src: a.preview, alt: "attached image" }), remove));
  });
}

function addAttachment(att) {
  if (state.attachments.length >= MAX_ATTACHMENTS) return;
  state.attachments.push(att);
  renderAttachments();
}

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => addAttachment({ url: reader.result, preview: reader.result });
    reader.readAsDataURL(file);
  }
}

$("file").addEventListener("change", (e) => {
  addFiles(e.target.files);
  e.target.value = "";
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.items || [])]
    .filter((item) => item.kind === "file" && item.type.startsWith("image/"))
    .map((item) => item.getAsFile());
  if (files.length) {
    e.preventDefault();
    addFiles(files);
  }
});
const composer = $("composer");
composer.addEventListener("dragover", (e) => {
  e.preventDefault();
  composer.classList.add("dragging");
});
composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
composer.addEventListener("drop", (e) => {
  e.preventDefault();
  composer.classList.remove("dragging");
  addFiles(e.dataTransfer.files);
});

// -- artifacts: fetched with the key (an <img src> cannot send it), shown as blob: URLs --------
function artifactBlobUrl(url) {
  if (!blobCache.has(url)) {
    const p = fetch(url, { headers: authHeaders() }).then(async (res) => {
      if (!res.ok) throw new Error(`${res.status} ${await errorMessage(res)}`);
      return URL.createObjectURL(await res.blob());
    });
    p.catch(() => blobCache.delete(url));
    blobCache.set(url, p);
  }
  return blobCache.get(url);
}

function artifactFigure(url, label) {
  const img = el("img", { class: "artifact", alt: label, "data-url": url });
  const use = el("button", { type: "button", class: "use", title: "Attach to the next message", text: "use" });
  const fig = el("figure", { class: "artifact" }, img, el("figcaption", { text: label }), use);
  artifactBlobUrl(url).then(
    (blobUrl) => {
      img.src = blobUrl;
      img.addEventListener("click", () => window.open(blobUrl, "_blank"));
      use.addEventListener("click", () => addAttachment({ url, preview: blobUrl }));
    },
    (err) => fig.append(el("span", { class: "error", text: `could not load: ${err.message}` })),
  );
  return fig;
}

function artifactLink(url, label) {
  const a = el("a", { href: "#", class: "artifact-link", text: label });
  a.addEventListener("click", async (e) => {
    e.preventDefault();
    try {
      window.open(await artifactBlobUrl(url), "_blank");
    } catch (err) {
      a.after(el("span", { class: "error", text: ` could not load: ${err.message}` }));
    }
  });
  return a;
}

// A tiny, safe markdown subset: text (as text), ![label](url) and [label](url). Artifact URLs
// become inline images or links that fetch with the key; any other link is plain text.
const LINK = /(!?)\[([^\]\n]*)\]\(([^)\s]+)\)/g;

function renderAnswer(container, text) {
  container.replaceChildren();
  let last = 0;
  for (const m of text.matchAll(LINK)) {
    container.append(document.createTextNode(text.slice(last, m.index)));
    const [whole, bang, label, url] = m;
    let isArtifact = false;
    try {
      isArtifact = new URL(url, location.href).pathname.includes("/v1/artifacts/");
    } catch {
      isArtifact = false;
    }
    if (!isArtifact) container.append(document.createTextNode(whole));
    else container.append(bang ? artifactFigure(url, label) : artifactLink(url, label));
    last = m.index + whole.length;
  }
  container.append(document.createTextNode(text.slice(last)));
}

// -- one exchange --------------------------------------------------------------------------------
// How an attachment is kept for a reload: an artifact by its URL (fetched again with the key), a small
// upload as its data: URI, a large one not at all.
function keptImage(a) {
  if (!a.url.startsWith("data:")) return { url: a.url };
  return a.url.length <= MAX_KEPT_IMAGE_CHARS ? { data: a.url } : null;
}

function userBubble(text, images) {
  const bubble = el("div", { class: "message user" });
  if (text) bubble.append(el("div", { class: "text", text }));
  for (const image of images) {
    const thumb = el("img", { class: "thumb", alt: "attached image" });
    if (image.preview || image.data) thumb.src = image.preview || image.data;
    else artifactBlobUrl(image.url).then((blobUrl) => { thumb.src = blobUrl; }, () => {});
    bubble.append(thumb);
  }
  $("log").append(bubble);
}

class AssistantBubble {
  constructor() {
    this.stages = el("ol", { class: "stages" });
    this.planText = el("pre", { class: "plan" });
    this.plan = el("details", { class: "plan", hidden: "" }, el("summary", { text: "plan" }), this.planText);
    this.answer = el("div", { class: "answer" });
    this.node = el("div", { class: "message assistant", "data-state": "running" }, this.stages, this.plan, this.answer);
    this.text = "";
    this.calls = new Map(); // call id -> {row, label, bar, log, last: the latest event, lines}
    this.stageRows = new Map();
    this.record = { role: "assistant", stages: [], calls: {}, plan: "", text: "", errors: [], stopped: false };
    $("log").append(this.node);
  }

  // A bubble as it was shown before a reload.
  static restore(record) {
    const bubble = new AssistantBubble();
    for (const name of record.stages || []) bubble.stage(name);
    for (const { last, lines } of Object.values(record.calls || {})) {
      bubble.call(last);
      bubble.callLines(last.call_id, Array.isArray(lines) ? lines : []);
    }
    if (record.plan) bubble.addPlan(record.plan);
    if (record.text) bubble.addContent(record.text);
    for (const message of record.errors || []) bubble.error(message);
    if (record.stopped) bubble.stopped();
    bubble.finish();
    return bubble;
  }

  stage(name) {
    this.record.stages.push(name);
    for (const row of this.stageRows.values()) row.classList.replace("active", "finished");
    const labels = { planning: "planning", executing: "running the experts", answering: "answering", done: "done" };
    const row = el("li", { class: `stage ${name === "done" ? "finished" : "active"}`, "data-stage": name,
      text: labels[name] || name });
    this.stageRows.set(name, row);
    this.stages.append(row);
  }

  // One row per call: its latest state, a progress bar that stays until the call is done (filled when
  // done), and its recent progress messages as lines, so a fast sequence is not overwritten unread.
  call(ev) {
    let entry = this.calls.get(ev.call_id);
    if (!entry) {
      const row = el("li", { class: "call", "data-call": ev.call_id });
      entry = { row, label: el("span", { class: "label" }), bar: el("progress", { max: "1" }),
        log: el("ul", { class: "call-log" }), lines: [] };
      row.append(entry.label, entry.bar, entry.log);
      this.calls.set(ev.call_id, entry);
      this.stages.append(row);
    }
    const pct = ev.stage === "progress" && ev.progress != null ? ` ${Math.round(ev.progress * 100)}%` : "";
    const msg = ev.message ? ` — ${ev.message}` : "";
    entry.row.dataset.stage = ev.stage;
    entry.row.className = `call ${ev.stage}`;
    entry.label.textContent = `${ev.call_id} · ${ev.expert}: ${ev.stage}${pct}${msg}`;
    if (ev.progress != null) entry.bar.value = ev.progress;
    const ended = ["done", "failed", "invalid", "skipped"].includes(ev.stage);
    if (ended) {
      entry.bar.value = ev.stage === "done" ? 1 : entry.bar.value || 0;
      entry.bar.dataset.state = ev.stage;
    }
    if (ev.stage === "progress" && ev.message) {
      entry.lines = [...entry.lines, `${pct.trim() || "…"} ${ev.message}`].slice(-CALL_LOG_LINES);
      entry.log.replaceChildren(...entry.lines.map((line) => el("li", { text: line })));
    }
    if (ev.stage !== "progress" || !this.record.calls[ev.call_id]) {
      this.record.calls[ev.call_id] = { last: { call_id: ev.call_id, expert: ev.expert, stage: ev.stage,
        progress: ev.progress ?? null, message: ev.message || "" }, lines: entry.lines };
    }
    this.record.calls[ev.call_id].lines = entry.lines;
  }

  callLines(callId, lines) {
    const entry = this.calls.get(callId);
    entry.lines = lines.slice(-CALL_LOG_LINES).map(String);
    entry.log.replaceChildren(...entry.lines.map((line) => el("li", { text: line })));
    this.record.calls[callId].lines = entry.lines;
  }

  addPlan(text) {
    this.plan.hidden = false;
    this.planText.textContent += text;
    this.record.plan += text;
  }

  addContent(text) {
    this.text += text;
    this.record.text = this.text;
    renderAnswer(this.answer, this.text);
  }

  toolCalls(calls) {
    // Calls that never ran (invalid) have no stage events: show them from the final summary.
    for (const tc of calls) {
      if (!this.calls.has(tc.id) || tc.status === "invalid" || tc.status === "skipped") {
        this.call({ call_id: tc.id, expert: tc.function.name, stage: tc.status, message: tc.error || tc.summary || "" });
      }
    }
  }

  error(message) {
    this.record.errors.push(message);
    this.node.append(el("div", { class: "error", text: message }));
  }

  stopped() {
    this.record.stopped = true;
    this.node.append(el("div", { class: "stopped muted", text: "stopped" }));
  }

  finish() {
    for (const row of this.stageRows.values()) row.classList.replace("active", "finished");
    this.node.dataset.state = "done";
  }
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body?.error?.message || res.statusText;
  } catch {
    return res.statusText;
  }
}

function handleChunk(bubble, chunk) {
  if (chunk.error) {
    bubble.error(chunk.error.message || "the turn failed");
    return;
  }
  if (chunk.conversation_id) setConversation(chunk.conversation_id);
  const ev = chunk.event;
  if (ev?.type === "stage") bubble.stage(ev.stage);
  else if (ev?.type === "call") bubble.call(ev);
  else if (ev?.type === "plan") bubble.addPlan(ev.text);
  const delta = chunk.choices?.[0]?.delta || {};
  if (delta.content) bubble.addContent(delta.content);
  if (delta.tool_calls) bubble.toolCalls(delta.tool_calls);
}

async function send(text, attachments) {
  const content = [];
  if (text) content.push({ type: "text", text });
  for (const a of attachments) content.push({ type: "image_url", image_url: { url: a.url } });
  const body = { model: "switchboard", stream: true, messages: [{ role: "user", content }] };
  if (state.conversation) body.conversation_id = state.conversation;

  userBubble(text, attachments);
  state.messages.push({ role: "user", text, images: attachments.map(keptImage).filter(Boolean) });
  const bubble = new AssistantBubble();
  scrollDown();
  const controller = new AbortController();
  state.controller = controller;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!res.ok) {
      const msg = await errorMessage(res);
      bubble.error(res.status === 401 ? `${msg} — enter the API key above.` : msg);
      if (res.status === 401) $("api-key").focus();
      if (res.status === 404 && state.conversation && /conversation/.test(msg)) setConversation(null);
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          handleChunk(bubble, JSON.parse(data));
        }
        scrollDown();
      }
    }
  } catch (err) {
    if (err.name === "AbortError") bubble.stopped();
    else bubble.error(`connection failed: ${err.message}`);
  } finally {
    if (state.controller === controller) state.controller = null;
    bubble.finish();
    state.messages.push(bubble.record);
    saveConversation();
    scrollDown();
  }
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (state.busy || (!text && !state.attachments.length)) return;
  const attachments = state.attachments.splice(0);
  renderAttachments();
  $("message").value = "";
  state.busy = true;
  $("send").disabled = true;
  $("stop").hidden = false;
  try {
    await send(text, attachments);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("stop").hidden = true;
    $("message").focus();
  }
});

$("stop").addEventListener("click", () => state.controller?.abort());

// -- a reload shows the conversation as it was ----------------------------------------------------
function restoreConversation() {
  let kept = null;
  try {
    kept = JSON.parse(localStorage.getItem(CONVERSATION_STORAGE) || "null");
  } catch {
    kept = null;
  }
  if (!kept || typeof kept !== "object") return;
  state.messages = Array.isArray(kept.messages) ? kept.messages : [];
  setConversation(typeof kept.id === "string" ? kept.id : null);
  if (state.messages.length) $("log").replaceChildren();
  for (const m of state.messages) {
    if (m.role === "user") userBubble(m.text || "", m.images || []);
    else if (m.role === "assistant") AssistantBubble.restore(m);
  }
  scrollDown();
}

restoreConversation();

$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
