/* The client's admin page: polls the local API; adds and deletes proxies through it. */
"use strict";

(() => {
  const { el, setText, api, syncRows, confirmButton, bytes, rate, duration, ago, clock } = UI;
  const POLL_MS = 1000;
  const PEERS_EVERY = 5;  // polls between asks for the client list (it goes to the relay)
  const chart = new UI.Chart(document.getElementById("chart"),
    [{ label: "received", color: "--accent" }, { label: "sent", color: "--second" }]);
  const proxyRates = new UI.RateTracker();
  const connectionRates = new UI.RateTracker();
  const banner = document.getElementById("error");
  const form = document.getElementById("add-proxy");
  const formMessage = document.getElementById("form-message");
  let myId = null;
  let pollCount = 0;
  let lastStatus = null;

  function say(text, kind) {
    formMessage.className = `message ${kind}`;
    formMessage.textContent = text;
  }

  // --- header and summary ------------------------------------------------------------------

  const STATES = {
    connected: ["Connected", "tag b"],
    connecting: ["Connecting…", "tag warn"],
    reconnecting: ["Reconnecting", "tag warn"],
    idle: ["Starting", "tag warn"],
    failed: ["Failed", "tag bad"],
    stopped: ["Stopped", "tag bad"],
  };

  function stateDetail(s) {
    if (s.state === "reconnecting" || s.state === "connecting") {
      const wait = s.nextAttemptAt ? s.nextAttemptAt - Date.now() / 1000 : null;
      const next = wait === null ? "trying now" : wait > 0.5 ? `next attempt in ${duration(wait)}` : "trying now";
      return s.lastError ? `${next} · ${s.lastError}` : next;
    }
    if (s.state === "failed") return s.lastError || "";
    if (s.state === "connected") return s.reconnects ? `reconnected ${s.reconnects}×` : `since ${clock(s.startedAt)}`;
    return "";
  }

  function renderStatus(s) {
    myId = s.clientId;
    setText("client-id", s.clientId);
    setText("server-url", s.serverUrl);
    setText("fingerprint", s.fingerprint || "");
    const [label, cls] = STATES[s.state] || [s.state, "tag"];
    const badge = document.getElementById("state");
    badge.className = cls;
    badge.textContent = label;
    setText("stat-state", label);
    setText("stat-state-sub", stateDetail(s));
    document.getElementById("stat-state-sub").title = stateDetail(s);
    setText("stat-proxies", s.proxies.length);
    setText("stat-connections", s.activeSessions);
    renderDirect(s.direct);
    const failed = s.failedProxies || [];
    setText("failed-proxies", failed.map((f) => `saved proxy on port ${f.localPort} not running: ${f.error}`).join("\n"));
  }

  const PATH_MODES = { auto: "auto", relay: "relay only", direct: "direct only" };

  // The UDP path mode and what the NAT probe found (python -m chuantou_client status says the same).
  function renderDirect(d) {
    if (!d) return;
    setText("stat-path", PATH_MODES[d.path] || d.path);
    const nat = d.nat || {};
    const text = `NAT: ${[nat.mapping, nat.filtering].filter(Boolean).join(", ")}`
      + (nat.seenAs ? ` (the relay sees ${nat.seenAs})` : "");
    setText("stat-nat", text);
    document.getElementById("stat-nat").title = text;
  }

  // Where the proxy listens, as the CLI's proxy list shows it (see chuantou_client/listen.py).
  function listenAddress(p) {
    const host = p.localHost || "127.0.0.1";
    if (host === "127.0.0.1") return `localhost:${p.localPort}`;
    return host.includes(":") ? `[${host}]:${p.localPort}` : `${host}:${p.localPort}`;
  }

  function renderProxies(proxies) {
    proxyRates.forget(new Set(proxies.map((p) => String(p.localPort))));
    syncRows(document.querySelector("#proxies tbody"), proxies, {
      key: (p) => p.localPort,
      empty: "No proxy yet. Add one below: a local port that leads to a port on another client.",
      columns: [
        { label: "Local port", value: (p) => el("span", { class: "mono" }, listenAddress(p)) },
        {
          label: "Leads to",
          value: (p) => [el("span", { class: "id" }, p.targetClientId),
            el("span", { class: "mono" }, `:${p.targetHost ? `${p.targetHost}:` : ""}${p.targetPort}`)],
        },
        { label: "Protocol", value: (p) => el("span", { class: "tag" }, p.protocol) },
        {
          label: "Sealed",
          value: (p) => (p.sealed === "unsealed allowed"
            ? [el("span", { class: "tag" }, "sealed"),
              el("span", { class: "sub" }, "unsealed with a target that cannot seal (--allow-unsealed)")]
            : el("span", { class: "tag", title: "end to end: the relay cannot read or change it" }, "sealed")),
        },
        {
          label: "Connections", cls: "num",
          value: (p) => [String(p.activeConnections), el("span", { class: "sub" }, `${p.totalConnections} in total`)],
        },
        { label: "Sent", cls: "num", value: (p) => bytes(p.bytesSent) },
        { label: "Received", cls: "num", value: (p) => bytes(p.bytesReceived) },
        { label: "Rate", cls: "num", value: (p) => rate(proxyRates.rate(String(p.localPort), p.bytesSent + p.bytesReceived)) },
        {
          label: "Limit", cls: "num",
          value: (p) => p.bandwidth
            ? [rate(p.bandwidth), el("span", { class: "sub" }, p.bandwidthDrops ? `${p.bandwidthDrops} UDP dropped` : "each way")]
            : el("span", { class: "sub" }, "none"),
        },
      ],
      actions: (p) => confirmButton("Delete", "Delete?", async () => {
        const { ok, data } = await api("DELETE", `/api/proxies/${p.localPort}`);
        say(ok ? data.message : data.error, ok ? "ok" : "error");
        await refresh();
      }),
    });
  }

  function renderConnections(connections) {
    connectionRates.forget(new Set(connections.map((c) => c.id)));
    syncRows(document.querySelector("#connections tbody"), connections, {
      key: (c) => c.id,
      empty: "No active connection. Connections through a proxy (A) or from other clients (B) show here.",
      columns: [
        {
          label: "Direction",
          value: (c) => (c.side === "A"
            ? [el("span", { class: "tag" }, "A · out"),
              el("span", { class: "sub" }, c.localPort ? `from localhost:${c.localPort}` : "from a proxy")]
            : [el("span", { class: "tag b" }, "B · in"), el("span", { class: "sub" }, "to a local port")]),
        },
        { label: "Peer", value: (c) => el("span", { class: "id" }, c.peer || "?") },
        { label: "Port", cls: "num", value: (c) => c.port },
        { label: "Protocol", value: (c) => c.protocol },
        {
          label: "Sealed",
          value: (c) => (c.sealed
            ? el("span", { class: "tag", title: "end to end: the relay cannot read or change it" }, "sealed")
            : el("span", { class: "tag warn", title: "the peer cannot seal; allowed by --allow-unsealed" }, "not sealed")),
        },
        {
          label: "Path",
          value: (c) => (c.path === "direct"
            ? [el("span", { class: "tag b", title: "straight to the peer: the relay carries none of it" }, "direct"),
              el("span", { class: "sub" }, `${bytes(c.directBytesSent)} sent · ${bytes(c.directBytesReceived)} received`)]
            : el("span", { class: "tag", title: "through the relay" }, "relay")),
        },
        { label: "Started", value: (c) => ago(c.startedAt) },
        { label: "Sent", cls: "num", value: (c) => bytes(c.bytesSent) },
        { label: "Received", cls: "num", value: (c) => bytes(c.bytesReceived) },
        {
          label: "Rate", cls: "num",
          value: (c) => (c.bytesSent === undefined ? "—" : rate(connectionRates.rate(c.id, c.bytesSent + c.bytesReceived))),
        },
      ],
    });
  }

  function renderPeers(result) {
    const list = document.getElementById("peers");
    const options = document.getElementById("client-ids");
    if (!result.ok) {
      list.replaceChildren(el("li", { class: "empty" }, result.data.error || "the relay did not answer"));
      list.dataset.key = "";
      return;
    }
    const peers = result.data.clients.filter((id) => id !== myId);
    const key = JSON.stringify(peers);
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    options.replaceChildren(...peers.map((id) => el("option", { value: id })));
    if (!peers.length) {
      list.replaceChildren(el("li", { class: "empty" }, "No other client is online on this relay."));
      return;
    }
    list.replaceChildren(...peers.map((id) => el("li", { dataset: { client: id } },
      el("span", { class: "id" }, id),
      el("button", { type: "button", class: "small", onclick: () => prefill(id) }, "Connect"))));
  }

  function renderTraffic(t) {
    chart.update(t.samples);
    const last = t.samples[t.samples.length - 1];
    setText("stat-rate", last ? rate(last[1] + last[2]) : "—");
    setText("stat-total", `${bytes(t.bytesReceived)} in · ${bytes(t.bytesSent)} out`);
  }

  // --- the add form ------------------------------------------------------------------------

  function prefill(clientId) {
    document.getElementById("target-client").value = clientId;
    form.scrollIntoView({ behavior: "smooth", block: "center" });
    document.getElementById("target-port").focus();
    say(`Connecting to ${clientId}: choose its port, and a free local port here.`, "ok");
  }

  function markInvalid(message) {
    const fields = {
      "local-port": /local[ -]?port|already in use/i,
      "target-client": /target ?client|client id|not online/i,
      "target-port": /target ?port/i,
      "bandwidth": /bandwidth/i,
    };
    for (const [id, pattern] of Object.entries(fields)) {
      document.getElementById(id).setAttribute("aria-invalid", message && pattern.test(message) ? "true" : "false");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = document.getElementById("add-button");
    const body = {
      localPort: document.getElementById("local-port").value.trim(),
      targetClient: document.getElementById("target-client").value.trim(),
      targetPort: document.getElementById("target-port").value.trim(),
      protocol: document.getElementById("protocol").value,
    };
    const bandwidth = document.getElementById("bandwidth").value.trim();
    if (bandwidth) body.bandwidth = bandwidth;
    button.disabled = true;
    say("Creating…", "ok");
    try {
      const { ok, data } = await api("POST", "/api/proxies", body);
      if (ok) {
        markInvalid("");
        say(`${data.message} — open ${data.address}` + (data.warning ? ` (warning: ${data.warning})` : ""),
          data.warning ? "error" : "ok");
        document.getElementById("local-port").value = "";
        document.getElementById("target-port").value = "";
        document.getElementById("bandwidth").value = "";
      } else {
        markInvalid(data.error);
        say(data.error || "the proxy was not created", "error");
      }
    } finally {
      button.disabled = false;
    }
    await refresh();
  });

  // --- refresh -----------------------------------------------------------------------------

  async function refresh() {
    const askPeers = pollCount++ % PEERS_EVERY === 0;
    const [status, connections, traffic] = await Promise.all([
      api("GET", "/api/status"), api("GET", "/api/connections"), api("GET", "/api/traffic"),
    ]);
    if ([status, connections, traffic].some((r) => r.status === 401)) {
      window.location.replace("/");  // the session ended: the login page
      return false;
    }
    const failed = [status, connections, traffic].find((r) => !r.ok);
    banner.hidden = !failed;
    banner.textContent = failed ? failed.data.error || "the client did not answer" : "";
    if (failed) return false;
    const becameConnected = lastStatus && lastStatus.state !== "connected" && status.data.state === "connected";
    lastStatus = status.data;
    renderStatus(status.data);
    renderProxies(status.data.proxies);
    renderConnections(connections.data.connections);
    renderTraffic(traffic.data);
    if (status.data.state !== "connected") {  // the list comes from the relay: do not ask for it now
      renderPeers({ ok: false, data: { error: "Not connected to the relay; other clients show once it is." } });
    } else if (askPeers || becameConnected) {
      renderPeers(await api("GET", "/api/clients"));
    }
    return true;
  }

  document.getElementById("logout").addEventListener("click", async () => {
    await api("POST", "/logout");
    window.location.replace("/");
  });

  UI.poll(refresh, POLL_MS, document.getElementById("live"));
})();
