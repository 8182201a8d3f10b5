// ICH triage web: local times, live worklist, feedback buttons, key image toggle. No external code.
(function () {
  "use strict";
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) { el.textContent = d.toLocaleString(); el.title = d.toISOString(); }
    });
  }

  async function sendFeedback(button) {
    const studyId = button.dataset.studyId;
    const action = button.dataset.action;
    button.disabled = true;
    try {
      const resp = await fetch(`/studies/${studyId}/feedback`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), "Accept": "application/json" },
        body: JSON.stringify({ action: action }),
      });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) { alert(body.error || `Could not save (${resp.status})`); return; }
      const box = button.closest("tr, .study-actions");
      box.querySelectorAll("button.fb").forEach((b) => b.classList.toggle("chosen", b === button));
      const state = box.querySelector(".fb-state");
      if (state) state.textContent = `${body.feedback.action} · ${body.feedback.user}`;
    } finally { button.disabled = false; }
  }

  document.addEventListener("click", (ev) => {
    const fb = ev.target.closest("button.fb");
    if (fb) { ev.preventDefault(); sendFeedback(fb); return; }
    const mode = ev.target.closest("button.mode");
    if (mode) {
      document.querySelectorAll("button.mode").forEach((b) => b.classList.toggle("chosen", b === mode));
      document.querySelectorAll("img.keyimage").forEach((img) => {
        const src = img.dataset[mode.dataset.mode];
        if (src) img.src = src;
      });
    }
  });

  function startWorklist(table) {
    const body = document.getElementById("worklist-body");
    const period = parseInt(table.dataset.pollMs || "5000", 10);
    const dot = document.getElementById("live-dot");
    const updated = document.getElementById("updated");
    const stamp = () => { updated.textContent = new Date().toLocaleTimeString(); };
    stamp();
    async function poll() {
      try {
        const resp = await fetch("/worklist/rows", { credentials: "same-origin", headers: { "Accept": "text/html" } });
        if (resp.redirected || resp.status === 401) { window.location = "/login"; return; }
        if (!resp.ok) throw new Error(String(resp.status));
        const html = await resp.text();
        const before = new Set([...body.querySelectorAll("tr[data-study-id]")].map((r) => r.dataset.studyId));
        if (document.activeElement && body.contains(document.activeElement)) return; // do not yank a focused button
        body.innerHTML = html;
        body.querySelectorAll("tr[data-study-id]").forEach((r) => {
          if (!before.has(r.dataset.studyId)) r.classList.add("fresh");
        });
        localTimes(body);
        dot.classList.remove("down");
        stamp();
      } catch (e) {
        dot.classList.add("down");
      } finally {
        setTimeout(poll, period);
      }
    }
    setTimeout(poll, period);
  }

  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    const table = document.getElementById("worklist");
    if (table) startWorklist(table);
    document.querySelectorAll(".bar .fill[data-fraction]").forEach((el) => {
      const f = parseFloat(el.dataset.fraction);
      if (!isNaN(f)) el.style.width = `${Math.min(100, Math.max(0, 100 * f)).toFixed(1)}%`;
    });
  });
})();
