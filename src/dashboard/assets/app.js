// Apiary's dashboard: draws the page the address names from the public /v1 API, with the
// visitor's token from sessionStorage. Everything shown is written with textContent (never as
// markup), so job payloads and errors cannot inject anything.
(function () {
  "use strict";

  const TOKEN_KEY = "apiary.token";
  const page = document.getElementById("page");
  const notice = document.getElementById("notice");
  const timers = [];

  // ---- small helpers ------------------------------------------------------------------

  /** An element with attributes (on* are listeners) and children (strings become text). */
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  /** An API call: JSON in and out, the token attached; throws Error with status and text. */
  async function api(path, options) {
    const opts = Object.assign({ method: "GET" }, options || {});
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.body);
    }
    const res = await fetch(path, Object.assign(opts, { headers }));
    let body = null;
    try { body = await res.json(); } catch (_) { body = null; }
    if (res.status === 401 && location.pathname !== "/login") {
      location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
      throw Object.assign(new Error("a token is needed"), { status: 401 });
    }
    if (!res.ok) {
      let text = (body && body.error) || res.statusText;
      if (res.status === 403) text = "needs a token with the admin scope (" + text + ")";
      throw Object.assign(new Error(text), { status: res.status });
    }
    return body;
  }

  function say(text, isError) {
    notice.textContent = text;
    notice.className = isError ? "error" : "";
    notice.hidden = false;
  }

  function clearNotice() { notice.hidden = true; }

  /** Runs an action, reporting its outcome in the notice bar. */
  async function act(what, fn) {
    try {
      const done = await fn();
      say(done || what + ": done");
      return true;
    } catch (e) {
      say(what + " failed: " + e.message, true);
      return false;
    }
  }

  /** Asks before a change; resolves true when confirmed. */
  function confirmDialog(text) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  function every(ms, fn) {
    fn();
    timers.push(setInterval(fn, ms));
  }

  function badge(text, cls) { return el("span", { class: "badge " + (cls || text) }, text); }

  function when(t) {
    if (!t) return "";
    const d = new Date(t);
    return d.toLocaleString(undefined, { hour12: false });
  }

  function ago(t) {
    if (!t) return "";
    return seconds((Date.now() - new Date(t).getTime()) / 1000) + " ago";
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function between(a, b) {
    if (!a || !b) return "";
    return seconds((new Date(b) - new Date(a)) / 1000);
  }

  function rate(x) { return (x || 0).toFixed(x >= 100 ? 0 : 1); }

  function jobLink(id) { return el("a", { href: "/jobs/" + id, class: "mono" }, id); }

  function table(headers, rows, emptyText) {
    const head = el("tr", {}, headers.map((h) => {
      const [text, cls] = Array.isArray(h) ? h : [h];
      return el("th", { class: cls }, text);
    }));
    const body = rows.length
      ? rows
      : [el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, emptyText || "Nothing here."))];
    return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
  }

  function pretty(value) {
    if (value === undefined) return "";
    return JSON.stringify(value, null, 2);
  }

  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const FINAL = ["succeeded", "failed", "dead", "cancelled", "duplicate"];
  const STATUSES = ["waiting", "queued", "running", "retrying", "succeeded", "failed", "dead", "duplicate", "cancelled"];

  // ---- overview -------------------------------------------------------------------------

  function overview() {
    const tiles = el("div", { class: "tiles", id: "tiles" });
    const queues = el("div", { id: "queues" });
    const workers = el("div", { id: "workers" });
    const thr = el("div", { class: "chart", id: "chart-throughput" });
    const lat = el("div", { class: "chart", id: "chart-latency" });
    page.replaceChildren(
      el("h1", {}, "Overview"),
      tiles,
      el("h2", {}, "Queues"), queues,
      el("div", { class: "grid" },
        el("div", { class: "card" }, el("h2", {}, "Finished per second, last hour"), thr),
        el("div", { class: "card" }, el("h2", {}, "Enqueue to finish, last hour (ms)"), lat)),
      el("h2", {}, "Workers"), workers,
    );

    every(3000, async () => {
      let s;
      try { s = await api("/v1/stats"); } catch (e) { say("stats: " + e.message, true); return; }
      const last = s.last_hour || {};
      const tile = (n, l, id) => el("div", { class: "tile", id }, el("div", { class: "n" }, n), el("div", { class: "l" }, l));
      tiles.replaceChildren(
        tile(s.depths.ready, "ready", "tile-ready"),
        tile(s.in_flight, "in flight", "tile-in-flight"),
        tile(s.depths.delayed, "delayed", "tile-delayed"),
        tile(s.depths.dead, "dead letters", "tile-dead"),
        tile(rate(s.throughput_per_second) + "/s", "throughput", "tile-rate"),
        tile(seconds(s.oldest_waiting_seconds), "oldest waiting", "tile-oldest"),
        tile(Object.values(last).reduce((a, b) => a + b, 0), "jobs in the last hour", "tile-hour"),
      );
      queues.replaceChildren(table(
        ["Queue", "State", ["Ready", "num"], ["In flight", "num"], ["Delayed", "num"], ["Dead", "num"],
          ["Oldest waiting", "num"], ["Succeeded/s", "num"], ["Failed/s", "num"], ["Consumers", "num"]],
        (s.queues || []).map((q) => el("tr", { "data-queue": q.name },
          el("td", {}, el("a", { href: "/jobs?queue=" + encodeURIComponent(q.name) }, q.name)),
          el("td", {}, q.paused ? badge("paused") : badge("active")),
          el("td", { class: "num" }, q.ready),
          el("td", { class: "num" }, q.in_flight),
          el("td", { class: "num" }, q.delayed),
          el("td", { class: "num" }, q.dead),
          el("td", { class: "num" }, seconds(q.oldest_waiting_seconds)),
          el("td", { class: "num" }, rate(q.succeeded_per_second)),
          el("td", { class: "num" }, rate(q.failed_per_second)),
          el("td", { class: "num" }, q.consumers))),
        "No queues yet."));
      workers.replaceChildren(table(
        ["Host", "Pid", "Queues", ["In flight", "num"], ["Processed", "num"], ["Failed", "num"],
          ["Rate", "num"], "Last heartbeat", "Version", "State"],
        (s.workers || []).map((w) => el("tr", {},
          el("td", {}, w.host),
          el("td", { class: "num" }, w.pid),
          el("td", {}, Object.entries(w.queues || { [w.queue]: w.concurrency })
            .map(([q, c]) => q + " ×" + c).join(", ")),
          el("td", { class: "num" }, w.in_flight + " / " + w.concurrency),
          el("td", { class: "num" }, w.processed),
          el("td", { class: "num" }, w.failed),
          el("td", { class: "num" }, rate(w.rate) + "/s"),
          el("td", {}, ago(w.heartbeat_at)),
          el("td", {}, w.version),
          el("td", {}, w.draining ? badge("draining", "retrying") : badge("running")))),
        "No live workers."));
    });

    let charts = null;
    every(10000, async () => {
      let series;
      try { series = await api("/v1/stats/series?minutes=60"); } catch (e) { say("series: " + e.message, true); return; }
      const xs = series.points.map((p) => new Date(p.at).getTime() / 1000);
      const col = (k) => series.points.map((p) => p[k]);
      const thrData = [xs, col("succeeded_per_second"), col("failed_per_second"), col("retried_per_second")];
      const latData = [xs, col("p50_ms"), col("p99_ms")];
      if (!window.uPlot) { say("the chart library did not load", true); return; }
      const width = (node) => Math.max(320, node.clientWidth - 4);
      if (!charts) {
        const opts = (node, series) => ({
          width: width(node), height: 220, series: [{}].concat(series),
          axes: [{}, { size: 60 }], scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
        });
        charts = [
          new uPlot(opts(thr, [
            { label: "succeeded/s", stroke: "#2e7d32", width: 2 },
            { label: "failed/s", stroke: "#c62828", width: 2 },
            { label: "retried/s", stroke: "#ef6c00", width: 2 },
          ]), thrData, thr),
          new uPlot(opts(lat, [
            { label: "p50 ms", stroke: "#1565c0", width: 2, spanGaps: true, points: { show: true, size: 5 } },
            { label: "p99 ms", stroke: "#8e24aa", width: 2, spanGaps: true, points: { show: true, size: 5 } },
          ]), latData, lat),
        ];
        window.addEventListener("resize", () => {
          charts[0].setSize({ width: width(thr), height: 220 });
          charts[1].setSize({ width: width(lat), height: 220 });
        });
      } else {
        charts[0].setData(thrData);
        charts[1].setData(latData);
      }
      thr.dataset.points = String(xs.length);
    });
  }

  // ---- jobs ---------------------------------------------------------------------------

  /** datetime-local's value (local time) as an RFC 3339 instant, or "" */
  function instant(local) {
    if (!local) return "";
    const d = new Date(local);
    return isNaN(d) ? "" : d.toISOString();
  }

  /** A table of jobs with a checkbox per row, and the set of checked ids. */
  function jobTable(jobs, extra) {
    const selected = new Set();
    const all = el("input", { type: "checkbox", title: "Select all on this page", id: "select-all" });
    const boxes = [];
    const rows = jobs.map((j) => {
      const box = el("input", { type: "checkbox", "data-id": j.id, class: "select" });
      box.addEventListener("change", () => { box.checked ? selected.add(j.id) : selected.delete(j.id); });
      boxes.push(box);
      return el("tr", { "data-id": j.id },
        el("td", {}, box),
        el("td", {}, jobLink(j.id)),
        el("td", {}, j.kind),
        el("td", {}, j.queue),
        el("td", {}, badge(j.status)),
        el("td", { class: "num" }, j.attempts + " / " + j.max_attempts),
        el("td", {}, when(j.created_at)),
        el("td", {}, j.finished_at ? between(j.created_at, j.finished_at) : ""),
        extra ? extra(j) : null);
    });
    all.addEventListener("change", () => {
      for (const b of boxes) {
        b.checked = all.checked;
        b.dispatchEvent(new Event("change"));
      }
    });
    const headers = [el("span", {}, all), "Id", "Kind", "Queue", "Status", ["Attempts", "num"], "Created", "Took"];
    if (extra) headers.push("Reason");
    return { node: table(headers, rows, "No jobs match."), selected };
  }

  /** Buttons acting on each checked job, one call per job, with a confirmation. */
  function bulk(selected, actions) {
    return el("div", { class: "actions" },
      el("span", { class: "muted" }, "Selected jobs:"),
      actions.map(([label, path, cls]) => el("button", {
        class: cls, "data-bulk": label,
        onclick: async () => {
          const ids = [...selected];
          if (!ids.length) { say("Select jobs first", true); return; }
          if (!(await confirmDialog(label + " " + ids.length + " job(s)?"))) return;
          let ok = 0;
          const failed = [];
          for (const id of ids) {
            try { await api("/v1/jobs/" + id + "/" + path, { method: "POST" }); ok++; }
            catch (e) { failed.push(id.slice(0, 8) + ": " + e.message); }
          }
          say(label + ": " + ok + " of " + ids.length + " done" + (failed.length ? "; " + failed.join("; ") : ""), failed.length > 0);
          setTimeout(() => location.reload(), 1200);
        },
      }, label)));
  }

  function jobs() {
    const q = new URLSearchParams(location.search);
    const field = (name, label, attrs) => el("label", {}, label,
      el("input", Object.assign({ name, value: q.get(name) || "" }, attrs || {})));
    const status = el("select", { name: "status" }, el("option", { value: "" }, "any"),
      STATUSES.map((s) => el("option", { value: s, selected: q.get("status") === s }, s)));
    const form = el("form", { class: "filters", method: "get", action: "/jobs", id: "filters" },
      el("label", {}, "Status", status),
      field("kind", "Kind"), field("queue", "Queue"), field("dedup_key", "Dedup key"),
      field("after", "Created after", { type: "datetime-local", step: 1 }),
      field("until", "Created before", { type: "datetime-local", step: 1 }),
      el("button", { type: "submit", class: "primary" }, "Filter"),
      el("a", { href: "/jobs" }, "clear"));
    const search = el("input", { id: "job-id", placeholder: "job id", size: 38, class: "mono" });
    const find = el("form", { class: "filters", id: "find" }, el("label", {}, "Find by id", search),
      el("button", { type: "submit" }, "Open"));
    find.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const id = search.value.trim();
      if (!UUID.test(id)) { say("not a job id: " + JSON.stringify(id), true); return; }
      location.assign("/jobs/" + id.toLowerCase());
    });
    const list = el("div", { id: "jobs" }, el("p", { class: "muted" }, "Loading…"));
    page.replaceChildren(el("h1", {}, "Jobs"), find, form, list);

    const params = new URLSearchParams();
    for (const k of ["status", "kind", "queue", "dedup_key", "before", "limit"]) if (q.get(k)) params.set(k, q.get(k));
    if (instant(q.get("after"))) params.set("created_after", instant(q.get("after")));
    if (instant(q.get("until"))) params.set("created_before", instant(q.get("until")));
    if (!params.has("limit")) params.set("limit", "50");
    api("/v1/jobs?" + params).then((res) => {
      const t = jobTable(res.jobs);
      const pager = el("div", { class: "pager" });
      if (q.get("before")) pager.append(el("button", { type: "button", onclick: () => history.back() }, "← newer"));
      if (q.get("before")) {
        const first = new URLSearchParams(q); first.delete("before");
        pager.append(el("a", { href: "/jobs?" + first }, "first page"));
      }
      if (res.next) {
        const next = new URLSearchParams(q); next.set("before", res.next);
        pager.append(el("a", { href: "/jobs?" + next, id: "next-page" }, "older →"));
      }
      list.replaceChildren(
        bulk(t.selected, [["Retry", "retry"], ["Cancel", "cancel", "danger"]]),
        t.node, pager);
    }).catch((e) => list.replaceChildren(el("p", { class: "muted" }, "Could not list jobs: " + e.message)));
  }

  // ---- one job ------------------------------------------------------------------------

  function jobPage(id) {
    const holder = el("div", { id: "job" }, el("p", { class: "muted" }, "Loading…"));
    page.replaceChildren(el("h1", {}, "Job ", el("span", { class: "mono" }, id)), holder);
    if (!UUID.test(id)) { holder.replaceChildren(el("p", {}, "Not a job id.")); return; }
    let last = null;
    const draw = async () => {
      let j;
      try { j = await api("/v1/jobs/" + id); } catch (e) {
        holder.replaceChildren(el("p", {}, e.status === 404 ? "No job with this id (it may have been pruned)." : "Could not read the job: " + e.message));
        return;
      }
      const text = JSON.stringify(j);
      if (text === last) return;
      last = text;
      const children = await api("/v1/jobs/" + id + "/children").then((c) => c.children).catch(() => []);
      const batch = j.batch_id ? await api("/v1/batches/" + j.batch_id).catch(() => null) : null;
      const final = FINAL.includes(j.status);
      const actions = el("div", { class: "actions" });
      if (["dead", "failed"].includes(j.status) && j.raw_body == null) {
        actions.append(el("button", { class: "primary", id: "replay", onclick: async () => {
          if (!(await confirmDialog("Replay job " + id + " with a fresh attempt budget?"))) return;
          if (await act("Replay", () => api("/v1/jobs/" + id + "/retry", { method: "POST" }).then(() => "Replayed: queued again"))) { last = null; draw(); }
        } }, "Replay"));
      }
      if (!final) {
        actions.append(el("button", { class: "danger", id: "cancel", onclick: async () => {
          if (!(await confirmDialog("Cancel job " + id + "?"))) return;
          if (await act("Cancel", () => api("/v1/jobs/" + id + "/cancel", { method: "POST" }).then(() => "Cancel requested"))) { last = null; draw(); }
        } }, "Cancel"));
      }
      const fields = [
        ["Status", badge(j.status)], ["Kind", j.kind], ["Queue", j.queue], ["Priority", j.priority],
        ["Dedup key", j.dedup_key || "–"], ["Concurrency key", j.concurrency_key || "–"],
        ["Attempts", j.attempts + " of " + j.max_attempts],
        ["Created", when(j.created_at)], ["Due", j.run_at ? when(j.run_at) : "at once"],
        ["Started", when(j.started_at) || "–"], ["Finished", when(j.finished_at) || "–"],
        ["Waited", between(j.run_at && j.run_at > j.created_at ? j.run_at : j.created_at, j.started_at) || "–"],
        ["Ran", between(j.started_at, j.finished_at) || "–"],
      ];
      if (j.next_attempt_at) fields.push(["Next attempt", when(j.next_attempt_at)]);
      if (j.duplicate_of) fields.push(["Duplicate of", jobLink(j.duplicate_of)]);
      if (j.callback_url) fields.push(["Callback", j.callback_url]);
      if (j.progress != null) {
        const bar = el("span");
        bar.style.width = Math.round(j.progress * 100) + "%";
        fields.push(["Progress", el("span", {}, el("span", { class: "progress" }, bar), " " + Math.round(j.progress * 100) + "% " + (j.progress_at ? "(" + ago(j.progress_at) + ")" : ""))]);
      }
      const attempts = Array.isArray(j.errors) ? j.errors : [];
      const sections = [
        actions,
        el("div", { class: "card" }, el("dl", { class: "fields" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]))),
        el("h2", {}, "Payload"),
        "payload" in j ? el("pre", { id: "payload" }, pretty(j.payload)) : el("p", { class: "muted" }, "Hidden: this token may not read payloads."),
      ];
      if (j.progress_detail != null) sections.push(el("h2", {}, "Progress detail"), el("pre", {}, pretty(j.progress_detail)));
      if (j.result != null) sections.push(el("h2", {}, "Result"), el("pre", { id: "result" }, pretty(j.result)));
      if (j.error) sections.push(el("h2", {}, "Error"), el("pre", { id: "error" }, j.error));
      if (j.raw_body != null) sections.push(el("h2", {}, "Message as received (not a valid job)"), el("pre", {}, j.raw_body));
      sections.push(el("h2", {}, "Attempts"), table(["Attempt", "Error", "At"],
        attempts.map((a) => el("tr", {}, el("td", { class: "num" }, a.attempt), el("td", {}, a.error), el("td", {}, when(a.at)))),
        j.attempts ? "No attempt has failed." : "Not run yet."));
      if ((j.depends_on || []).length) {
        sections.push(el("h2", {}, "Waits for"), el("ul", {}, j.depends_on.map((p) => el("li", {}, jobLink(p)))));
      }
      if (children.length) {
        sections.push(el("h2", {}, "Jobs waiting for this one"), table(["Id", "Kind", "Status"],
          children.map((c) => el("tr", {}, el("td", {}, jobLink(c.id)), el("td", {}, c.kind), el("td", {}, badge(c.status))))));
      }
      if (batch) {
        sections.push(el("h2", {}, "Batch"), el("div", { class: "card" }, el("dl", { class: "fields" },
          el("dt", {}, "Batch"), el("dd", { class: "mono" }, batch.id),
          el("dt", {}, "Status"), el("dd", {}, badge(batch.status)),
          el("dt", {}, "Progress"), el("dd", {}, Math.round(batch.progress * 100) + "% of " + batch.total),
          el("dt", {}, "By status"), el("dd", {}, Object.entries(batch.counts).map(([k, v]) => k + " " + v).join(", ")),
          el("dt", {}, "Callback"), el("dd", {}, jobLink(batch.callback_id), " (" + batch.callback_kind + ")"))));
      }
      holder.replaceChildren(...sections);
      holder.dataset.status = j.status;
    };
    every(2000, draw);
  }

  // ---- dead letters and retries -------------------------------------------------------

  function dead() {
    const q = new URLSearchParams(location.search);
    const kind = q.get("kind") || "";
    const kindInput = el("input", { name: "kind", value: kind, placeholder: "any kind" });
    const filter = el("form", { class: "filters", method: "get", action: "/dead" },
      el("label", {}, "Kind", kindInput), el("button", { type: "submit" }, "Filter"));
    const replayAll = el("div", { class: "actions" },
      el("button", { class: "primary", id: "replay-kind", onclick: async () => {
        const k = kindInput.value.trim();
        if (!k) { say("Name a kind to replay (the filter above)", true); return; }
        if (!(await confirmDialog("Replay every dead and failed job of kind " + k + "?"))) return;
        if (await act("Replay", () => api("/v1/dead/replay", { method: "POST", body: { kind: k } }).then((r) => "Replayed " + r.replayed + " job(s) of " + k))) setTimeout(() => location.reload(), 1200);
      } }, "Replay all of this kind"),
      el("button", { class: "danger", id: "replay-all", onclick: async () => {
        if (!(await confirmDialog("Replay EVERY dead and failed job, of every kind?"))) return;
        if (await act("Replay", () => api("/v1/dead/replay", { method: "POST", body: { all: true } }).then((r) => "Replayed " + r.replayed + " job(s)"))) setTimeout(() => location.reload(), 1200);
      } }, "Replay all dead jobs"));
    const deadList = el("div", { id: "dead-jobs" }, el("p", { class: "muted" }, "Loading…"));
    const retrying = el("div", { id: "retrying-jobs" }, el("p", { class: "muted" }, "Loading…"));
    page.replaceChildren(el("h1", {}, "Dead letters and retries"), filter, replayAll,
      el("h2", {}, "Dead and failed"), deadList, el("h2", {}, "Waiting to retry"), retrying);
    const reason = (j) => el("td", {}, (j.error || "").slice(0, 300));
    const load = async (status, node, actions) => {
      const p = new URLSearchParams({ status, limit: "100" });
      if (kind) p.set("kind", kind);
      try {
        const res = await api("/v1/jobs?" + p);
        const t = jobTable(res.jobs, reason);
        node.replaceChildren(bulk(t.selected, actions), t.node);
        return res.jobs;
      } catch (e) {
        node.replaceChildren(el("p", { class: "muted" }, "Could not list: " + e.message));
        return [];
      }
    };
    Promise.all([load("dead", deadList, [["Replay", "retry", "primary"]]), load("failed", el("div"), [])]).then(([d, f]) => {
      if (f.length) {
        const t = jobTable(f, reason);
        deadList.append(el("h2", {}, "Failed"), bulk(t.selected, [["Replay", "retry", "primary"]]), t.node);
      }
    });
    load("retrying", retrying, [["Cancel", "cancel", "danger"]]);
  }

  // ---- queues and schedules -----------------------------------------------------------

  function queues() {
    const list = el("div", { id: "queue-list" });
    page.replaceChildren(el("h1", {}, "Queues"), list);
    every(3000, async () => {
      let res;
      try { res = await api("/v1/queues"); } catch (e) { say("queues: " + e.message, true); return; }
      list.replaceChildren(table(
        ["Queue", "State", ["Ready", "num"], ["In flight", "num"], ["Delayed", "num"], ["Dead", "num"],
          ["Oldest waiting", "num"], ["Succeeded/s", "num"], ["Consumers", "num"], ""],
        res.queues.map((q) => el("tr", { "data-queue": q.name },
          el("td", {}, el("a", { href: "/jobs?queue=" + encodeURIComponent(q.name) }, q.name)),
          el("td", { class: "state" }, q.paused ? badge("paused") : badge("active")),
          el("td", { class: "num" }, q.ready), el("td", { class: "num" }, q.in_flight),
          el("td", { class: "num" }, q.delayed), el("td", { class: "num" }, q.dead),
          el("td", { class: "num" }, seconds(q.oldest_waiting_seconds)),
          el("td", { class: "num" }, rate(q.succeeded_per_second)),
          el("td", { class: "num" }, q.consumers),
          el("td", {}, q.paused
            ? el("button", { class: "primary", "data-action": "resume", onclick: () => toggleQueue(q.name, "resume") }, "Resume")
            : el("button", { class: "danger", "data-action": "pause", onclick: () => toggleQueue(q.name, "pause") }, "Pause")))),
        "No queues yet."));
    });
  }

  async function toggleQueue(name, how) {
    if (how === "pause" && !(await confirmDialog("Pause queue " + name + "? Workers start none of its jobs until it is resumed."))) return;
    await act(how === "pause" ? "Pause" : "Resume", () =>
      api("/v1/queues/" + encodeURIComponent(name) + "/" + how, { method: "POST" })
        .then((q) => "Queue " + q.name + " is " + (q.paused ? "paused" : "running")));
  }

  function schedules() {
    const list = el("div", { id: "schedule-list" });
    page.replaceChildren(el("h1", {}, "Schedules"), list);
    every(5000, async () => {
      let res;
      try { res = await api("/v1/schedules"); } catch (e) { say("schedules: " + e.message, true); return; }
      const all = res.schedules || res;
      list.replaceChildren(table(
        ["Name", "When", "Kind", "Queue", "Next fire", "Missed", "State", "Source", ""],
        all.map((s) => el("tr", { "data-schedule": s.name },
          el("td", {}, s.name), el("td", { class: "mono" }, s.cron + " (" + s.timezone + ")"),
          el("td", {}, s.kind), el("td", {}, s.queue || "default"),
          el("td", {}, s.paused ? "–" : when(s.next_at)), el("td", {}, s.missed),
          el("td", {}, s.paused ? badge("paused") : badge("active")), el("td", {}, s.source),
          el("td", {}, el("button", {
            class: s.paused ? "primary" : "danger", "data-action": s.paused ? "resume" : "pause",
            onclick: async () => {
              const how = s.paused ? "resume" : "pause";
              if (how === "pause" && !(await confirmDialog("Pause schedule " + s.name + "?"))) return;
              await act(how, () => api("/v1/schedules/" + encodeURIComponent(s.name) + "/" + how, { method: "POST" }).then(() => "Schedule " + s.name + ": " + how + "d"));
            },
          }, s.paused ? "Resume" : "Pause")))),
        "No schedules."));
    });
  }

  // ---- login --------------------------------------------------------------------------

  function login() {
    const next = new URLSearchParams(location.search).get("next") || "/";
    const input = el("input", { type: "password", id: "token", autocomplete: "off", placeholder: "token" });
    const form = el("form", { id: "login" }, el("label", { for: "token" }, "API token (a read token shows; an admin token also acts)"), input,
      el("button", { type: "submit", class: "primary" }, "Sign in"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      try {
        await api("/v1/stats");
        location.assign(next.startsWith("/") && !next.startsWith("//") ? next : "/");
      } catch (e) {
        sessionStorage.removeItem(TOKEN_KEY);
        say("That token does not work here: " + e.message, true);
      }
    });
    page.replaceChildren(el("div", { class: "login card" }, el("h1", {}, "Sign in"),
      el("p", { class: "muted" }, "The token stays in this tab (sessionStorage) and goes only to this API."), form));
    input.focus();
  }

  // ---- routing ------------------------------------------------------------------------

  function who() {
    const slot = document.getElementById("who");
    if (token()) {
      slot.replaceChildren("signed in with a token", el("button", { id: "sign-out", onclick: () => { sessionStorage.removeItem(TOKEN_KEY); location.assign("/login"); } }, "Sign out"));
    } else {
      slot.replaceChildren(el("a", { href: "/login" }, "Sign in"));
    }
  }

  function route() {
    const path = location.pathname.replace(/\/+$/, "") || "/";
    const pages = { "/": ["overview", overview], "/jobs": ["jobs", jobs], "/dead": ["dead", dead],
      "/queues": ["queues", queues], "/schedules": ["schedules", schedules], "/login": ["", login] };
    let name, draw;
    if (pages[path]) [name, draw] = pages[path];
    else if (path.startsWith("/jobs/")) [name, draw] = ["jobs", () => jobPage(decodeURIComponent(path.slice(6)))];
    else [name, draw] = ["", () => page.replaceChildren(el("p", {}, "No such page."))];
    for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("current", a.dataset.page === name);
    clearNotice();
    who();
    draw();
  }

  route();
})();
