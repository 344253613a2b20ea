// Feedback on the chat page: thumbs up / down and "Correct" on each assistant reply, and the
// "add this conversation to a dataset" control. Everything goes through the JSON API of
// chat/corrections_api.py (session + CSRF); the server decides what is stored, and the page
// shows what it answered. A corrected reply shows the corrected text, marked as corrected,
// with the model's original one line away (a tooltip).

const state = JSON.parse(document.getElementById("chat-state").textContent);

function csrfToken() {
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(), Accept: "application/json" },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const first = Object.values(data)[0];
    throw new Error(Array.isArray(first) ? first[0] : data.detail || `error ${response.status}`);
  }
  return data;
}

function button(text, title, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `link ${className}`;
  b.textContent = text;
  b.title = title;
  return b;
}

function show(article, feedback) {
  article.querySelector(".thumb-up").setAttribute("aria-pressed", String(feedback.rating === 1));
  article.querySelector(".thumb-down").setAttribute("aria-pressed", String(feedback.rating === -1));
  article.classList.toggle("corrected", Boolean(feedback.corrected));
  const mark = article.querySelector(".corrected-mark");
  mark.hidden = !feedback.corrected;
  mark.title = feedback.corrected ? `The model wrote:\n${feedback.original_content}` : "";
}

// Add the feedback buttons to a reply's footer; `redraw(article, text)` shows a corrected text.
export function addFeedback(article, message, redraw) {
  const footer = article.querySelector(".msg-footer");
  const up = button("👍", "A good reply (train on it)", "thumb-up");
  const down = button("👎", "A bad reply", "thumb-down");
  const correct = button("Correct", "Write the reply the model should have given", "correct");
  const mark = document.createElement("span");
  mark.className = "corrected-mark";
  mark.textContent = "corrected";
  footer.append(up, down, correct, mark);
  const send = async (body) => {
    if (!article.dataset.id) return null; // still streaming: not saved yet
    try {
      const feedback = await post(`${state.urls.feedback}${article.dataset.id}/feedback/`, body);
      show(article, feedback);
      return feedback;
    } catch (error) {
      alert(`Feedback not saved: ${error.message}`);
      return null;
    }
  };
  up.addEventListener("click", () => send({ rating: up.getAttribute("aria-pressed") === "true" ? 0 : 1 }));
  down.addEventListener("click", () => send({ rating: down.getAttribute("aria-pressed") === "true" ? 0 : -1 }));
  correct.addEventListener("click", () => {
    const body = article.querySelector(".body");
    if (!article.dataset.id || body.querySelector(".editor")) return;
    const editor = document.createElement("textarea");
    editor.className = "editor";
    editor.maxLength = state.limits.max_message_chars;
    editor.value = article.dataset.text ?? body.textContent;
    editor.rows = Math.min(12, editor.value.split("\n").length + 1);
    const save = button("Save correction", "", "save-correction");
    const cancel = button("Cancel", "", "cancel-correction");
    const before = [...body.childNodes];
    cancel.addEventListener("click", () => body.replaceChildren(...before));
    save.addEventListener("click", async () => {
      const feedback = await send({ correction: editor.value });
      if (!feedback) return;
      article.dataset.text = feedback.content;
      redraw(article, feedback.content);
    });
    body.replaceChildren(editor, save, cancel);
    editor.focus();
  });
  if (message.content !== undefined) article.dataset.text = message.content;
  show(article, message.feedback || { rating: 0, corrected: false });
}

// The "add this conversation to a dataset" control; `conversationId()` reads the open one.
// The fine-tune button trains the model picked on the page.
export function initDatasetControls(conversationId) {
  const finetune = document.getElementById("finetune-corrections");
  finetune?.addEventListener("submit", () => {
    finetune.querySelector("input[name=checkpoint]").value = document.getElementById("checkpoint").value;
  });
  const form = document.getElementById("add-to-dataset");
  if (!form) return;
  const status = form.querySelector(".status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const dataset = form.querySelector("select").value;
    if (!dataset || conversationId() === null) return;
    try {
      await post(`${state.urls.datasets}${dataset}/entries/`, { conversation: conversationId() });
      status.textContent = "added";
    } catch (error) {
      status.textContent = error.message;
    }
  });
}
