// Tether web application: live status and logs. No inline script anywhere (the CSP forbids
// it); this file only reads JSON and text from the application's own endpoints and writes
// them with textContent, never as HTML.
"use strict";
(function () {
  var KNOWN = ["online", "offline", "upgrading", "queued", "running", "succeeded", "failed",
    "cancelled", "expired", "pending", "skipped", "timed_out", "interrupted", "timeout",
    "stopped", "poisoned"];
  var DEPLOYMENT_FINAL = ["succeeded", "failed", "cancelled"];
  var STEP_LIVE = ["running"];

  function all(sel, root) {
    return Array.prototype.slice.call((root || document).querySelectorAll(sel));
  }

  function setBadge(el, status) {
    if (!el || status == null || el.getAttribute("data-status") === status) { return; }
    el.textContent = status;
    el.setAttribute("data-status", status);
    el.className = "badge " + (KNOWN.indexOf(status) >= 0 ? status : "other");
  }

  function setText(el, text) {
    if (el && el.textContent !== text) { el.textContent = text; }
  }

  function getJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); });
  }

  function ago(ms) {
    if (ms == null) { return "never"; }
    var s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
    if (s < 60) { return s + " s ago"; }
    if (s < 3600) { return Math.floor(s / 60) + " min ago"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h ago"; }
    return Math.floor(s / 86400) + " d ago";
  }

  // --- a step log: fetched while its step runs, once more when it ends ------------------
  function refreshLog(pre) {
    var state = pre.getAttribute("data-state") || "pending";
    var fetched = pre.getAttribute("data-fetched-state");
    var live = STEP_LIVE.indexOf(state) >= 0;
    if (!live && fetched === state) { return Promise.resolve(); }
    if (state === "pending") { return Promise.resolve(); }
    var have = parseInt(pre.getAttribute("data-length") || "0", 10);
    var url = pre.getAttribute("data-log") + "&offset=" + have;
    return fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) { return; }
      var offset = parseInt(r.headers.get("X-Log-Offset") || "0", 10);
      var length = r.headers.get("X-Log-Length");
      return r.text().then(function (t) {
        if (offset === 0) { pre.textContent = t; } else if (t) { pre.textContent += t; }
        if (length != null) { pre.setAttribute("data-length", length); }
        pre.setAttribute("data-fetched-state", state);
        if (live) { pre.scrollTop = pre.scrollHeight; }
      });
    }).catch(function () {});
  }

  // --- a deployment's page: status, jobs, steps, logs --------------------------------------
  function applyDeployment(root, d) {
    setBadge(root.querySelector("[data-field=status]"), d.status);
    (d.jobs || []).forEach(function (job, j) {
      var section = root.querySelector("[data-job='" + j + "']");
      if (!section) { return; }
      setBadge(section.querySelector("[data-field=job-status]"), job.status);
      setText(section.querySelector("[data-field=job-message]"), job.message || "");
      (job.steps || []).forEach(function (step, i) {
        var row = section.querySelector("[data-step='" + i + "']");
        if (row) {
          setBadge(row.querySelector("[data-field=step-status]"), step.status);
          setText(row.querySelector("[data-field=exit-code]"),
            step.exit_code == null ? "" : String(step.exit_code));
          setText(row.querySelector("[data-field=step-message]"), step.message || "");
          var outputs = Object.keys(step.outputs || {}).map(function (k) {
            return k + "=" + step.outputs[k];
          }).join(", ");
          setText(row.querySelector("[data-field=outputs]"), outputs);
        }
        var pre = section.querySelector("pre[data-step-log='" + i + "']");
        if (pre) { pre.setAttribute("data-state", step.status); }
      });
    });
    var final = DEPLOYMENT_FINAL.indexOf(d.status) >= 0;
    all("[data-while-running]", root).forEach(function (el) { el.hidden = final; });
    all("[data-when-retryable]", root).forEach(function (el) {
      el.hidden = !final || d.status === "succeeded";
    });
    return final;
  }

  function pollDeployment(root) {
    var url = root.getAttribute("data-poll");
    function tick() {
      getJson(url).then(function (d) { return applyDeployment(root, d); }, function () { return false; })
        .then(function (final) {
          return Promise.all(all("pre[data-log]", root).map(refreshLog)).then(function () { return final; });
        })
        .then(function (final) { if (!final) { setTimeout(tick, 1000); } });
    }
    tick();
  }

  // --- the agents list: status, version and last seen of the rows shown ----------------------
  function pollAgents(tbody) {
    var rows = all("tr[data-id]", tbody);
    if (rows.length === 0) { return; }
    var ids = rows.map(function (r) { return r.getAttribute("data-id"); }).join(",");
    var url = tbody.getAttribute("data-poll") + "?ids=" + encodeURIComponent(ids);
    function tick() {
      getJson(url).then(function (list) {
        list.forEach(function (a) {
          var row = tbody.querySelector("tr[data-id='" + a.id + "']");
          if (!row) { return; }
          setBadge(row.querySelector("[data-field=status]"), a.status);
          setText(row.querySelector("[data-field=version]"), a.version || "");
          setText(row.querySelector("[data-field=last-seen]"), ago(a.last_seen));
        });
      }, function () {}).then(function () { setTimeout(tick, 3000); });
    }
    setTimeout(tick, 3000);
  }

  // --- sections that refresh themselves (the health page): fetched again, swapped in whole,
  // except while someone is typing in one of their forms ---------------------------------------
  function liveRefresh(el) {
    var every = parseInt(el.getAttribute("data-live"), 10) || 5000;
    function tick() {
      var focus = document.activeElement;
      if (focus && focus.form && el.contains(focus)) { setTimeout(tick, every); return; }
      fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(el.id);
          if (fresh) {
            el.innerHTML = fresh.innerHTML;
            el.setAttribute("data-refreshed", String(Date.now()));
          }
        }, function () {})
        .then(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    all("[data-deployment][data-poll]").forEach(pollDeployment);
    all("tbody[data-agents][data-poll]").forEach(pollAgents);
    all("[data-live][id]").forEach(liveRefresh);
  });
})();
