// Live run rows (home page, runs list): status, progress, ETA and duration follow /ws/runs/
// without a reload (durations also tick between updates: live.js's runClock). With data-reload-on-status the page reloads (at most every 3 s) when a run starts,
// finishes or is queued, since that moves it between the page's sections.
(function () {
  const script = document.currentScript;
  const reloadOnStatus = script.dataset.reloadOnStatus === "1";
  let socket = null;
  let retry = 1000;
  let reloadTimer = null;

  const fmtDuration = window.runClock.fmtDuration;

  function update(run) {
    const rows = document.querySelectorAll('[data-run-id="' + run.id + '"]');
    let statusChanged = rows.length === 0 && reloadOnStatus;
    rows.forEach((row) => {
      const status = row.querySelector('[data-field="status"]');
      if (status && status.textContent !== run.status) {
        statusChanged = true;
        status.textContent = run.status;
        status.className = "status status-" + run.status;
      }
      const bar = row.querySelector('[data-field="progress"]');
      if (bar) bar.style.width = Math.round(100 * Math.min(1, run.progress || 0)) + "%";
      const eta = row.querySelector('[data-field="eta"]');
      if (eta) eta.textContent = run.status === "running" && run.eta_seconds ? "ETA " + fmtDuration(run.eta_seconds) : "";
      window.runClock.setTimes(row.querySelector('[data-field="duration"]'), run);
      const bpb = row.querySelector('[data-field="best_val_bpb"]');
      if (bpb && run.best_val_bpb != null) bpb.textContent = run.best_val_bpb.toFixed(4);
    });
    if (statusChanged && reloadOnStatus && !reloadTimer) {
      reloadTimer = setTimeout(() => location.reload(), 3000);
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + script.dataset.socket);
    socket.onopen = () => { retry = 1000; };
    socket.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "run" && msg.run) update(msg.run);
    };
    socket.onclose = () => { setTimeout(connect, retry); retry = Math.min(retry * 2, 30000); };
  }
  connect();
})();
