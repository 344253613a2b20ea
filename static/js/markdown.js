// Renders every [data-markdown] element's text as sanitized HTML (reports, run report panels).
// The server sends the markdown escaped as text; marked turns it into HTML and DOMPurify
// removes anything executable, so a report can never inject script into the page.
import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";

const markdown = new Marked({ gfm: true, breaks: false });

export function renderMarkdown(root = document) {
  root.querySelectorAll("[data-markdown]:not([data-rendered])").forEach((el) => {
    el.innerHTML = DOMPurify.sanitize(markdown.parse(el.textContent));
    el.dataset.rendered = "1";
  });
}

renderMarkdown();
document.addEventListener("panels-updated", (event) => renderMarkdown(event.target));
