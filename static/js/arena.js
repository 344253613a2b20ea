// The arena page: send one prompt over /ws/arena/, stream both blind replies side by side,
// then vote through the REST API, whose answer names the two checkpoints (the reveal).
"use strict";

const state = JSON.parse(document.getElementById("arena-state").textContent);
const $ = (id) => document.getElementById(id);
const SIDES = ["a", "b"];
let socket = null;
let battle = null; // the id of the battle on screen

function csrfToken() {
  return document.querySelector("input[name=csrfmiddlewaretoken]").value;
}

function setStatus(text) {
  $("socket-status").textContent = text;
}

function clearErrors() {
  $("arena-error").textContent = "";
  document.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
}

function showError(field, message) {
  const slot = field && document.querySelector(`.field-error[data-error-for="${field}"]`);
  (slot || $("arena-error")).textContent = message;
}

function generating(on) {
  $("start").disabled = on;
  $("stop").hidden = !on;
  SIDES.forEach((side) => $(`side-${side}`).classList.toggle("streaming", on));
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function startBattle(event) {
  event.preventDefault();
  clearErrors();
  const picks = [...document.querySelectorAll(".arena-checkpoint")].map(
    (select) => (select.value ? Number(select.value) : null));
  const frame = {
    type: "battle",
    content: $("prompt").value,
    checkpoints: picks,
    temperature: numberOrNull("temperature"),
    top_k: numberOrNull("top_k"),
    max_tokens: numberOrNull("max_tokens"),
  };
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    showError(null, "not connected yet; try again in a moment");
    return;
  }
  socket.send(JSON.stringify(frame));
}

function onFrame(frame) {
  if (frame.type === "started") {
    battle = frame.battle;
    $("arena-sides").hidden = false;
    $("arena-vote").hidden = true;
    $("arena-result").textContent = "";
    SIDES.forEach((side) => {
      $(`reply-${side}`).textContent = "";
      $(`stats-${side}`).textContent = "";
      $(`name-${side}`).textContent = "";
      $(`side-${side}`).classList.remove("winner");
    });
    document.querySelectorAll("#arena-vote button").forEach((b) => { b.disabled = false; });
    generating(true);
  } else if (frame.type === "token") {
    $(`reply-${frame.side}`).append(document.createTextNode(frame.text));
  } else if (frame.type === "ready") {
    generating(false);
    SIDES.forEach((side) => {
      const s = frame[side];
      const speed = s.tokens_per_second ? `, ${s.tokens_per_second.toFixed(1)} tok/s` : "";
      const stats = $(`stats-${side}`);
      stats.textContent = `${s.completion_tokens} tokens${speed} (${s.finish_reason})`;
      stats.dataset.finishReason = s.finish_reason;
    });
    $("arena-vote").hidden = false;
  } else if (frame.type === "error") {
    generating(false);
    showError(frame.field, frame.message);
  }
}

async function vote(outcome) {
  if (battle === null) return;
  document.querySelectorAll("#arena-vote button").forEach((b) => { b.disabled = true; });
  const response = await fetch(`${state.urls.battles}${battle}/vote/`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
    body: JSON.stringify({ outcome }),
    credentials: "same-origin",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    showError(null, body.detail || JSON.stringify(body));
    return;
  }
  reveal(body.reveal);
}

function reveal(result) {
  SIDES.forEach((side) => {
    $(`name-${side}`).textContent = `= ${result[side].label}`;
    $(`side-${side}`).classList.toggle("winner", result.outcome === side);
  });
  const said = { a: "A is better", b: "B is better", tie: "a tie", both_bad: "both are bad" };
  $("arena-result").textContent = `Your vote: ${said[result.outcome]}. Thanks!`;
  $("arena-result").dataset.revealed = "1";
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(scheme + location.host + state.urls.socket);
  socket.addEventListener("open", () => setStatus("connected"));
  socket.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
  socket.addEventListener("close", () => {
    setStatus("reconnecting…");
    generating(false);
    setTimeout(connect, 1000);
  });
}

$("arena-form").addEventListener("submit", startBattle);
$("stop").addEventListener("click", () => socket && socket.send(JSON.stringify({ type: "stop" })));
document.querySelectorAll("#arena-vote button").forEach((button) => {
  button.addEventListener("click", () => vote(button.dataset.outcome));
});
connect();
