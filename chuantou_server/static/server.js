/* The relay's admin page: polls /api/status, /api/clients, /api/sessions and /api/traffic (and
 * /api/cluster on a node of a cluster). Every value is set as text: node records come from peers. */
"use strict";

(() => {
  const { el, setText, api, syncRows, confirmButton, bytes, rate, duration, ago, clock } = UI;
  const POLL_MS = 2000;
  const chart = new UI.Chart(document.getElementById("chart"), [{ label: "total", color: "--accent" }]);
  const banner = document.getElementById("error");
  const DIRECT_CLAIM = "reported by the clients: the relay never sees direct traffic and cannot check it";
  let keepErrorUntil = 0;  // an action's error stays a while; a poll's clears with the next success

  function showError(text) {
    banner.textContent = text || "";
    banner.hidden = !text;
  }

  async function act(method, path) {
    const { ok, data } = await api(method, path);
    if (!ok) {
      showError(data.error || "the action failed");
      keepErrorUntil = Date.now() + 8000;
    }
    await refresh();
  }

  // --- sections ----------------------------------------------------------------------------

  function renderStatus(s) {
    setText("version", `v${s.version}`);
    setText("port", s.port);
    setText("uptime", duration(s.uptime));
    setText("stat-clients", s.clients);
    setText("stat-sessions", s.sessions);
    setText("stat-rate", rate(s.bytesPerSecond));
    setText("stat-total", bytes(s.totalBytes));
    setText("stat-since", `since start, ${clock(s.startedAt)}`);
    setText("stat-direct", bytes(s.directBytesReported || 0));
    document.getElementById("logout").hidden = !s.adminLogin;
    document.getElementById("open-relay").hidden = !s.openRelay;
    const facts = [
      ["Version", s.version],
      ["Uptime", `${duration(s.uptime)} (since ${clock(s.startedAt)})`],
      ["Port", `${s.port} (TCP and UDP)`],
      ["Threads", `${s.processThreads} in the process, ${s.threads} of the relay`],
      ["Open sockets", s.openSockets === null ? "unknown" : `${s.openSockets} (${s.openFiles} open files)`],
      ["Memory (RSS)", s.rssBytes === null ? "unknown" : bytes(s.rssBytes)],
      ["Heartbeat timeout", `${s.heartbeatTimeout} s`],
      ["Access", "admin token (log in, or Authorization: Bearer)"],
    ];
    const dl = document.getElementById("system");
    const text = JSON.stringify(facts);
    if (dl.dataset.text !== text) {
      dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
      dl.dataset.text = text;
    }
  }

  function renderClients(clients) {
    setText("clients-hint", clients.length ? `${clients.length} online` : "");
    syncRows(document.querySelector("#clients tbody"), clients, {
      key: (c) => c.id,
      empty: "No client is connected. Start one with: python -m chuantou_client --server ws://THIS-HOST:PORT",
      columns: [
        { label: "Client", value: (c) => el("span", { class: "id" }, c.id) },
        { label: "Address", cls: "mono", value: (c) => c.remote },
        { label: "Connected", value: (c) => [ago(c.connectedAt), el("span", { class: "sub" }, clock(c.connectedAt))] },
        { label: "Last heartbeat", value: (c) => ago(c.lastSeen) },
        { label: "Sessions", cls: "num", value: (c) => c.sessions },
        { label: "Sent", cls: "num", value: (c) => [bytes(c.bytesSent), el("span", { class: "sub" }, rate(c.rateSent))] },
        {
          label: "Received", cls: "num",
          value: (c) => [bytes(c.bytesReceived), el("span", { class: "sub" }, rate(c.rateReceived))],
        },
        {
          label: "Direct (reported)", cls: "num",
          value: (c) => (c.directBytesSent || c.directBytesReceived
            ? [bytes(c.directBytesSent), el("span", { class: "sub", title: DIRECT_CLAIM }, `sent · ${bytes(c.directBytesReceived)} received`)]
            : el("span", { class: "sub" }, "—")),
        },
      ],
      actions: (c) => confirmButton("Disconnect", "Disconnect?",
        () => act("POST", `/api/clients/${encodeURIComponent(c.id)}/disconnect`)),
    });
  }

  function renderSessions(sessions) {
    syncRows(document.querySelector("#sessions tbody"), sessions, {
      key: (s) => s.id,
      empty: "No active session. One opens when a client's proxy gets a connection.",
      columns: [
        {
          label: "Session",
          value: (s) => [el("span", { class: "mono", title: s.id }, s.shortId),
            s.state === "relaying" ? null : el("span", { class: "sub" }, s.state)],
        },
        {
          label: "Clients",
          value: (s) => [el("span", { class: "id" }, s.a), el("span", { class: "arrow" }, "→"),
            el("span", { class: "id" }, s.b),
            s.dataNode ? el("span", { class: "sub" }, `pumped on ${s.dataNode} (A on ${s.aNode}, B on ${s.bNode})`)
              : null],
        },
        { label: "Port on B", cls: "num", value: (s) => s.port },
        { label: "Protocol", value: (s) => el("span", { class: s.protocol === "udp" ? "tag b" : "tag" }, s.protocol) },
        {
          label: "Sealed",
          value: (s) => el("span", {
            class: s.sealed ? "tag" : "tag warn",
            title: s.sealed ? "both clients registered keys: the relay moves only ciphertext"
              : "a client registered no key (an older chuantou): the relay can read this session",
          }, s.sealing),
        },
        { label: "Started", value: (s) => [ago(s.startedAt), el("span", { class: "sub" }, clock(s.startedAt))] },
        { label: "Sent by A", cls: "num", value: (s) => bytes(s.bytesAToB) },
        { label: "Sent by B", cls: "num", value: (s) => bytes(s.bytesBToA) },
        { label: "Rate", cls: "num", value: (s) => rate(s.rateAToB + s.rateBToA) },
        {
          label: "Path",
          value: (s) => (s.path === "direct"
            ? [el("span", { class: "tag b", title: DIRECT_CLAIM }, "direct"),
              el("span", { class: "sub" }, `reported by ${(s.pathReportedBy || []).join(", ") || "a client"}`)]
            : el("span", { class: "tag", title: "the relay carries this session" }, "relayed")),
        },
        {
          label: "Direct (reported)", cls: "num",
          value: (s) => (s.directAToB || s.directBToA
            ? [bytes(s.directAToB + s.directBToA),
              el("span", { class: "sub", title: DIRECT_CLAIM }, `A→B ${bytes(s.directAToB)} · B→A ${bytes(s.directBToA)}`)]
            : el("span", { class: "sub" }, "—")),
        },
      ],
      actions: (s) => confirmButton("Close", "Close?", () => act("POST", `/api/sessions/${s.id}/close`)),
    });
  }

  function renderCluster(view) {
    const card = document.getElementById("cluster");
    card.hidden = !view;
    if (!view) return;
    const live = view.nodes.filter((n) => n.state === "live").length;
    setText("cluster-hint", `node ${view.node}, data node policy ${view.dataNode}, store ${view.store}, `
      + `${live} node${live === 1 ? "" : "s"} live`);
    syncRows(document.querySelector("#cluster-nodes tbody"), view.nodes, {
      key: (n) => n.id,
      empty: "No node is in the table (is the cluster store reachable?)",
      columns: [
        { label: "Node", value: (n) => [el("span", { class: "id" }, n.id),
          n.id === view.node ? el("span", { class: "sub" }, "this node") : null] },
        { label: "State", value: (n) => el("span", { class: n.state === "live" ? "tag" : "tag warn" }, n.state) },
        { label: "Address", cls: "mono", value: (n) => n.advertise },
        { label: "Clients", cls: "num", value: (n) => n.clients },
        { label: "Sessions", cls: "num", value: (n) => n.sessions },
        { label: "Throughput", cls: "num", value: (n) => rate(n.bytesPerSecond) },
        { label: "Updated", value: (n) => ago(n.updatedAt) },
      ],
    });
    syncRows(document.querySelector("#cluster-clients tbody"), view.clients, {
      key: (c) => c.id,
      empty: "No client is registered in the cluster.",
      columns: [
        { label: "Client", value: (c) => el("span", { class: "id" }, c.id) },
        { label: "On node", value: (c) => [c.node, c.here ? el("span", { class: "sub" }, "this node") : null] },
      ],
    });
  }

  // --- refresh -----------------------------------------------------------------------------

  async function refresh() {
    const [status, clients, sessions, traffic] = await Promise.all([
      api("GET", "/api/status"), api("GET", "/api/clients"), api("GET", "/api/sessions"), api("GET", "/api/traffic"),
    ]);
    const all = [status, clients, sessions, traffic];
    if (all.some((r) => r.status === 401)) {
      window.location.replace("/");  // the login form
      return false;
    }
    const failed = all.find((r) => !r.ok);
    if (failed) {
      showError(failed.data.error || "the relay did not answer");
      return false;
    }
    if (Date.now() > keepErrorUntil) showError("");
    renderStatus(status.data);
    renderClients(clients.data.clients);
    renderSessions(sessions.data.sessions);
    const cluster = status.data.cluster ? await api("GET", "/api/cluster") : null;
    renderCluster(cluster && cluster.ok ? cluster.data : null);
    chart.update(traffic.data.samples);
    return true;
  }

  document.getElementById("logout").addEventListener("click", async () => {
    await api("POST", "/logout");
    window.location.replace("/");
  });

  UI.poll(refresh, POLL_MS, document.getElementById("live"));
})();
