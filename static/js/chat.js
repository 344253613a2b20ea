// The chat page. One websocket to /ws/chat/ carries every action (send, stop, regenerate,
// edit) and streams the reply back as token frames, then a done frame with the reply's stats;
// chat/consumers.py documents the frames. The server is the source of truth: whenever an
// action fails or the socket drops, the conversation is re-read from the JSON endpoint
// instead of guessing what the server kept.
//
// The selected model decides the max tokens field's range (what its context allows) and, for a
// new conversation, the mode: a base model gets Completion mode (raw text continuation, no
// chat template) by default. A conversation's mode is fixed once it exists; its system prompt
// is sent with every action and stored by the server. When older turns had to be left out to
// fit the model's context, a marker line shows where the model's view of the latest reply
// began (the server stores it on the reply, so it survives a reload).
//
// Model output is untrusted text. It is rendered as markdown by marked and then sanitized by
// DOMPurify before it reaches the DOM -- for stored messages and for every streamed update
// alike, both through renderMarkdown() -- so HTML in a reply cannot run script. User
// messages and tool output are shown as plain text.
import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/core.min.js";
import python from "../vendor/highlight/languages/python.min.js";
import javascript from "../vendor/highlight/languages/javascript.min.js";
import bash from "../vendor/highlight/languages/bash.min.js";
import { addFeedback, initDatasetControls } from "./feedback.js";

hljs.registerLanguage("python", python);
hljs.registerLanguage("javascript", javascript);
hljs.registerLanguage("bash", bash);

const state = JSON.parse(document.getElementById("chat-state").textContent);
const limits = state.limits;
const $ = (id) => document.getElementById(id);
const thread = $("thread");
const prompt = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const picker = $("checkpoint");
const controls = { temperature: $("temperature"), top_k: $("top_k"), max_tokens: $("max_tokens") };
const modeSelect = $("mode");
const systemInput = $("system");
// Keyed by the picker's value: a checkpoint's id, or "run-<id>" to follow a run (its newest
// checkpoint answers each message; the reply's stats name the step that answered).
const models = new Map(state.checkpoints.map((c) => [String(c.id), c]));
const PROMPT_HINTS = {
  chat: prompt.placeholder,
  completion: "Text for the model to continue, as it is (no chat template). Enter sends.",
};

let conversationId = state.conversation ? state.conversation.id : null;
let conversationMode = state.conversation ? state.conversation.mode : null; // null: not yet
let defaultMaxTokens = Number(controls.max_tokens.value);
let pending = null; // the action in progress: {kind, replyEl, parts, started, restore}
let socket = null;

// ---- rendering --------------------------------------------------------------------------

const markdown = new Marked({ gfm: true, breaks: true });
const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
  RETURN_DOM_FRAGMENT: true,
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), PURIFY);
  for (const code of fragment.querySelectorAll("pre code")) {
    const language = [...code.classList].find((c) => c.startsWith("language-"));
    // Only three languages are shipped; leave others plain rather than guess wrongly.
    if (language && !hljs.getLanguage(language.slice(9))) continue;
    hljs.highlightElement(code);
  }
  return fragment;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function toolBlock(part) {
  const isCall = part.type === "python";
  const figure = el("figure", isCall ? "tool tool-call" : "tool tool-output");
  figure.append(el("figcaption", null, isCall ? "python" : "output"));
  const code = el("code", isCall ? "language-python" : null, part.text);
  if (isCall) hljs.highlightElement(code);
  const pre = el("pre");
  pre.append(code);
  figure.append(pre);
  return figure;
}

function renderParts(body, parts) {
  body.replaceChildren();
  for (const part of parts) {
    body.append(part.type === "text" ? renderMarkdown(part.text) : toolBlock(part));
  }
}

function partsOf(message) {
  return message.parts && message.parts.length
    ? message.parts
    : [{ type: "text", text: message.content || "" }];
}

function statsText(m) {
  const bits = [];
  if (m.completion_tokens != null) bits.push(`${m.completion_tokens} tokens`);
  if (m.tokens_per_second != null) bits.push(`${m.tokens_per_second.toFixed(1)} tok/s`);
  if (m.time_to_first_token != null) {
    bits.push(`first token ${m.time_to_first_token.toFixed(2)} s`);
  }
  if (m.finish_reason === "stopped") bits.push("stopped");
  if (m.finish_reason === "length") bits.push("hit max tokens");
  if (m.step != null) bits.push(`step ${m.step}`);
  return bits.join(" · ");
}

function showStats(article, message) {
  const stats = article.querySelector(".stats");
  stats.textContent = statsText(message);
  stats.dataset.completionTokens = message.completion_tokens ?? "";
  stats.dataset.finishReason = message.finish_reason || "";
}

function mode() {
  return conversationMode || modeSelect.value;
}

function messageElement(message) {
  const article = el("article", `msg ${message.role}`);
  article.dataset.role = message.role;
  if (message.id) article.dataset.id = message.id;
  const body = el("div", "body");
  article.append(body);
  const footer = el("div", "msg-footer");
  if (message.role === "user") {
    body.textContent = message.content;
    const edit = el("button", "link edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => openEditor(article));
    footer.append(edit);
  } else {
    if (mode() === "completion") {
      article.classList.add("completion");
      body.textContent = message.content || "";
    } else {
      renderParts(body, partsOf(message));
    }
    footer.append(el("span", "stats"));
    const again = el("button", "link regenerate", "Regenerate");
    again.type = "button";
    again.addEventListener("click", regenerate);
    footer.append(again);
  }
  article.append(footer);
  if (message.role === "assistant") {
    showStats(article, message);
    addFeedback(article, message, (replyEl, text) => redraw(replyEl, [{ type: "text", text }]));
  }
  return article;
}

function renderThread(messages) {
  thread.replaceChildren(...messages.map(messageElement));
  const replies = messages.filter((m) => m.role === "assistant");
  showContextStart(replies.length ? replies[replies.length - 1].context_start : null);
  refreshActions();
  scrollToEnd();
}

// The marker line before the first message the model saw (none when it saw them all).
function showContextStart(messageId) {
  thread.querySelectorAll(".context-start").forEach((marker) => marker.remove());
  const first = messageId ? thread.querySelector(`.msg[data-id="${messageId}"]`) : null;
  if (!first) return;
  const marker = el("div", "context-start", "the model sees from here");
  marker.setAttribute("role", "separator");
  marker.title = "Older messages no longer fit this model's context: the reply was written without them.";
  first.before(marker);
}

function note(text) {
  const div = el("div", "note", text);
  thread.append(div);
  scrollToEnd();
}

function atBottom() {
  return thread.scrollHeight - thread.scrollTop - thread.clientHeight < 60;
}

function scrollToEnd() {
  thread.scrollTop = thread.scrollHeight;
}

// Redraw a reply; follow it down only if the reader was at the bottom (not reading above).
function redraw(replyEl, parts) {
  const follow = atBottom();
  const body = replyEl.querySelector(".body");
  if (replyEl.classList.contains("completion")) body.textContent = parts.map((p) => p.text).join("");
  else renderParts(body, parts);
  if (follow) scrollToEnd();
}

// Regenerate only on the last reply; nothing can be changed while a reply streams.
function refreshActions() {
  const busy = pending !== null;
  const replies = thread.querySelectorAll(".msg.assistant");
  thread.querySelectorAll(".msg .regenerate").forEach((button) => {
    button.hidden = busy || button.closest(".msg") !== replies[replies.length - 1];
  });
  thread.querySelectorAll(".msg .edit").forEach((button) => {
    button.hidden = busy || !button.closest(".msg").dataset.id;
  });
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  sendButton.disabled = !picker.value || !isOpen();
}

// ---- errors ----------------------------------------------------------------------------

const ERROR_SLOTS = ["checkpoint", "mode", "system", "temperature", "top_k", "max_tokens", "content"];
const ERROR_CONTROLS = { content: prompt, checkpoint: picker, mode: modeSelect, system: systemInput };

function showError(field, message) {
  const named = field === "run" ? "checkpoint" : field; // a followed run is picked there too
  const slot = ERROR_SLOTS.includes(named) ? named : "content";
  document.querySelector(`[data-error-for="${slot}"]`).textContent = message;
  if (slot === "system") $("system-prompt").open = true;
  (ERROR_CONTROLS[slot] || controls[slot]).setAttribute("aria-invalid", "true");
}

function clearErrors() {
  document.querySelectorAll("[data-error-for]").forEach((slot) => (slot.textContent = ""));
  document.querySelectorAll("[aria-invalid]").forEach((c) => c.removeAttribute("aria-invalid"));
}

// ---- actions ---------------------------------------------------------------------------

// The sampling fields, and the conversation's settings: its mode and system prompt.
function settings() {
  const values = { mode: mode() };
  for (const [name, input] of Object.entries(controls)) {
    if (input.value.trim() !== "") values[name] = Number(input.value);
  }
  if (mode() === "chat") values.system = systemInput.value;
  return values;
}

// ---- the model and the mode ----------------------------------------------------------------

// Show the selected model's card, fit max tokens to its context and, for a new
// conversation, pick the mode its stage suits.
function applyModel() {
  const model = models.get(picker.value);
  document.querySelectorAll(".model-card").forEach((card) => {
    card.hidden = !model || card.dataset.checkpoint !== String(model.id);
  });
  if (!model) return;
  const input = controls.max_tokens;
  const context = model.context;
  const max = context ? Math.max(1, Math.min(limits.max_max_tokens, context - 1)) : limits.max_max_tokens;
  const wanted = context ? Math.max(1, Math.min(limits.default_max_tokens, Math.floor(context / 2))) : limits.default_max_tokens;
  const value = Number(input.value);
  input.max = String(max);
  if (!input.value || value === defaultMaxTokens || value > max) input.value = String(wanted);
  defaultMaxTokens = wanted;
  if (conversationMode === null) modeSelect.value = model.stage === "base" ? "completion" : "chat";
  applyMode();
}

function applyMode() {
  modeSelect.disabled = conversationMode !== null;
  modeSelect.title = conversationMode !== null
    ? "A conversation keeps its mode: start a new one to switch"
    : "Chat uses the chat template; Completion continues your text as it is (for base models)";
  $("system-prompt").hidden = mode() !== "chat";
  prompt.placeholder = PROMPT_HINTS[mode()];
}

function openedConversation(conversation) {
  conversationMode = conversation ? conversation.mode : null;
  if (conversation) {
    modeSelect.value = conversation.mode;
    systemInput.value = conversation.system || "";
  }
  applyMode();
}

// The frame's model fields: {checkpoint: id}, or {run: id} for a "follow run" entry.
function modelFields() {
  const model = models.get(picker.value);
  if (model && model.run) return { run: model.run };
  return { checkpoint: picker.value ? Number(picker.value) : null };
}

// Send a frame that starts a reply, and show the reply's bubble with a typing indicator.
function startReply(kind, frame, restore) {
  if (!isOpen()) {
    showError(null, "not connected to the server; retrying…");
    return false;
  }
  clearErrors();
  const replyEl = messageElement({ role: "assistant", content: "" });
  replyEl.classList.add("streaming");
  replyEl.append(typingIndicator());
  thread.append(replyEl);
  pending = { kind, replyEl, parts: [], started: false, restore, drawn: false };
  socket.send(JSON.stringify({ ...frame, ...settings() }));
  refreshActions();
  scrollToEnd();
  return true;
}

function typingIndicator() {
  const dots = el("span", "typing");
  dots.setAttribute("aria-label", "the model is writing");
  dots.append(el("i"), el("i"), el("i"));
  return dots;
}

function send(text) {
  const userEl = messageElement({ role: "user", content: text });
  thread.append(userEl);
  prompt.value = "";
  const frame = { type: "send", conversation: conversationId, ...modelFields() };
  if (!startReply("send", { ...frame, content: text }, { userEl, text })) {
    userEl.remove();
    prompt.value = text;
  }
}

function regenerate() {
  const replies = thread.querySelectorAll(".msg.assistant");
  const last = replies[replies.length - 1];
  const frame = { type: "regenerate", conversation: conversationId, ...modelFields() };
  if (last) last.remove();
  if (!startReply("regenerate", frame, {}) && last) thread.append(last);
}

function openEditor(article) {
  const body = article.querySelector(".body");
  if (pending || body.querySelector(".editor")) return;
  const original = body.textContent;
  const editor = el("textarea", "editor");
  editor.value = original;
  editor.rows = Math.min(10, original.split("\n").length + 1);
  const save = el("button", null, "Save & regenerate");
  const cancel = el("button", "link", "Cancel");
  save.type = cancel.type = "button";
  const close = () => body.replaceChildren(document.createTextNode(original));
  cancel.addEventListener("click", close);
  save.addEventListener("click", () => submitEdit(article, editor.value));
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Escape") close();
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitEdit(article, editor.value);
    }
  });
  const buttons = el("div", "editor-actions");
  buttons.append(save, cancel);
  body.replaceChildren(editor, buttons);
  editor.focus();
}

// The conversation ends at the edited message: what came after it goes, a new reply follows.
function submitEdit(article, content) {
  if (!content.trim()) return;
  while (article.nextElementSibling) article.nextElementSibling.remove();
  article.querySelector(".body").textContent = content;
  const frame = {
    type: "edit",
    conversation: conversationId,
    message: Number(article.dataset.id),
    ...modelFields(),
    content,
  };
  if (!startReply("edit", frame, {})) resync();
}

// ---- frames from the server --------------------------------------------------------------

function onFrame(frame) {
  if (frame.type === "started") onStarted(frame);
  else if (frame.type === "token") onToken(frame);
  else if (frame.type === "done") onDone(frame);
  else if (frame.type === "error") onError(frame);
}

function onStarted(frame) {
  if (!pending) return;
  pending.started = true;
  if (pending.kind === "send") pending.restore.userEl.dataset.id = frame.message;
  showContextStart(frame.context_start);
  if (conversationId !== frame.conversation) {
    conversationId = frame.conversation;
    conversationMode = mode();
    applyMode();
    history.replaceState(null, "", `${state.urls.page}${conversationId}/`);
    refreshConversationList();
  }
}

function onToken(frame) {
  if (!pending) return;
  const last = pending.parts[pending.parts.length - 1];
  if (last && last.type === frame.part) last.text += frame.text;
  else pending.parts.push({ type: frame.part, text: frame.text });
  // Chunks come up to 50 times a second: draw at most once per frame.
  if (!pending.drawn) {
    pending.drawn = true;
    const current = pending;
    requestAnimationFrame(() => {
      current.drawn = false;
      if (pending !== current) return;
      redraw(current.replyEl, current.parts);
    });
  }
}

function onDone(frame) {
  if (!pending) return;
  const { replyEl } = pending;
  pending = null;
  replyEl.classList.remove("streaming");
  replyEl.querySelector(".typing")?.remove();
  replyEl.dataset.id = frame.message;
  replyEl.dataset.text = frame.content;
  redraw(replyEl, partsOf(frame));
  showContextStart(frame.context_start);
  showStats(replyEl, frame);
  refreshActions();
  refreshConversationList();
  prompt.focus();
}

function onError(frame) {
  showError(frame.field, frame.message);
  if (!pending) return;
  const failed = pending;
  pending = null;
  failed.replyEl.remove();
  if (failed.kind === "send") {
    failed.restore.userEl.remove();
    if (!prompt.value) prompt.value = failed.restore.text;
  }
  refreshActions();
  // Regenerate and edit changed the page before the server agreed; a send that started
  // saved its message and then removed it again. Show what the server kept.
  if (failed.kind !== "send" || failed.started) resync();
}

// ---- the server's copy -------------------------------------------------------------------

async function resync() {
  if (conversationId === null) return renderThread([]);
  const response = await fetch(`${state.urls.conversations}${conversationId}/`, {
    headers: { Accept: "application/json" },
  });
  if (response.status === 404) {
    // A first message that got no reply leaves no conversation behind.
    conversationId = null;
    openedConversation(null);
    history.replaceState(null, "", state.urls.page);
    renderThread([]);
  } else if (response.ok) {
    const conversation = await response.json();
    openedConversation(conversation);
    renderThread(conversation.messages);
  }
  refreshConversationList();
}

async function refreshConversationList() {
  const response = await fetch(state.urls.conversations, {
    headers: { Accept: "application/json" },
  });
  if (!response.ok) return;
  const { conversations } = await response.json();
  const nav = $("conversation-list");
  nav.replaceChildren(
    ...conversations.map((c) => {
      const link = el("a", c.id === conversationId ? "active" : null, c.title);
      link.href = c.url;
      link.dataset.id = c.id;
      return link;
    }),
  );
}

// ---- commands typed in the composer --------------------------------------------------------

const COMMANDS = {
  "/temperature": {
    usage: "/temperature X",
    help: `sampling temperature, ${limits.min_temperature} to ${limits.max_temperature}`,
    run: (arg) => setControl("temperature", arg, limits.min_temperature, limits.max_temperature),
  },
  "/topk": {
    usage: "/topk N",
    help: `sample from the N likeliest tokens, 0 to ${limits.max_top_k} (0 = all)`,
    run: (arg) => setControl("top_k", arg, 0, limits.max_top_k, true),
  },
  "/clear": { usage: "/clear", help: "start a new conversation", run: () => newConversation() },
  "/help": { usage: "/help", help: "list these commands", run: () => help() },
};

function runCommand(text) {
  const [name, ...args] = text.trim().split(/\s+/);
  const command = COMMANDS[name.toLowerCase()];
  if (!command) {
    showError("content", `unknown command ${name}: /help lists the commands`);
    return;
  }
  if (command.run(args.join(" ")) !== false) prompt.value = "";
}

function setControl(name, arg, low, high, integer = false) {
  const value = Number(arg);
  const ok = arg !== "" && Number.isFinite(value) && (!integer || Number.isInteger(value));
  if (!ok || value < low || value > high) {
    const kind = integer ? "a whole number" : "a number";
    showError(name, `${name} must be ${kind} between ${low} and ${high}`);
    return false;
  }
  controls[name].value = String(value);
  note(`${name} set to ${value}`);
  return true;
}

function newConversation() {
  if (pending) return false;
  conversationId = null;
  openedConversation(null);
  applyModel();
  history.pushState(null, "", state.urls.page);
  renderThread([]);
  document.querySelectorAll("#conversation-list a.active").forEach((a) => a.classList.remove("active"));
  note("New conversation.");
  return true;
}

function help() {
  const lines = Object.values(COMMANDS).map((c) => `${c.usage} — ${c.help}`);
  lines.push("Enter sends, Shift+Enter adds a new line. Edit a message of yours to branch from it.");
  note(lines.join("\n"));
}

// ---- the socket ----------------------------------------------------------------------------

function isOpen() {
  return socket !== null && socket.readyState === WebSocket.OPEN;
}

function setStatus(text, ok) {
  const status = $("socket-status");
  status.textContent = text;
  status.className = `socket-status ${ok ? "ok" : "bad"}`;
}

// A dropped socket stops the reply on the server, which saves what was generated; once
// connected again, show that.
function connect(retry = 500, dropped = false) {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(scheme + location.host + state.urls.socket);
  socket.addEventListener("open", () => {
    setStatus("connected", true);
    refreshActions();
    if (dropped) resync();
    retry = 500;
  });
  socket.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    const interrupted = pending !== null;
    if (interrupted) {
      pending.replyEl.querySelector(".typing")?.remove();
      pending.replyEl.classList.remove("streaming");
      pending = null;
    }
    refreshActions();
    if (event.code === 4401) {
      setStatus("logged out", false);
      showError(null, "you are logged out: log in again to chat");
      return;
    }
    setStatus("reconnecting…", false);
    if (interrupted) showError(null, "the connection dropped; reconnecting…");
    setTimeout(() => connect(Math.min(retry * 2, 10000), true), retry);
  });
}

// ---- wiring --------------------------------------------------------------------------------

function submit() {
  const text = prompt.value;
  if (!text.trim() || pending) return;
  clearErrors();
  if (text.trimStart().startsWith("/")) runCommand(text);
  else if (!picker.value) showError("checkpoint", "choose a checkpoint to chat with");
  else send(text);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
stopButton.addEventListener("click", () => {
  if (pending && isOpen()) socket.send(JSON.stringify({ type: "stop" }));
});
$("new-chat").addEventListener("click", (event) => {
  if (newConversation()) event.preventDefault();
});
window.addEventListener("popstate", () => location.reload());
picker.addEventListener("change", applyModel);
modeSelect.addEventListener("change", applyMode);

openedConversation(state.conversation);
applyModel();
if (state.conversation) renderThread(state.conversation.messages);
refreshActions();
initDatasetControls(() => conversationId);
connect();
prompt.focus();
