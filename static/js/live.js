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
