// The dashboard's "System" card: one look at /health/ (database, channel layer, workers, engines).
(function () {
  const script = document.currentScript;
  const cells = document.querySelectorAll("#health [data-check]");
  if (!cells.length) return;
  fetch(script.dataset.url, { headers: { Accept: "application/json" } })
    .then((r) => r.json())
    .then((report) => {
      cells.forEach((cell) => {
        const check = report.checks[cell.dataset.check];
        let text = check.ok ? "ok" : "down: " + check.error;
        if (check.ok && check.workers) {
          text = check.workers.length
            ? check.workers.map((w) => w.name + " (" + (w.detail || w.queues.join(", ")) + ")").join("; ")
            : "none answering";
        } else if (check.ok && check.vendor) {
          text = "ok (" + check.vendor + ", " + check.ms + " ms)";
        } else if (check.ok) {
          text = "ok (" + check.ms + " ms)";
        }
        cell.textContent = text;
        cell.className = check.ok && !(check.workers && !check.workers.length) ? "ok" : "bad";
      });
    })
    .catch((err) => cells.forEach((cell) => { cell.textContent = "unknown: " + err; cell.className = "bad"; }));
})();
