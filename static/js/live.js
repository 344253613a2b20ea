// Live badge: keeps a websocket to /ws/health/ and pings through the channel layer, so a
// user sees at a glance whether live updates (charts, chat streaming) can reach the page.
(function () {
  const badge = document.getElementById("live-badge");
  if (!badge) return;
  let socket = null;
  let timer = null;
  let retry = 1000;

  function show(ok, text) {
    badge.textContent = "live: " + text;
    badge.className = "badge " + (ok ? "ok" : "bad");
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws/health/");
    socket.onopen = () => {
      retry = 1000;
      const ping = () => socket.send(JSON.stringify({ type: "ping", id: Date.now() }));
      ping();
      timer = setInterval(ping, 15000);
    };
    socket.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "pong") show(true, "on (" + msg.layer_ms + " ms)");
    };
    socket.onclose = () => {
      clearInterval(timer);
      show(false, "off");
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  }
  connect();
})();

// Run durations tick on the page: every element with data-started (Unix seconds, from the
// server) shows the time from then to data-finished, or to now while that is empty, so a
// running run's "Time" / "Duration" advances without a reload. "Now" is the server's clock
// (body data-server-time, offset once at load), so a skewed client clock does not matter.
window.runClock = (function () {
  const serverTime = Number(document.body.dataset.serverTime || 0) * 1000;
  const offset = serverTime ? serverTime - Date.now() : 0;

  function fmtDuration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    if (m) return m + "m " + String(s).padStart(2, "0") + "s";
    return s + "s";
  }

  function tick() {
    const now = (Date.now() + offset) / 1000;
    document.querySelectorAll("[data-started]").forEach((el) => {
      const started = Number(el.dataset.started);
      if (!started) return;
      const finished = Number(el.dataset.finished) || now;
      el.textContent = fmtDuration(finished - started);
    });
  }

  // A websocket update of a run (runs/broadcast.py's summary) moves its start and end.
  function setTimes(el, run) {
    if (!el) return;
    el.dataset.started = run.started_at || "";
    el.dataset.finished = run.finished_at || "";
    tick();
  }

  setInterval(tick, 1000);
  return { fmtDuration, tick, setTimes };
})();
